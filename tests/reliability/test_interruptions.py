"""Killed writers and stages: the previous outputs stay valid, and a rerun completes and cleans up."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import io
from pipeline.prepared import load_prepared
from pipeline.stage import SHELLS


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_write_never_leaves_a_partial_file(tmp_path):
    """A writer alternates two versions of a 20 MB Parquet file and is killed at random moments."""
    target = tmp_path / "table.parquet"
    writer = f"""
        import numpy as np, pandas as pd
        from pipeline import io
        frames = [pd.DataFrame({{"version": np.full(2_000_000, v), "x": np.arange(2_000_000)}}) for v in (1, 2)]
        io.write_parquet({str(target)!r}, frames[0])
        print("ready", flush=True)
        while True:
            for frame in frames:
                io.write_parquet({str(target)!r}, frame)
    """
    rng = random.Random(0)
    kills, leftovers = 0, []
    # Each writer removes the leftovers of the one killed before it, so only the last kill's can be
    # seen; a kill can also land between two writes (the rename), so go on until the last left one.
    while kills < 4 or not leftovers:
        assert kills < 40, "40 kills and none landed while a temporary file was open"
        process = _spawn(writer)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        table = pd.read_parquet(target)  # complete, whichever version it is
        assert len(table) == 2_000_000 and table["version"].nunique() == 1
        leftovers = list(tmp_path.glob(".table.parquet.*.tmp"))
    io.write_parquet(target, table)  # the next writer removes what killed writers left
    assert not list(tmp_path.glob(".table.parquet.*.tmp"))


def test_a_killed_stage_keeps_the_previous_output_and_the_rerun_completes(tmp_path):
    params = tmp_path / "params.yaml"
    out = tmp_path / "data" / "prepared"
    prepare = [sys.executable, "-m", "pipeline.prepare", "--params", str(params), "--out", str(out), "--timing", str(tmp_path / "timing.json")]

    params.write_text(yaml.safe_dump({"data": {"synthetic": {"n_classes": 3, "images_per_class": 10, "extra_test_per_class": 0}}}))
    subprocess.run(prepare, check=True, capture_output=True)
    before = load_prepared(out).images

    # A bigger dataset takes seconds to draw: kill it while it writes.
    params.write_text(yaml.safe_dump({"data": {"synthetic": {"n_classes": 8, "images_per_class": 300, "extra_test_per_class": 0}}}))
    process = subprocess.Popen(prepare, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "data").glob(".prepared.*.tmp")):  # wait until it writes (imports take seconds)
        assert process.poll() is None and time.monotonic() < deadline, "prepare ended before it started writing"
        time.sleep(0.05)
    time.sleep(random.Random(1).uniform(0.2, 1.0))
    assert process.poll() is None, "prepare finished before it could be killed; make the dataset bigger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_prepared(out).images.equals(before)  # still the previous, complete output
    assert list((tmp_path / "data").glob(".prepared.*.tmp"))  # the killed run's half-drawn folder

    subprocess.run(prepare, check=True, capture_output=True)
    after = load_prepared(out)
    assert len(after.images) == 2400 and all(path.is_file() for path in after.image_files()[:50])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared"]  # leftovers cleaned


def test_a_writer_killed_between_the_two_renames_is_repaired(tmp_path):
    """atomic_dir moves the old folder aside, then renames the new one in; dying in between loses nothing."""
    target = tmp_path / "artifact"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    target.rename(tmp_path / ".artifact.old")  # the state a kill after the first rename leaves
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target) as tmp:
            assert (target / "a.txt").read_text() == "old"  # restored before anything else
            raise RuntimeError("the next writer fails too")
    assert (target / "a.txt").read_text() == "old"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return not stat.read().split(") ", 1)[1].startswith("Z")  # a zombie has exited, waiting for init
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("under_dvc", [True, False], ids=["under dvc", "by hand"])
def test_a_stage_ends_with_dvc_but_a_stage_run_by_hand_outlives_its_shell(tmp_path, under_dvc):
    # Under DVC (DVC_STAGE set) a killed parent must not leave the stage writing outputs as an
    # orphan; run by hand (`nohup python -m pipeline.train &`) it must outlive the shell it came from.
    stage = "from pipeline.stage import end_with_parent; end_with_parent(); import time; print('ready', flush=True); time.sleep(120)"
    env = {**os.environ, "DVC_STAGE": "train"} if under_dvc else {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    launcher = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {stage!r}], stdout=subprocess.PIPE, text=True)\n"
        "child.stdout.readline()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2], env=env)
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + (20 if under_dvc else 3)
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    survived = _alive(child_pid)
    if survived:
        os.kill(child_pid, signal.SIGKILL)
    assert survived != under_dvc, "the stage kept running after DVC was killed" if under_dvc else "the stage died with the shell that started it"


def _stage_processes(marker: str) -> list[int]:
    """Pids of the live (not zombie) processes whose command line holds `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace") and ") Z" not in (proc / "stat").read_text():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue  # gone meanwhile, or not a process
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_sigkill_of_dvc_repro_ends_its_stage_before_it_writes(tmp_path, shell):
    """`dvc repro` runs a stage's command through $SHELL, which execs it: the stage is DVC's child,
    and must end with DVC rather than write its output after DVC is gone."""
    if not Path(shell).exists():
        pytest.skip(f"no {shell}")
    root = Path(__file__).resolve().parents[2]
    project = tmp_path / "project"
    project.mkdir()
    marker = f"{project}/timing.json"  # names this test's stage among all processes
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"synthetic": {"n_classes": 8, "images_per_class": 300, "extra_test_per_class": 0}}}))
    stage = {"cmd": f"{sys.executable} -m pipeline.prepare --params params.yaml --out data/prepared --timing {marker}", "params": ["data"], "outs": ["data/prepared"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stage}}))
    env = {**os.environ, "PYTHONPATH": str(root), "SHELL": shell, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, env=env, check=True)
    subprocess.run([*dvc, "config", "core.analytics", "false"], cwd=project, env=env, check=True)

    repro = subprocess.Popen([*dvc, "repro"], cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not list((project / "data").glob(".prepared.*.tmp")):  # the stage is drawing its images
        assert repro.poll() is None and time.monotonic() < deadline, "dvc repro ended before its stage started writing"
        time.sleep(0.05)
    stages = [pid for pid in _stage_processes(marker) if Path(f"/proc/{pid}/comm").read_text().strip() not in SHELLS]
    assert len(stages) == 1, f"expected one stage process, found {stages}"  # dash stays as its parent, bash execs it
    repro.send_signal(signal.SIGKILL)
    repro.wait()

    deadline = time.monotonic() + 20
    while _stage_processes(marker):  # the stage, and the shell that waited for it
        if time.monotonic() > deadline:
            for pid in _stage_processes(marker):
                os.kill(pid, signal.SIGKILL)
            pytest.fail("the stage kept running after dvc repro was killed")
        time.sleep(0.1)
    assert not (project / "data" / "prepared").exists()  # it never got to write its output
    assert not (project / "dvc.lock").exists()
