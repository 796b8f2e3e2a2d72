"""The `clipline` console script: commands people run against the pipeline's outputs.

`info` reads the reports; `search`, `similar`, `classify`, `verify`, `add` and `serve` load the
trained model and the gallery index once through `pipeline.predict.Predictor`. The artifact
locations are options of the app, before the command (clipline --model M search ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

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


def find_project_root(start: Path) -> Optional[Path]:
    """The nearest folder at or above `start` holding dvc.yaml, as git and dvc find theirs."""
    for folder in [start, *start.parents]:
        if (folder / "dvc.yaml").is_file():
            return folder
    return None


def _in_project(ctx: typer.Context, name: str, path: Path) -> Path:
    """A path option as given, or, left at its default, resolved in the project (so commands work
    from any folder inside it)."""
    source = ctx.get_parameter_source(name)  # an enum of typer's own click copy: compared by name
    if source is None or source.name != "DEFAULT" or path.is_absolute():
        return path
    root = find_project_root(Path.cwd())
    if root is None:
        raise PredictError(
            f"no clipline project found: no dvc.yaml in {Path.cwd()} or any folder above it. "
            f"Run from inside the project, or give --{name.replace('_', '-')} (and the other artifact options)"
        )
    return root / path


@app.command()
@user_errors_exit_cleanly
def info(
    ctx: typer.Context,
    reports: Path = typer.Option(Path("reports"), help="reports folder written by `dvc repro`"),
) -> None:
    """Show what the last `dvc repro` built and measured: dataset, model, index, metrics."""
    metrics = io.read_json(_in_project(ctx, "reports", reports) / "metrics.json")
    rows: list[tuple[str, object]] = []
    _flatten("", metrics, rows)
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else value
        typer.echo(f"{key.ljust(width)}  {shown}")


class Artifacts:
    """Where the pipeline's outputs are: the options before the command name (clipline --model M
    verify ...), resolved in the project only when a command loads them (`info` and `--help` load
    nothing, and work outside a project)."""

    def __init__(self, ctx: typer.Context, paths: dict[str, Path], gallery: Optional[Path], device: str):
        self.ctx, self.paths, self.gallery, self.device = ctx, paths, gallery, device

    def predictor(self) -> Predictor:
        path = {name: _in_project(self.ctx, name, given) for name, given in self.paths.items()}
        return Predictor.from_artifacts(path["model"], path["index"], path["data"], path["metrics"], self.device, path["embeddings"], self.gallery)


def _print_table(rows: Sequence[dict]) -> None:
    """Aligned columns with a header; floats to 4 decimals, missing values blank."""
    if not rows:
        typer.echo("(nothing found)")
        return
    cells = [[("" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row.values()] for row in rows]
    header = list(rows[0].keys())
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _show_hits(hits: pd.DataFrame, out: Optional[Path], query_image: Optional[Path] = None, query_text: Optional[str] = None) -> None:
    _print_table(
        [
            {"rank": rank, "score": float(hit.score), "image_id": hit.image_id, "class": None if pd.isna(hit.class_name) else hit.class_name, "path": hit.full_path}
            for rank, hit in enumerate(hits.itertuples(), start=1)
        ]
    )
    if out is not None:
        from pipeline.reporting.figures import contact_sheet  # matplotlib only when a sheet is asked for

        contact_sheet(hits, out, query_image=query_image, query_text=query_text)
        typer.echo(f"contact sheet -> {out}")


TOP_K_OPTION = typer.Option(5, "--top-k", "-k", help="how many results")
SHEET_OPTION = typer.Option(None, "--out", help="write a contact sheet (PNG) of the query and its results")
SHEET_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def _check_sheet_path(out: Optional[Path]) -> None:
    """Refuse a contact-sheet path matplotlib cannot write before any work, not with a traceback after."""
    if out is None:
        return
    if out.is_dir():
        raise PredictError(f"--out {out}: is a folder; give a file name, e.g. {out / 'results.png'}")
    if out.suffix.lower() not in SHEET_FORMATS:
        raise PredictError(f"--out {out}: give a file name ending in {', '.join(SHEET_FORMATS)} (the sheet's format)")


@app.command()
@user_errors_exit_cleanly
def search(
    ctx: typer.Context,
    text: Optional[str] = typer.Option(None, "--text", "-t", help="find images matching this text"),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="find images similar to this one"),
    top_k: int = TOP_K_OPTION,
    out: Optional[Path] = SHEET_OPTION,
) -> None:
    """Search the gallery (the pipeline's index plus added images) by text or by image."""
    if (text is None) == (image is None):
        raise PredictError("give exactly one of --text or --image")
    _check_sheet_path(out)
    predictor = ctx.obj.predictor()
    if text is not None:
        _show_hits(predictor.search_text(text, top_k), out, query_text=text)
    else:
        _show_hits(predictor.similar(image, top_k), out, query_image=image)


@app.command()
@user_errors_exit_cleanly
def verify(
    ctx: typer.Context,
    image1: Optional[Path] = typer.Argument(None, help="first image"),
    image2: Optional[Path] = typer.Argument(None, help="second image"),
    pairs: Optional[Path] = typer.Option(None, help="CSV with columns image1,image2 (a batch instead of two images)"),
    out: Optional[Path] = typer.Option(None, help="where to write the batch results as CSV (default: stdout)"),
    threshold: Optional[float] = typer.Option(None, min=0.0, help="distance threshold, >= 0 (default: the one evaluate chose)"),
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
    top_k: int = TOP_K_OPTION,
    out: Optional[Path] = SHEET_OPTION,
) -> None:
    """The nearest images to QUERY, with their similarity scores (the same as search --image)."""
    _check_sheet_path(out)
    _show_hits(ctx.obj.predictor().similar(query, top_k), out, query_image=query)


@app.command()
@user_errors_exit_cleanly
def classify(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="image to classify"),
    labels: Optional[str] = typer.Option(None, help='comma-separated candidate labels, e.g. "cat,dog,car"'),
    classes_from_dataset: bool = typer.Option(False, "--classes-from-dataset", help="use the prepared dataset's classes (the default without --labels)"),
    top_k: int = TOP_K_OPTION,
) -> None:
    """Zero-shot classification with the prompt-template ensemble; probabilities, most likely first."""
    if labels is not None and classes_from_dataset:
        raise PredictError("give --labels or --classes-from-dataset, not both")
    predictions = ctx.obj.predictor().classify(image, None if labels is None else labels.split(","), top_k)
    _print_table(predictions.to_dict("records"))


