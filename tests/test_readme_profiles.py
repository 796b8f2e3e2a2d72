"""Every `dvc exp run -S ...` command in the README is one DVC accepts and gives valid params.

Each command's overrides go through DVC's own `-S` machinery (Hydra's override grammar, the sweep
check `dvc exp run` makes without --queue, and the write into params.yaml) onto the default
params, and the result through `pipeline/params.py`.
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides, to_hydra_overrides

from pipeline import params

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    starts = ("dvc exp run ", "git checkout params.yaml && dvc exp run ")
    return [line for line in lines if line.startswith(starts) and " -S " in line]


def _overrides(command: str) -> list[str]:
    words = shlex.split(command)
    return [words[i + 1] for i, word in enumerate(words) if word == "-S"]


def test_readme_has_a_profile_per_real_source():
    sources = {m.group(1) for c in _commands() for m in [re.search(r"data\.source=(\w+)", c)] if m}
    assert sources == {"imagenet", "flickr8k", "flickr30k", "mscoco", "cifar10", "cifar100", "folder", "webdataset"}


@pytest.mark.parametrize("command", _commands())
def test_every_readme_command_passes_dvcs_parser_and_ours(command, tmp_path):
    overrides = _overrides(command)
    assert overrides, command
    sweeps = [o for o in to_hydra_overrides(overrides) if o.is_sweep_override()]
    assert not sweeps, f"DVC runs sweeps only with --queue: {[o.input_line for o in sweeps]}"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.Params().model_dump()))  # the defaults, not the workspace's
    apply_overrides(params_file, overrides)  # what `dvc exp run -S` does to params.yaml
    parsed = params.load(params_file)  # raises ParamsError naming the bad key
    if "data.source=" in command:  # the real-dataset profiles all use OpenAI's ViT-B/32
        assert parsed.model.name == "ViT-B-32" and parsed.model.pretrained == "openai", command


def test_profiles_start_from_the_committed_defaults():
    """`dvc exp run -S` leaves its values in the workspace: each named profile resets params.yaml first."""
    for command in _commands():
        if " -n " in command:
            assert command.startswith("git checkout params.yaml && dvc exp run "), command


def test_the_quoting_the_readme_explains_is_what_dvc_needs(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.Params().model_dump()))
    apply_overrides(params_file, ['index.factory="IVF256,Flat"', 'index.search_params="nprobe=16"'])
    assert params.load(params_file).index.factory == "IVF256,Flat"
    assert to_hydra_overrides(["index.factory=IVF256,Flat"])[0].is_sweep_override()  # unquoted: a sweep
    with pytest.raises(Exception, match="mismatched input '='"):
        to_hydra_overrides(["index.search_params=nprobe=16"])
