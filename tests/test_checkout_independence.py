"""The suite passes whatever experiment the checkout holds.

`dvc exp run -S model.name=ViT-B-32 ...` leaves the experiment's values in the workspace's
params.yaml and its results in reports/. The tests that read project files run here in a copy of
the project whose workspace holds such an experiment (committed first, as a user's clone is,
then changed without committing): they must pass there as they do on a clean checkout.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline import params

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = [
    "model.name=ViT-B-32", "model.pretrained=none", "train.epochs=1", "train.method=siamese",
    "data.synthetic.images_per_class=20", "data.synthetic.extra_test_per_class=0", "index.factory=IVF4,Flat", "index.search_params=nprobe=2",
    "evaluate.recall_k=[1,50]", "probe.points=[pixels,6,final]", "runtime.batch_size=7",
]  # fmt: skip
# Every test module that reads a file of the project rather than one it made itself. The end-to-end
# module runs its first test only: its fixture (a whole `dvc repro`) is what read params.yaml.
PROJECT_READING_TESTS = [
    "tests/test_params_io.py", "tests/test_readme_profiles.py", "tests/test_stage_deps.py", "tests/test_dvc_config.py",
    "tests/test_pipeline_e2e.py::test_repro_writes_metrics_plots_and_report",
]  # fmt: skip


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_project_reading_tests_pass_with_an_experiment_in_the_workspace(tmp_path):
    work = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "tmp", "cache")
    for name in ("pipeline", "tests", ".dvc", ".ci"):
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml", "README.md", "pyproject.toml", "requirements.lock", ".dvcignore", "reports/methods.json"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, work / name)
    _git(work, "init", "-q")
    _git(work, "add", "-A")
    _git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "clean checkout")

    raw = yaml.safe_load((work / "params.yaml").read_text())
    for override in EXPERIMENT:
        params.apply_override(raw, override)
    params.parse(raw)  # a valid experiment: the suite has no excuse to fail on it
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (work / "reports" / "metrics.json").write_text('{"zero_shot": {"top1": 0.5}}\n')  # another run's results

    # The copy's own package comes first on the path (python -m puts the working folder there).
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PROJECT_READING_TESTS],
        cwd=work, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
