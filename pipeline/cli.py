"""The `clipline` console script: commands people run against the pipeline's outputs.

`info` reads the reports; `search`, `similar`, `classify`, `verify`, `add` and `serve` load the
trained model and the gallery index once through `pipeline.predict.Predictor`. The artifact
locations are options of the app, before the command (clipline --model M search ...).

`info`, `search`, `similar`, `classify` and `verify` print a table for people, or with `--json` one
JSON document for scripts; both go through `_emit`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import pandas as pd
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from pipeline import io
from pipeline.errors import PredictError
from pipeline.params import PIL_MAX_IMAGE_PIXELS
from pipeline.project import find_project_root
from pipeline.stage import user_errors_exit_cleanly

if TYPE_CHECKING:  # torch and open_clip load with the model, not with --help or info
    from pipeline.predict import Predictor

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="Use a clipline pipeline's model, index and reports.")


def _flatten(prefix: str, value, out: list[tuple[str, object]]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    elif not isinstance(value, list):
        out.append((prefix, value))


def _in_project(ctx: typer.Context, paths: dict[str, Path], usage: str) -> dict[str, Path]:
    """Path options as given, and those left at their default resolved in the project (so commands
    work from any folder inside it). Outside a project, one error names every option still needed,
    where it goes on the command line: `usage` with `{options}` for them."""
    defaults = [name for name, path in paths.items() if _left_at_default(ctx, name) and not path.is_absolute()]
    if not defaults:
        return dict(paths)
    root = find_project_root(Path.cwd())
    if root is None:
        options = " ".join(f"--{name.replace('_', '-')} PATH" for name in defaults)
        raise PredictError(
            f"no clipline project found: no dvc.yaml in {Path.cwd()} or any folder above it. "
            f"Run from inside the project, or give the paths: {usage.format(options=options)}"
        )
    return {name: root / path if name in defaults else path for name, path in paths.items()}


def _left_at_default(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)  # an enum of typer's own click copy: compared by name
    return source is not None and source.name == "DEFAULT"


JSON_OPTION = typer.Option(False, "--json", help="print one JSON document on stdout instead of the table (for scripts)")


def _jsonable(value):
    """Plain JSON values: numpy scalars as Python numbers, NaN and infinities as null (JSON has no
    NaN; `json.dumps` would write a token other parsers reject), paths as strings."""
    if isinstance(value, dict):
        return {str(key): _jsonable(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(inner) for inner in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _cell(value) -> str:
    """A table cell: floats to 4 decimals, missing values (None, NaN) blank."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _console() -> Console:
    """Rich on stdout, made now so it writes to whatever stdout is at the call (CliRunner swaps it).
    Not a terminal (a pipe, a file, a test): no colour and no wrapping, so each row stays on one line
    for grep; on a terminal long cells fold (see `_table`) rather than being cut with an ellipsis.
    No markup or emoji: paths and labels are data, and "[x]" or ":cat:" in them must print as is."""
    width = None if sys.stdout.isatty() else 100_000
    return Console(width=width, markup=False, emoji=False, highlight=False)


def _table(rows: Sequence[dict]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)  # a header rule, no frame: easy to read and to grep
    for name in rows[0]:
        numeric = all(isinstance(row[name], numbers.Real) and not isinstance(row[name], (bool, np.bool_)) for row in rows if row[name] is not None)
        table.add_column(name, justify="right" if numeric else "left", overflow="fold", no_wrap=numeric)
    for row in rows:
        table.add_row(*(_cell(value) for value in row.values()))
    return table


def _emit(as_json: bool, document: dict, rows: Optional[Sequence[dict]] = None, notes: Sequence[str] = ()) -> None:
    """The one place the commands print their answer. With --json: `document` alone on stdout, so
    `json.loads(stdout)` always works (notes belong in the document then). Otherwise `rows` as a
    table (None: no table) and then the notes, one a line."""
    if as_json:
        typer.echo(json.dumps(_jsonable(document), indent=2, allow_nan=False))
        return
    if rows is not None:
        if rows:
            _console().print(_table(rows))
        else:
            typer.echo("(nothing found)")
    for note in notes:
        typer.echo(note)


