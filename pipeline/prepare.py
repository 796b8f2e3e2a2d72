"""Stage 1: raw dataset in its native format -> data/prepared/ (canonical tables + classes)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline import datasets
from pipeline.stage import PARAMS_OPTION, load_params, stage_app, timing_option, write_timing


def main(
    params_file: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("data/prepared"), help="output folder (replaced atomically)"),
    timing: Path = timing_option("prepare"),
) -> None:
    start = time.perf_counter()
    params = load_params(params_file).data
    dataset = datasets.prepare(params, out)
    write_timing(timing, {"prepare_s": round(time.perf_counter() - start, 3)})
    counts = dataset.images["split"].value_counts().to_dict()
    n_captions = 0 if dataset.captions is None else len(dataset.captions)
    typer.echo(
        f"prepared {params.source}: {len(dataset.images)} images {counts}, {n_captions} captions, "
        f"{len(dataset.classes)} classes, {sum(r['kind'] != 'note' for r in dataset.rejected)} rejected -> {out}"
    )


app = stage_app(main)

if __name__ == "__main__":
    app()
