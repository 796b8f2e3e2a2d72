"""What every stage script shares: a typer app, clean exits on user-facing errors, checked params,
a torchrun launch when `runtime.processes` asks for one, and where wall-clock times go."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from pipeline import io, preflight
from pipeline import params as params_lib
from pipeline.errors import UserError
from pipeline.params import DEFAULT_PARAMS_FILE

# Mistakes in params, data or paths: the message says what is wrong, a traceback would only hide it.
USER_ERRORS = (UserError, FileNotFoundError)


def user_errors_exit_cleanly(func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from None

    return wrapper


SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"}


def end_with_parent() -> None:
    """Linux, under `dvc repro` (which sets DVC_STAGE): end this stage, with SIGTERM, when DVC dies.

    A stage whose `dvc repro` is killed (SIGKILL leaves DVC no time to stop it) would otherwise run
    on as an orphan and write its outputs after DVC has removed the old ones, with dvc.lock not
    updated. DVC runs the command through $SHELL: bash execs it, so DVC is the parent and
    PR_SET_PDEATHSIG does it; dash (Debian's /bin/sh, used when $SHELL is unset) stays as the parent
    and lives on, so then a thread watches DVC itself. Run by hand (no DVC_STAGE), a stage is left
    alone: `nohup python -m pipeline.train &` must outlive the login shell. Elsewhere than Linux
    nothing is done: the orphan finishes, and `dvc status` shows the stage as changed.
    """
    if not sys.platform.startswith("linux") or "DVC_STAGE" not in os.environ:
        return
    launcher = _first_ancestor_not_a_shell()
    if launcher is None:
        return
    if launcher[0] == os.getppid():
        die_with_parent()
    else:
        threading.Thread(target=_end_when_gone, args=launcher, name="end-with-dvc", daemon=True).start()


def die_with_parent() -> None:
    """Linux: SIGTERM to this process when its parent dies (PR_SET_PDEATHSIG); also torchrun's
    `preexec_fn`, so that torchrun and its workers end with the stage that launched them."""
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not permitted here (some sandboxes): keep running as before
    if os.getppid() != parent:  # the parent died before the signal was set
        os.kill(os.getpid(), signal.SIGTERM)


def _process(pid: int) -> Optional[tuple[str, int, str]]:
    """(command name, parent pid, start time) of a live process from /proc, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
    # rest[0] is the state, rest[1] the parent, rest[19] the start time (field 22 of proc(5))
    return None if rest[0] in "ZX" else (name, int(rest[1]), rest[19])


def _first_ancestor_not_a_shell() -> Optional[tuple[int, str]]:
    """(pid, start time) of the nearest ancestor that is not a shell: DVC, for a stage it runs."""
    pid = os.getppid()
    for _ in range(8):  # a shell or two between DVC and the stage, never a long chain
        process = _process(pid)
        if process is None:
            return None
        name, parent, started = process
        if name not in SHELLS:
            return pid, started
        pid = parent
    return None


def _end_when_gone(pid: int, started: str) -> None:
    while (process := _process(pid)) is not None and process[2] == started:  # the start time tells a reused pid
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def stage_app(main: Callable, distributed: bool = False) -> typer.Typer:
    """A one-command typer app for a stage's `main`; `distributed` stages run under torchrun when
    `runtime.processes` > 1 (see `launched_under_torchrun`). A stage ends when the process that
    started it dies (`end_with_parent`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @functools.wraps(main)
    def command(**kwargs):
        end_with_parent()
        if not (distributed and launched_under_torchrun(main, kwargs)):
            main(**kwargs)

    app.command()(user_errors_exit_cleanly(command))
    return app


def launched_under_torchrun(main: Callable, kwargs: dict) -> bool:
    """With `runtime.processes` N > 1, run this stage again as N processes under torchrun and wait
    for them; returns False when the stage should simply run here (N = 1, or already launched).

    `dvc repro` thereby runs a stage on N GPUs (NCCL) or N CPU processes (gloo) with the same
    command line: the process count lives in `runtime`, which no stage declares, so changing it
    reruns nothing. One machine only (`--standalone`); for several, run torchrun on each
    yourself (README, "Scaling out").
    """
    if "WORLD_SIZE" in os.environ:  # this is one of the launched processes
        return False
    runtime = params_lib.load(kwargs["params_file"]).runtime
    processes = runtime.processes
    if processes == 1:
        return False
    preflight.check_processes(processes, runtime.device)
    module = main.__module__
    if module == "__main__":  # `python -m pipeline.train`: the module's real name
        module = sys.modules["__main__"].__spec__.name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", module]
    for name, value in kwargs.items():
        option = inspect.signature(main).parameters[name].default
        command += [option.param_decls[0] if option.param_decls else "--" + name.replace("_", "-"), str(value)]
    typer.echo(f"{module}: {processes} processes under torchrun")
    exit_code = subprocess.run(command, preexec_fn=die_with_parent).returncode  # torchrun, too, ends with this stage
    if exit_code:
        raise typer.Exit(code=exit_code)
    return True


# Inputs several stages read, declared once so their flags and help read the same everywhere.
PARAMS_OPTION = typer.Option(DEFAULT_PARAMS_FILE, "--params", help="params.yaml to read")
DATA_OPTION = typer.Option(Path("data/prepared"), "--data", help="prepared dataset folder")
MODEL_OPTION = typer.Option(Path("artifacts/model"), "--model", help="trained model folder")
EMBEDDINGS_OPTION = typer.Option(Path("artifacts/embeddings"), "--embeddings", help="embeddings folder")


def load_params(params_file: Path) -> params_lib.Params:
    """Every section of the params file, validated, and checked across sections before any heavy
    work (`pipeline.preflight`); the stage then uses only the sections it declares in dvc.yaml."""
    params = params_lib.load(params_file)
    preflight.check(params)
    return params


def timing_option(stage: str):
    return typer.Option(
        Path(f"reports/timing/{stage}.json"), "--timing",
        help="where this run's wall-clock times go (a DVC metric beside the outputs, never inside them)",
    )  # fmt: skip


def write_timing(path: Path, timing: dict) -> None:
    """Seconds (and how the stage ran: device, processes) for `dvc metrics show`. They change on
    every run, so they stay out of cached outputs: a rerun that reproduces the same outputs then
    reruns nothing downstream."""
    io.write_json(path, timing)
