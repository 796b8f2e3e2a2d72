"""Every `dvc exp run -S ...` command in the README is a valid set of params."""

import re
import shlex
from pathlib import Path

from pipeline import params

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("dvc exp run")]


def test_readme_has_a_profile_per_real_source():
    sources = {m.group(1) for c in _commands() for m in [re.search(r"data\.source=(\w+)", c)] if m}
    assert sources == {"imagenet", "flickr8k", "cifar10", "folder"}


def test_every_readme_command_validates():
    for command in _commands():
        raw = params.Params().model_dump()  # the defaults, not whatever experiment the workspace holds
        words = shlex.split(command)
        overrides = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
        assert overrides, command
        for override in overrides:
            params.apply_override(raw, override)
        parsed = params.parse(raw, source=command)  # raises ParamsError naming the bad key
        if "data.source=" in command:  # the real-dataset profiles all use OpenAI's ViT-B/32
            assert parsed.model.name == "ViT-B-32" and parsed.model.pretrained == "openai", command