@app.command()
@user_errors_exit_cleanly
def info(
    ctx: typer.Context,
    reports: Path = typer.Option(Path("reports"), help="reports folder written by `dvc repro`"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show what the last `dvc repro` built and measured: dataset, model, index, metrics."""
    metrics = io.read_json(_in_project(ctx, {"reports": reports}, "clipline info {options}")["reports"] / "metrics.json")
    rows: list[tuple[str, object]] = []
    _flatten("", metrics, rows)
    # JSON: metrics.json as it is, nested; the table: one dotted key per line (lists left out).
    _emit(as_json, metrics, [{"metric": key, "value": value} for key, value in rows])


class Artifacts:
    """Where the pipeline's outputs are: the options before the command name (clipline --model M
    verify ...), resolved in the project only when a command loads them (`info` and `--help` load
    nothing, and work outside a project)."""

    def __init__(self, ctx: typer.Context, paths: dict[str, Path], gallery: Optional[Path], device: str):
        self.ctx, self.paths, self.gallery, self.device = ctx, paths, gallery, device

    def path(self, name: str) -> Path:
        return self.resolved()[name]

    def resolved(self) -> dict[str, Path]:
        """Every artifact path; the options go before the command name."""
        return _in_project(self.ctx, self.paths, f"clipline {{options}} {self.ctx.invoked_subcommand} ...")

    def predictor(self) -> Predictor:
        from pipeline.predict import Predictor  # torch and open_clip: only for a command that loads the model

        path = self.resolved()
        return Predictor.from_artifacts(path["model"], path["index"], path["data"], path["metrics"], self.device, path["embeddings"], self.gallery)


def _show_hits(hits: pd.DataFrame, query: dict, top_k: int, as_json: bool, out: Optional[Path], metric: Optional[str]) -> None:
    """search and similar: the query, its hits best first, and the contact sheet when asked for."""
    results = [
        {"rank": rank, "score": float(hit.score), "image_id": hit.image_id, "class": None if pd.isna(hit.class_name) else hit.class_name, "path": hit.full_path}
        for rank, hit in enumerate(hits.itertuples(), start=1)
    ]
    notes = [] if len(results) >= top_k else [f"{len(results)} results: the gallery holds {len(results)} images, fewer than the {top_k} asked for"]
    if out is not None:
        from pipeline.reporting.figures import contact_sheet  # matplotlib only when a sheet is asked for

        contact_sheet(hits, out, query_image=None if "image" not in query else Path(query["image"]), query_text=query.get("text"))
        notes.append(f"contact sheet -> {out}")
    document = {"query": query, "top_k": top_k, "metric": metric, "results": results, "contact_sheet": None if out is None else str(out)}
    _emit(as_json, document, results, notes)


TOP_K_OPTION = typer.Option(5, "--top-k", "-k", help="how many results")
SHEET_OPTION = typer.Option(None, "--out", help="write a contact sheet (PNG) of the query and its results")
SHEET_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def _metric(predictor: Predictor) -> Optional[str]:
    """What the scores are: the index metric (ip: cosine similarity, l2: squared distance)."""
    return None if predictor.index is None else predictor.index.info.get("metric")


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
    as_json: bool = JSON_OPTION,
) -> None:
    """Search the gallery (the pipeline's index plus added images) by text or by image."""
    if (text is None) == (image is None):
        raise PredictError("give exactly one of --text or --image")
    _check_sheet_path(out)
    predictor = ctx.obj.predictor()
    hits = predictor.search_text(text, top_k) if text is not None else predictor.similar(image, top_k)
    _show_hits(hits, {"text": text} if text is not None else {"image": str(image)}, top_k, as_json, out, _metric(predictor))


@app.command()
@user_errors_exit_cleanly
def verify(
    ctx: typer.Context,
    image1: Optional[Path] = typer.Argument(None, help="first image"),
    image2: Optional[Path] = typer.Argument(None, help="second image"),
    pairs: Optional[Path] = typer.Option(None, help="CSV with columns image1,image2 (a batch instead of two images); relative paths are from its folder"),
    out: Optional[Path] = typer.Option(None, help="where to write the batch results as CSV (default: stdout)"),
    threshold: Optional[float] = typer.Option(None, min=0.0, help="distance threshold, >= 0 (default: the one evaluate chose)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Are two images the same class / identity? Prints same or different, the distance, the threshold and P(same)."""
    if pairs is None and (image1 is None or image2 is None):
        raise PredictError("give two images, or --pairs pairs.csv")
    predictor = ctx.obj.predictor()
    # Said in the JSON so a script knows whether the decision rests on evaluate's choice (the
    # metrics file's verification.threshold) or on its own --threshold.
    source = {"threshold_source": "--threshold" if threshold is not None else "evaluate", "metrics": str(ctx.obj.path("metrics"))}
    if pairs is not None:
        if not pairs.is_file():
            raise FileNotFoundError(f"{pairs}: pairs file not found")
        results = predictor.verify_pairs(pd.read_csv(pairs), threshold, relative_to=pairs.parent)  # paths in it are the file's
        n_same = int(results["same"].sum())
        if out is not None:
            io.write_text(out, results.to_csv(index=False))
        if as_json:
            document = {"pairs": str(pairs), **source, "n_pairs": len(results), "n_same": n_same, "out": None if out is None else str(out)}
            _emit(True, document if out is not None else {**document, "results": results.to_dict("records")})
        elif out is None:
            typer.echo(results.to_csv(index=False), nl=False)  # CSV on stdout: already machine-readable
        else:
            typer.echo(f"{n_same} of {len(results)} pairs same -> {out}")
        return
    verdict = predictor.verify(image1, image2, threshold)
    document = {
        "image1": str(image1),
        "image2": str(image2),
        "distance": verdict.distance,
        # Embeddings are unit length, so the cosine similarity follows from the distance: 1 - d^2 / 2.
        "similarity": 1.0 - verdict.distance**2 / 2.0,
        "threshold": verdict.threshold,
        **source,
        "same": verdict.same,  # distance <= threshold
        "decision": "same" if verdict.same else "different",
        # Calibrated on the threshold split's pairs (metrics.json verification.calibration); None without a fit.
        "p_same": verdict.p_same,
    }
    p_same = "p(same) unknown (the metrics file has no calibration; rerun evaluate)" if verdict.p_same is None else f"p(same) {verdict.p_same:.2f}"
    line = f"{document['decision']}  distance {verdict.distance:.4f}  threshold {verdict.threshold:.4f}  {p_same}"
    _emit(as_json, document, notes=[line])  # one line says it better than a one-row table


@app.command()
@user_errors_exit_cleanly
def similar(
    ctx: typer.Context,
    query: Path = typer.Argument(..., help="query image"),
    top_k: int = TOP_K_OPTION,
    out: Optional[Path] = SHEET_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """The nearest images to QUERY, with their similarity scores (the same as search --image)."""
    _check_sheet_path(out)
    predictor = ctx.obj.predictor()
    _show_hits(predictor.similar(query, top_k), {"image": str(query)}, top_k, as_json, out, _metric(predictor))


@app.command()
@user_errors_exit_cleanly
def classify(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="image to classify"),
    labels: Optional[str] = typer.Option(None, help='comma-separated candidate labels, e.g. "cat,dog,car"'),
    classes_from_dataset: bool = typer.Option(False, "--classes-from-dataset", help="use the prepared dataset's classes (the default without --labels)"),
    top_k: int = TOP_K_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Zero-shot classification with the prompt-template ensemble; probabilities, most likely first."""
    if labels is not None and classes_from_dataset:
        raise PredictError("give --labels or --classes-from-dataset, not both")
    predictor = ctx.obj.predictor()
    predictions = predictor.classify(image, None if labels is None else labels.split(","), top_k)
    results = [{"rank": rank, **row} for rank, row in enumerate(predictions.to_dict("records"), start=1)]
    document = {
        "image": str(image),
        # Where the candidate labels came from, and the templates each was embedded with.
        "labels_from": "--labels" if labels is not None else "dataset",  # dataset: the prepared data's classes.json
        "templates": list(predictor.classes.templates),
        "results": results,
    }
    _emit(as_json, document, results)


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
    max_pixels: int = typer.Option(PIL_MAX_IMAGE_PIXELS, min=1, max=PIL_MAX_IMAGE_PIXELS, help="largest accepted image, in pixels (width x height); the default is the limit prepare and add apply"),
    max_labels: int = typer.Option(100, help="most zero-shot labels one request may name (requests run one at a time)"),
) -> None:
    """A web page for search, classification, verification and adding images."""
    from pipeline import web  # gradio only when the page is asked for

    web.one_malloc_arena()  # before the model loads and the first threads allocate
    web.serve(ctx.obj.predictor(), host, port, web.PageLimits(max_upload_mb, max_pixels, max_labels=max_labels))


def _warnings_for_people() -> None:
    """The library's warnings as one line each on stderr, `warning: ...` like the `error: ...` lines,
    without the logger's name. Added once; handlers already there (a test's log capture) stay."""
    root = logging.getLogger()
    if not any(isinstance(handler, _OneLineToStderr) for handler in root.handlers):
        root.addHandler(_OneLineToStderr(level=logging.WARNING))


class _OneLineToStderr(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        # sys.stderr as it is now, not when the handler was made: a test runner swaps it per command.
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


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
    _warnings_for_people()
    ctx.obj = Artifacts(ctx, dict(model=model, index=index, data=data, metrics=metrics, embeddings=embeddings), gallery, device)


if __name__ == "__main__":
    app()
