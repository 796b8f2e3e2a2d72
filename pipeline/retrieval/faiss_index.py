"""FAISS index build/search with a row -> image id map, and ANN quality against exact search.

Folder layout (artifacts/index/):
    index.faiss    the index
    ids.parquet    row -> image_id, path, split, label, class_name
    index.json     factory (and, for `auto`, the one chosen and why), metric, search params, size,
                   dimension, recall@10 vs exact search (times: reports/timing/index.json)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import faiss
import numpy as np
import pandas as pd
from faiss.contrib.exhaustive_search import knn_ground_truth

from pipeline import io
from pipeline.errors import ArtifactError, IndexBuildError  # noqa: F401 (callers import IndexBuildError from here too)
from pipeline.retrieval.factory import MAX_TRAIN_POINTS, METRICS, apply_search_params, check_factory_string, check_lists_fit

logger = logging.getLogger(__name__)
ADD_CHUNK_ROWS = 65_536  # vectors go into the index this many at a time, however they are sharded
MAX_QUALITY_QUERIES = 10_000  # ann_quality's queries: enough for a recall to 2 decimals, cheap to search exactly

Chunks = Callable[[], Iterable[np.ndarray]]  # reads the gallery's vectors again, in order, chunk by chunk


def build(vectors: np.ndarray, factory: str, metric: str = "ip", seed: int = 0) -> tuple[faiss.Index, float]:
    """Build (and train, where the factory needs it) an index over `vectors`; returns (index, seconds)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return build_from_chunks(lambda: [vectors], len(vectors), vectors.shape[1], factory, metric, seed)


def build_from_chunks(chunks: Chunks, n: int, dim: int, factory: str, metric: str = "ip", seed: int = 0) -> tuple[faiss.Index, float]:
    """`build` over vectors read chunk by chunk: `chunks()` yields the `n` vectors of `dim`, in order,
    each time it is called (once to sample the training points, once to add them all).

    Holds the index, one chunk and the training sample, never all vectors. Vectors are added
    ADD_CHUNK_ROWS at a time whatever the chunks' sizes, so the index does not depend on how the
    vectors were sharded (an HNSW graph depends on how they are split into `add` calls).
    """
    check_lists_fit(factory, n)
    start = time.perf_counter()
    check_factory_string(factory, dim, metric)
    index = faiss.index_factory(dim, factory, METRICS[metric])
    if not index.is_trained:
        index.train(train_sample(chunks, n, dim, seed))
    added = 0
    for block in fixed_size(chunks(), ADD_CHUNK_ROWS):
        index.add(block)
        added += len(block)
    if added != n:
        raise ValueError(f"expected {n} vectors, the chunks held {added}")
    return index, time.perf_counter() - start


