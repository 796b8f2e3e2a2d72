"""Retrieval within one labelled image set, as pytorch-metric-learning's AccuracyCalculator defines it.

Every image queries all the others (itself left out); a neighbour is relevant when it shares the
query's label, and R_q is how many such images there are. Queries with R_q == 0 ("lone" queries)
are left out of every metric, as in PML; unlike PML, which silently caps k at 1023, a neighbour list
shorter than R_q is an error here, because it would understate R-precision and MAP@R.
"""

from __future__ import annotations

import faiss
import numpy as np


def accuracy_at_r(neighbour_labels: np.ndarray, query_labels: np.ndarray, relevant_counts: np.ndarray) -> dict:
    """precision@1, R-precision and MAP@R from each query's ranked neighbour labels.

    neighbour_labels: (n_queries, k) labels of the nearest gallery items, best first, self excluded.
    relevant_counts: (n_queries,) R_q, gallery items sharing the query's label; k must be >= max R_q.
    MAP@R = mean over queries of (1/R_q) * sum_{i <= R_q} precision@i * relevant(i).
    With no query left (all R_q == 0) the metrics are 0.0, as PML returns, and n_queries says why.
    """
    neighbour_labels = np.asarray(neighbour_labels)
    query_labels = np.asarray(query_labels)
    relevant_counts = np.asarray(relevant_counts, dtype=np.int64)
    if neighbour_labels.ndim != 2 or len(neighbour_labels) != len(query_labels) or query_labels.shape != relevant_counts.shape:
        raise ValueError(
            f"expected neighbour_labels (n, k), query_labels (n,) and relevant_counts (n,), got "
            f"{neighbour_labels.shape}, {query_labels.shape} and {relevant_counts.shape}"
        )
    if (relevant_counts < 0).any():
        raise ValueError("relevant_counts must be >= 0")
    k = neighbour_labels.shape[1]
    max_r = int(relevant_counts.max(initial=0))
    if k < max_r:
        raise ValueError(f"{k} neighbours per query but a query has R = {max_r} relevant items; search with k >= {max_r}")

    kept = relevant_counts > 0
    n_queries = int(kept.sum())
    if n_queries == 0:
        return {"precision_at_1": 0.0, "r_precision": 0.0, "map_at_r": 0.0, "n_queries": 0}
    r = relevant_counts[kept]
    relevant = neighbour_labels[kept] == query_labels[kept][:, None]
    # Only the first R_q ranks count for R-precision and MAP@R.
    relevant_within_r = relevant & (np.arange(k)[None, :] < r[:, None])
    precision_at_i = np.cumsum(relevant_within_r, axis=1) / np.arange(1, k + 1)
    return {
        "precision_at_1": float(relevant[:, 0].mean()),
        "r_precision": float((relevant_within_r.sum(axis=1) / r).mean()),
        "map_at_r": float(((precision_at_i * relevant_within_r).sum(axis=1) / r).mean()),
        "n_queries": n_queries,
    }


def self_excluded_neighbours(
    embeddings: np.ndarray, labels: np.ndarray, k: int, metric: str = "l2"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of every row among the other rows: (neighbour labels (n, k), relevant counts (n,)).

    metric "l2" (IndexFlatL2) or "ip" (inner product); for L2-normalised embeddings both rank alike.
    The result feeds `accuracy_at_r`; pass k >= the largest class size - 1.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    n = len(embeddings)
    if embeddings.ndim != 2 or labels.shape != (n,):
        raise ValueError(f"expected embeddings (n, d) and labels (n,), got {embeddings.shape} and {labels.shape}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be between 1 and n - 1 = {n - 1} (each row's neighbours are the other rows), got {k}")
    if metric not in ("l2", "ip"):
        raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
    index = faiss.IndexFlatL2(embeddings.shape[1]) if metric == "l2" else faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    _, found = index.search(embeddings, k + 1)
    # Drop each row's own entry; with exact duplicates it need not come first, or even be in the
    # k + 1 returned, in which case the last (worst) neighbour is dropped instead.
    own = found == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True
    neighbours = found[~own].reshape(n, k)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return labels[neighbours], (counts[inverse] - 1).astype(np.int64)
