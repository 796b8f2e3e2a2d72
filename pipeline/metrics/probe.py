"""Nearest-neighbour classification at a probe point, with encoder and index-query time apart.

Gallery: train-split features in a FAISS index. Queries: test images, classified by a k-NN vote.
Times are per image over the whole query split, warm-up excluded and CUDA synchronised, so the
trade-off between depth, accuracy and time is measured rather than guessed.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import faiss
import numpy as np
import torch

from pipeline.models.encode import autocast


def knn_vote(neighbour_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(queries, classes) vote scores; a tie goes to the class whose first vote ranks higher."""
    n, k = neighbour_labels.shape
    scores = np.zeros((n, n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(n), k)
    # One vote each, plus a tiny bonus for closer neighbours that only ever breaks ties.
    np.add.at(scores, (rows, neighbour_labels.reshape(-1)), 1.0 + 1e-6 * np.tile(np.arange(k, 0, -1), n))
    return scores


def topk_from_scores(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    order = np.argsort(-scores, axis=1, kind="stable")  # equal scores: lower class index first
    return {f"top{k}": float(np.mean((order[:, :k] == labels[:, None]).any(axis=1))) for k in ks if k == 1 or k < scores.shape[1]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_features(encode: Callable, batches: Iterable[torch.Tensor], device: torch.device) -> tuple[np.ndarray, float]:
    """Features of all batches and the seconds spent inside `encode` only (decoding is not timed).

    The first batch also runs once untimed before its timed run (allocator, kernels, caches).
    """
    out, elapsed = [], 0.0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        if i == 0:
            with autocast(device):
                encode(batch)
        _sync(device)
        start = time.perf_counter()
        with autocast(device):
            features = encode(batch)
        _sync(device)
        elapsed += time.perf_counter() - start
        out.append(features.float().cpu())
    return torch.cat(out).numpy(), elapsed


def normalise(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_probe(
    gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray, n_classes: int, k: int, metric: str
) -> dict:
    """k-NN vote classification; returns top-1/top-5, per-query top-1 similarity and correctness, query time."""
    if metric == "cosine":
        gallery, queries = normalise(gallery), normalise(queries)
        index = faiss.IndexFlatIP(gallery.shape[1])
    else:
        index = faiss.IndexFlatL2(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    index.search(queries[:1], k)  # warm-up
    start = time.perf_counter()
    scores, rows = index.search(queries, k)
    query_s = time.perf_counter() - start
    votes = knn_vote(gallery_labels[rows], n_classes)
    result = topk_from_scores(votes, query_labels)
    predicted = votes.argmax(axis=1)
    return {
        **result,
        "query_s": query_s,
        "top1_similarity": scores[:, 0] if metric == "cosine" else -scores[:, 0],
        "correct": predicted == query_labels,
    }
