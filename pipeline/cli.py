"""The `clipline` console script: commands people run against the pipeline's outputs.

Later commands (search, classify, verify, similar, serve) use the same artifacts.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline import io
from pipeline.stage import user_errors_exit_cleanly

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="Use a clipline pipeline's model, index and reports.")


def _flatten(prefix: str, value, out: list[tuple[str, object]]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    elif not isinstance(value, list):
        out.append((prefix, value))


@app.command()
@user_errors_exit_cleanly
def info(
    reports: Path = typer.Option(Path("reports"), help="reports folder written by `dvc repro`"),
) -> None:
    """Show what the last `dvc repro` built and measured: dataset, model, index, metrics."""
    metrics = io.read_json(reports / "metrics.json")
    rows: list[tuple[str, object]] = []
    _flatten("", metrics, rows)
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else value
        typer.echo(f"{key.ljust(width)}  {shown}")


@app.callback()
def main() -> None:
    """clipline: a reproducible DVC pipeline for CLIP-style models."""


if __name__ == "__main__":
    app()
