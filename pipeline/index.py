"""Stage 4: FAISS index over the gallery images' embeddings -> artifacts/index/."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline import io
from pipeline import params as params_lib
from pipeline.retrieval import faiss_index
from pipeline.stage import EMBEDDINGS_OPTION, PARAMS_OPTION, load_params, stage_app, timing_option, write_timing


def main(
    params_file: Path = PARAMS_OPTION,
    embeddings: Path = EMBEDDINGS_OPTION,
    out: Path = typer.Option(Path("artifacts/index"), help="index folder (replaced atomically)"),
    timing: Path = timing_option("index"),
) -> None:
    start = time.perf_counter()
    params = load_params(params_file).index
    meta, vectors = io.read_embeddings(embeddings / "images")
    in_gallery = meta["split"].isin(params.gallery_splits).to_numpy()
    if not in_gallery.any():
        raise params_lib.ParamsError(f"index.gallery_splits {params.gallery_splits}: no embedded images in these splits")
    gallery, gallery_meta = vectors[in_gallery], meta[in_gallery]
    index, build_s = faiss_index.build(gallery, params.factory, params.metric, params.seed)
    faiss_index.apply_search_params(index, params.search_params)

    queries = vectors[(meta["split"] == params.query_split).to_numpy()]
    if len(queries) == 0:
        queries = gallery  # no held-out split: measure on the gallery itself
    quality = faiss_index.ann_quality(index, gallery, queries, params.metric, k=10)
    qps = quality.pop("qps")
    info = {
        "factory": params.factory,
        "metric": params.metric,
        "search_params": params.search_params,
        "n": int(index.ntotal),
        "dim": int(gallery.shape[1]),
        "gallery_splits": params.gallery_splits,
        **quality,
    }
    with io.atomic_dir(out) as tmp:
        faiss_index.save(tmp, index, gallery_meta, info)
    write_timing(timing, {"build_s": round(build_s, 4), "qps": qps, "index_s": round(time.perf_counter() - start, 3)})
    typer.echo(
        f"index {params.factory}: {info['n']} vectors, built in {build_s:.3f}s, "
        f"recall@10 vs exact {quality['recall@10']:.3f}, {qps} queries/s -> {out}"
    )


app = stage_app(main)

if __name__ == "__main__":
    app()