def train_sample(chunks: Chunks, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Every vector when there are at most MAX_TRAIN_POINTS, else a seeded sample of that many, in
    the order `default_rng(seed).choice` draws them (as indexing the whole matrix with it would)."""
    if n <= MAX_TRAIN_POINTS:
        return next(fixed_size(chunks(), n))  # all of them, in one array
    chosen = np.random.default_rng(seed).choice(n, MAX_TRAIN_POINTS, replace=False)
    order = np.argsort(chosen)
    rows = chosen[order]
    sample = np.empty((MAX_TRAIN_POINTS, dim), dtype=np.float32)
    start = 0
    for chunk in chunks():
        lo, hi = np.searchsorted(rows, [start, start + len(chunk)])
        sample[order[lo:hi]] = chunk[rows[lo:hi] - start]
        start += len(chunk)
    return sample


def fixed_size(chunks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """The same vectors as contiguous float32 blocks of exactly `rows` rows (the last may be shorter).

    Every block is the same buffer, refilled: use each (`index.add` copies it) before taking the
    next. Memory then holds one block and one chunk, whatever the number of blocks.
    """
    block, filled = None, 0
    for chunk in chunks:
        chunk = _float32(chunk)
        while len(chunk):
            if block is None:
                block = np.empty((rows, chunk.shape[1]), dtype=np.float32)
            take = min(rows - filled, len(chunk))
            block[filled : filled + take] = chunk[:take]
            filled, chunk = filled + take, chunk[take:]
            if filled == rows:
                yield block
                filled = 0
    if filled:
        yield block[:filled]


def _float32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the top k per query; rows are -1 where fewer than k were found."""
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def exact_neighbours(vectors: np.ndarray | Iterable[np.ndarray], queries: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Rows of the exact top k of each query over `vectors` (a matrix, or chunks of one in order),
    found chunk by chunk (faiss.contrib's knn_ground_truth, on the CPU so the result never depends
    on a GPU's rounding)."""
    chunks = [vectors] if isinstance(vectors, np.ndarray) else vectors
    # Fixed-size blocks, as `build_from_chunks` adds them: the result does not depend on the sharding.
    # (A last block shorter than k is padded with the worst scores, which never outrank k real ones: k <= n.)
    _, rows = knn_ground_truth(_float32(queries), fixed_size(chunks, ADD_CHUNK_ROWS), k, metric_type=METRICS[metric], ngpu=0)
    return rows


def ann_quality(index: faiss.Index, vectors: np.ndarray | Iterable[np.ndarray], queries: np.ndarray, metric: str, k: int = 10) -> dict:
    """Recall@k of the index against exact search over the same vectors (the matrix, or its chunks
    in order: the whole gallery is never needed at once), and queries per second.

    Recall here is |ANN top-k ∩ exact top-k| / k: how much of the true neighbourhood the index finds.
    """
    k_used = min(k, index.ntotal)  # a gallery smaller than k is searched whole
    truth = exact_neighbours(vectors, queries, metric, k_used)
    start = time.perf_counter()
    _, found = search(index, queries, k_used)
    elapsed = time.perf_counter() - start
    return {
        f"recall@{k}": recall(found, truth),
        "qps": round(len(queries) / elapsed, 1) if elapsed > 0 else None,
        "n_queries": int(len(queries)),
    }


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k, for (queries, k) arrays of rows (-1: none found)."""
    hits = [len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size)


def stored_vectors(index: faiss.Index) -> np.ndarray:
    """Every vector the index holds, as it holds them (decoded, for compressed codes like PQ)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()  # IVF lists are not addressable by id without it
    return index.reconstruct_n(0, index.ntotal)


def exact_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k by brute force over `index`'s stored vectors, with the index's metric."""
    exact = faiss.IndexFlat(index.d, index.metric_type)
    exact.add(stored_vectors(index))
    return search(exact, queries, k)


def save(folder: Path, index: faiss.Index, ids: pd.DataFrame, info: dict) -> None:
    with io.atomic_path(folder / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    io.write_parquet(folder / "ids.parquet", ids.reset_index(drop=True))
    io.write_json(folder / "index.json", info)


@dataclass
class LoadedIndex:
    index: faiss.Index
    ids: pd.DataFrame
    info: dict

    def search(self, queries: np.ndarray, k: int) -> list[pd.DataFrame]:
        """Per query, the top-k rows of the id map with a `score` column, best first.

        A k above the index's size gives every vector. An approximate index can return fewer than
        that even when the gallery holds more (HNSW finds at most about efSearch candidates); then the
        query is answered by exact search over the index's stored vectors instead, with a warning,
        rather than silently cut short.
        """
        queries = np.atleast_2d(queries)
        scores, rows = search(self.index, queries, k)
        if (rows < 0).any():
            logger.warning(
                "%d results asked for, of %d vectors in the %s index, which found only %d for a query; answering by exact search",
                k, self.index.ntotal, self.info.get("factory_chosen", self.info.get("factory", "approximate")), int((rows >= 0).sum(axis=1).min()),
            )  # fmt: skip
            scores, rows = exact_search(self.index, queries, k)
        results = []
        for score_row, row_ids in zip(scores, rows):
            keep = row_ids >= 0
            hits = self.ids.iloc[row_ids[keep]].copy()
            hits["score"] = score_row[keep]
            results.append(hits.reset_index(drop=True))
        return results


def load(folder: str | Path = "artifacts/index") -> LoadedIndex:
    folder = Path(folder)
    if not (folder / "index.faiss").exists():
        raise FileNotFoundError(f"{folder / 'index.faiss'}: not found; run `dvc repro index`")
    info = io.read_json(folder / "index.json")
    try:
        index = faiss.read_index(str(folder / "index.faiss"))
    except RuntimeError as err:  # FAISS's message is a C++ traceback of its reader
        reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"{folder / 'index.faiss'}: not a readable FAISS index ({reason})", "rerun `dvc repro index`") from None
    ids = io.read_parquet_named(folder / "ids.parquet")
    # The three files are written together: any mismatch means one was replaced or damaged, and
    # searching would return rows of the id map that are not the vectors found.
    found = {"vectors in index.faiss": int(index.ntotal), "rows in ids.parquet": len(ids)}
    if "n" in info:
        found["n in index.json"] = int(info["n"])
    other_dim = "dim" in info and int(info["dim"]) != index.d
    if len(set(found.values())) > 1 or other_dim:
        sizes = ", ".join(f"{count} {what}" for what, count in found.items())
        dims = f"; dimension {index.d} in index.faiss, {info['dim']} in index.json" if other_dim else ""
        raise ArtifactError(f"{folder}: the index files do not fit together ({sizes}{dims})", "rerun `dvc repro index`")
    apply_search_params(index, info.get("search_params", ""))
    return LoadedIndex(index=index, ids=ids, info=info)
