"""Stage 1: raw dataset in its native format -> data/prepared/ (canonical tables + classes)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline import datasets, params as params_lib, preflight
from pipeline.stage import PARAMS_OPTION, stage_app


def main(
    params_file: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("data/prepared"), help="output folder (replaced atomically)"),
) -> None:
    everything = params_lib.load(params_file)
    # The first stage checks the params of all of them, so a mistake fails in seconds. (Only
    # `data` is this stage's DVC params: the others are checked here, not used.)
    preflight.check(everything)
    params = everything.data
    dataset = datasets.prepare(params, out)
    counts = dataset.images["split"].value_counts().to_dict()
    n_captions = 0 if dataset.captions is None else len(dataset.captions)
    typer.echo(
        f"prepared {params.source}: {len(dataset.images)} images {counts}, {n_captions} captions, "
        f"{len(dataset.classes)} classes, {sum(r['kind'] != 'note' for r in dataset.rejected)} rejected -> {out}"
    )


app = stage_app(main)

if __name__ == "__main__":
    app()
