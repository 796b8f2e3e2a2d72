"""What every stage script shares: a typer app and clean exits on user-facing errors."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable

import typer

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


def stage_app(main: Callable) -> typer.Typer:
    """A one-command typer app for a stage's `main`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(user_errors_exit_cleanly(main))
    return app


# Inputs several stages read, declared once so their flags and help read the same everywhere.
PARAMS_OPTION = typer.Option(DEFAULT_PARAMS_FILE, "--params", help="params.yaml to read")
DATA_OPTION = typer.Option(Path("data/prepared"), "--data", help="prepared dataset folder")
MODEL_OPTION = typer.Option(Path("artifacts/model"), "--model", help="trained model folder")
EMBEDDINGS_OPTION = typer.Option(Path("artifacts/embeddings"), "--embeddings", help="embeddings folder")
