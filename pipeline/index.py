"""Stage 4: FAISS index over the gallery images' embeddings -> artifacts/index/.

The embeddings are read shard by shard, never all at once: the metadata first (the id map, the
gallery's size, which rows are queries), then the vectors as often as the build needs them (a
training sample, the chunks to add, the exact neighbours recall is measured against). Peak memory
is the index, the training sample and one chunk.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from pipeline import io
from pipeline import params as params_lib
from pipeline.retrieval import factory as factory_lib
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
    source = embeddings / "images"
    meta = pd.concat([chunk for chunk, _ in io.iter_embeddings(source, with_vectors=False)], ignore_index=True)
    io.check_embedded_rows(meta, "image_id", embeddings, "images")
    in_gallery = meta["split"].isin(params.gallery_splits).to_numpy()
    if not in_gallery.any():
        raise params_lib.ParamsError(f"index.gallery_splits {params.gallery_splits}: no embedded images in these splits")
    gallery_meta, n = meta[in_gallery], int(in_gallery.sum())
    gallery = rows_reader(source, in_gallery)

    is_query = (meta["split"] == params.query_split).to_numpy()
    if not is_query.any():
        is_query = in_gallery  # no held-out split: measure on the gallery itself
    queries = np.concatenate(list(rows_reader(source, at_most(is_query, faiss_index.MAX_QUALITY_QUERIES))()))
    dim = queries.shape[1]

    factory, search_params, chosen = params.factory, params.search_params, {}
    if params.factory == factory_lib.AUTO:
        choice = factory_lib.choose_factory(n, dim, params.metric)
        factory = choice.factory
        search_params = factory_lib.auto_search_params(choice, params.search_params, n, dim, params.metric)
        chosen = {"factory_chosen": choice.factory, "factory_reason": choice.reason}
    index, build_s = faiss_index.build_from_chunks(gallery, n, dim, factory, params.metric, params.seed)
    faiss_index.apply_search_params(index, search_params)

    quality = faiss_index.ann_quality(index, gallery(), queries, params.metric, k=10)
    qps = quality.pop("qps")
    info = {
        "factory": params.factory,
        **chosen,
        "metric": params.metric,
        # What the index searches with (`faiss_index.load` applies it); under auto, auto's own
        # with index.search_params's in their place, which `search_params_given` keeps.
        "search_params": search_params,
        **({"search_params_given": params.search_params} if chosen else {}),
        "n": int(index.ntotal),
        "dim": int(dim),
        "gallery_splits": params.gallery_splits,
        **quality,
    }
    with io.atomic_dir(out) as tmp:
        faiss_index.save(tmp, index, gallery_meta, info)
    write_timing(timing, {"build_s": round(build_s, 4), "qps": qps, "index_s": round(time.perf_counter() - start, 3)})
    typer.echo(
        f"index {factory}{' (auto)' if chosen else ''}: {info['n']} vectors, built in {build_s:.3f}s, "
        f"recall@10 vs exact {quality['recall@10']:.3f}, {qps} queries/s -> {out}"
    )


def rows_reader(source: Path, keep: np.ndarray) -> faiss_index.Chunks:
    """Reads the vectors of the rows where `keep` (one flag per embedded image) is set, chunk by chunk, each time it is called."""

    def read():
        start = 0
        for _, vectors in io.iter_embeddings(source):
            yield vectors[keep[start : start + len(vectors)]]
            start += len(vectors)

    return read


def at_most(flags: np.ndarray, limit: int) -> np.ndarray:
    """`flags` with at most `limit` set, evenly spaced among the set ones (all of them when there are fewer)."""
    rows = np.flatnonzero(flags)
    if len(rows) <= limit:
        return flags
    kept = np.zeros_like(flags)
    kept[rows[np.linspace(0, len(rows) - 1, limit).round().astype(int)]] = True
    return kept


app = stage_app(main)

if __name__ == "__main__":
    app()
