"""FAISS index build/search with a row -> image id map, and ANN quality against exact search.

Folder layout (artifacts/index/):
    index.faiss    the index
    ids.parquet    row -> image_id, path, split, label, class_name
    index.json     factory, metric, size, dimension, recall@10 vs exact search (times: reports/timing/index.json)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from pipeline import io
from pipeline.errors import IndexBuildError  # noqa: F401 (callers import it from here too)
from pipeline.retrieval.factory import METRICS, apply_search_params, check_factory_string, check_lists_fit

logger = logging.getLogger(__name__)
MAX_TRAIN_POINTS = 200_000  # IVF/PQ quantisers train on a sample; more adds time, not quality



def build(vectors: np.ndarray, factory: str, metric: str = "ip", seed: int = 0) -> tuple[faiss.Index, float]:
    """Build (and train, where the factory needs it) an index over `vectors`; returns (index, seconds)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    check_lists_fit(factory, n)
    start = time.perf_counter()
    check_factory_string(factory, dim, metric)
    index = faiss.index_factory(dim, factory, METRICS[metric])
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if n <= MAX_TRAIN_POINTS else vectors[rng.choice(n, MAX_TRAIN_POINTS, replace=False)]
        index.train(sample)
    index.add(vectors)
    return index, time.perf_counter() - start


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the top k per query; rows are -1 where fewer than k were found."""
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def ann_quality(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, metric: str, k: int = 10) -> dict:
    """Recall@k of the index against exact search over the same vectors, and queries per second.

    Recall here is |ANN top-k ∩ exact top-k| / k: how much of the true neighbourhood the index finds.
    """
    exact = faiss.IndexFlat(vectors.shape[1], METRICS[metric])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    k_used = min(k, len(vectors))  # a gallery smaller than k is searched whole
    _, truth = exact.search(np.ascontiguousarray(queries, dtype=np.float32), k_used)
    start = time.perf_counter()
    _, found = search(index, queries, k_used)
    elapsed = time.perf_counter() - start
    hits = [len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth)]
    return {
        f"recall@{k}": float(np.sum(hits) / (k_used * len(queries))),
        "qps": round(len(queries) / elapsed, 1) if elapsed > 0 else None,
        "n_queries": int(len(queries)),
    }


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

        An approximate index can return fewer than k even when the gallery holds more (HNSW finds
        at most about efSearch candidates); then the query is answered by exact search over the
        index's stored vectors instead, with a warning, rather than silently cut short.
        """
        queries = np.atleast_2d(queries)
        scores, rows = search(self.index, queries, k)
        if (rows < 0).any():
            logger.warning(
                "the %s index returned fewer than the %d results asked for; answering by exact search over its %d vectors",
                self.info.get("factory", "approximate"), rows.shape[1], self.index.ntotal,
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
    index = faiss.read_index(str(folder / "index.faiss"))
    apply_search_params(index, info.get("search_params", ""))
    return LoadedIndex(index=index, ids=pd.read_parquet(folder / "ids.parquet"), info=info)
