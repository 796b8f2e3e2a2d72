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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_stage_ends_when_the_process_that_started_it_is_killed(tmp_path):
    # As when `dvc repro` is SIGKILLed: its stage must not run on as an orphan and write outputs later.
    stage = "from pipeline.stage import end_with_parent; end_with_parent(); import time; print('ready', flush=True); time.sleep(120)"
    launcher = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {stage!r}], stdout=subprocess.PIPE, text=True)\n"
        "child.stdout.readline()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child_pid}/stat") as stat:
            if stat.read().split(") ", 1)[1].startswith("Z"):  # exited, waiting to be reaped by init
                return
        time.sleep(0.2)
    os.kill(child_pid, signal.SIGKILL)
    pytest.fail("the stage kept running after the process that started it was killed")