@app.command()
@user_errors_exit_cleanly
def add(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(..., help="image files, or folders (searched recursively)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip unreadable images (listed) instead of stopping"),
) -> None:
    """Embed new images into the gallery so search finds them; an image already there is not added twice."""
    predictor = ctx.obj.predictor()
    report = predictor.add(paths, skip_bad)
    for source, image_id in report.added:
        typer.echo(f"added      {image_id}  {source}")
    for source, image_id in report.duplicates:
        typer.echo(f"duplicate  {image_id}  {source}  (same content already in the gallery)")
    for source, why in report.rejected:
        typer.echo(f"rejected   {source}: {why}")
    if report.ignored:
        typer.echo(f"ignored {len(report.ignored)} files without an image extension, e.g. {report.ignored[0]}")
    typer.echo(
        f"{len(report.added)} added, {len(report.duplicates)} already present, {len(report.rejected)} rejected; "
        f"the gallery holds {report.total} images -> {predictor.gallery.current}"
    )


@app.command()
@user_errors_exit_cleanly
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes the page to your network"),
    port: int = typer.Option(7860, help="port"),
    max_upload_mb: float = typer.Option(10.0, help="largest accepted upload, in MB"),
    max_pixels: int = typer.Option(25_000_000, help="largest accepted image, in pixels (width x height)"),
) -> None:
    """A web page for search, classification, verification and adding images."""
    from pipeline import web  # gradio only when the page is asked for

    web.serve(ctx.obj.predictor(), host, port, web.UploadLimits(max_upload_mb, max_pixels))


@app.callback()
def main(
    ctx: typer.Context,
    model: Path = typer.Option(Path("artifacts/model"), help="trained model folder"),
    index: Path = typer.Option(Path("artifacts/index"), help="FAISS index folder"),
    data: Path = typer.Option(Path("data/prepared"), help="prepared dataset folder (gallery image paths)"),
    metrics: Path = typer.Option(Path("reports/metrics.json"), help="metrics holding the verification threshold"),
    embeddings: Path = typer.Option(Path("artifacts/embeddings"), help="embeddings folder (the dataset's class prompts)"),
    gallery: Optional[Path] = typer.Option(None, help="gallery folder: the index plus images added with `add` (default: gallery/ beside the index folder)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """clipline: a reproducible DVC pipeline for CLIP-style models. Run anywhere inside the project
    (the folder holding dvc.yaml, found upward as git finds .git), or point the options elsewhere."""
    ctx.obj = Artifacts(ctx, dict(model=model, index=index, data=data, metrics=metrics, embeddings=embeddings), gallery, device)


if __name__ == "__main__":
    app()
