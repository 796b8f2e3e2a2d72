"""The `clipline` console script: commands people run against the pipeline's outputs.

`info` reads the reports; `verify` and `similar` load the trained model and index once through
`pipeline.predict.Predictor`. The artifact locations are options of the app, before the command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import typer

from pipeline import io
from pipeline.predict import PredictError, Predictor
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


@dataclass
class Artifacts:
    """Where the pipeline's outputs are; the options before the command name (clipline --model M verify ...)."""

    model: Path
    index: Path
    data: Path
    metrics: Path
    device: str

    def predictor(self) -> Predictor:
        return Predictor.from_artifacts(self.model, self.index, self.data, self.metrics, self.device)


@app.command()
@user_errors_exit_cleanly
def verify(
    ctx: typer.Context,
    image1: Optional[Path] = typer.Argument(None, help="first image"),
    image2: Optional[Path] = typer.Argument(None, help="second image"),
    pairs: Optional[Path] = typer.Option(None, help="CSV with columns image1,image2 (a batch instead of two images)"),
    out: Optional[Path] = typer.Option(None, help="where to write the batch results as CSV (default: stdout)"),
    threshold: Optional[float] = typer.Option(None, help="distance threshold (default: the one evaluate chose)"),
) -> None:
    """Are two images the same class / identity? Prints same or different, the distance and a confidence."""
    if pairs is None and (image1 is None or image2 is None):
        raise PredictError("give two images, or --pairs pairs.csv")
    predictor = ctx.obj.predictor()
    if pairs is not None:
        if not pairs.is_file():
            raise FileNotFoundError(f"{pairs}: pairs file not found")
        results = predictor.verify_pairs(pd.read_csv(pairs), threshold)
        if out is None:
            typer.echo(results.to_csv(index=False), nl=False)
        else:
            io.write_text(out, results.to_csv(index=False))
            typer.echo(f"{int(results['same'].sum())} of {len(results)} pairs same -> {out}")
        return
    verdict = predictor.verify(image1, image2, threshold)
    typer.echo(
        f"{'same' if verdict.same else 'different'}  distance {verdict.distance:.4f}  "
        f"threshold {verdict.threshold:.4f}  confidence {verdict.confidence:.2f}"
    )


@app.command()
@user_errors_exit_cleanly
def similar(
    ctx: typer.Context,
    query: Path = typer.Argument(..., help="query image"),
    top_k: int = typer.Option(5, "--top-k", "-k", help="how many neighbours"),
    out: Optional[Path] = typer.Option(None, help="write a contact sheet (PNG) of the query and its neighbours"),
) -> None:
    """The nearest images in the index, with their similarity scores."""
    predictor = ctx.obj.predictor()
    hits = predictor.similar(query, top_k)
    for rank, hit in enumerate(hits.itertuples(), start=1):
        label = "" if pd.isna(hit.class_name) else f"  {hit.class_name}"
        typer.echo(f"{rank:>3}  {hit.score:.4f}  {hit.image_id}{label}  {hit.full_path}")
    if out is not None:
        from pipeline.reporting.figures import contact_sheet  # matplotlib only when a sheet is asked for

        contact_sheet(query, hits, out)
        typer.echo(f"contact sheet -> {out}")


@app.callback()
def main(
    ctx: typer.Context,
    model: Path = typer.Option(Path("artifacts/model"), help="trained model folder"),
    index: Path = typer.Option(Path("artifacts/index"), help="FAISS index folder"),
    data: Path = typer.Option(Path("data/prepared"), help="prepared dataset folder (gallery image paths)"),
    metrics: Path = typer.Option(Path("reports/metrics.json"), help="metrics holding the verification threshold"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """clipline: a reproducible DVC pipeline for CLIP-style models. Run from the project folder."""
    ctx.obj = Artifacts(model, index, data, metrics, device)


if __name__ == "__main__":
    app()
