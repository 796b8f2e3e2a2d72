"""Nearest-neighbour classification at a probe point, with encoder and index-query time apart.

Gallery: train-split features in a FAISS index. Queries: test images, classified by a k-NN vote.
Times are per image over the whole query split, warm-up excluded and CUDA synchronised, so the
trade-off between depth, accuracy and time is measured rather than guessed.

Ties: a tie never helps the model. Bitwise-identical gallery vectors are indexed once, so they
tie exactly (FAISS could score copies a few ulps apart), and gallery items at the same distance are
taken, and ordered, other classes than the query's first; so a collapsed model (every distance
equal) never gets its neighbours from the query's class by luck. Votes are scored exactly, a tied
vote going to the class whose nearest neighbour is closer, and top-K is ranked as in
`pipeline.metrics.classification`: the true class's rank counts every other class scoring at least
as high, so a true class with no votes is never a hit.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import faiss
import numpy as np
import torch

from pipeline.metrics.classification import distinct_rows, top_k_accuracy, true_class_rank
from pipeline.models.encode import autocast

_CELLS = 4_000_000  # queries x candidate items per block when picking neighbours, to bound memory


def knn_vote(neighbour_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(queries, classes) integer vote scores from each query's k neighbour labels, nearest first.

    A class with votes scores votes * (k + 1) + (k - rank of its nearest neighbour), ranks 0..k-1,
    and a class without votes scores 0: more votes always win, and a tie in votes goes to the
    class whose nearest neighbour is closer (no two classes share a rank, so no other ties).
    """
    neighbour_labels = np.asarray(neighbour_labels, dtype=np.int64)
    n, k = neighbour_labels.shape
    if neighbour_labels.size and (neighbour_labels.min() < 0 or neighbour_labels.max() >= n_classes):
        raise ValueError(f"neighbour labels must lie in [0, {n_classes})")
    cells = (np.arange(n)[:, None] * n_classes + neighbour_labels).reshape(-1)
    votes = np.bincount(cells, minlength=n * n_classes).reshape(n, n_classes)
    nearest = np.zeros((n, n_classes), dtype=np.int64)
    for rank in range(k - 1, -1, -1):  # farthest first, so each class ends with its nearest rank
        nearest[np.arange(n), neighbour_labels[:, rank]] = k - rank
    return votes * (k + 1) + nearest


def topk_from_scores(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Top-K accuracy of per-class scores, ranked as in `classification.top_k_accuracy`."""
    return top_k_accuracy(labels, scores, tuple(ks))


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


class _Groups:
    """Gallery items grouped by identical vector; each group's members sorted by (label, index),
    so the members of one class in a group are a contiguous run, found by binary search."""

    def __init__(self, group_of: np.ndarray, labels: np.ndarray, n_classes: int):
        n_groups = int(group_of.max()) + 1
        self.n_classes = n_classes
        self.members = np.lexsort((np.arange(len(labels)), labels, group_of))
        self.key = group_of[self.members] * n_classes + labels[self.members]  # non-decreasing
        self.start = np.searchsorted(self.key, np.arange(n_groups) * n_classes)
        self.size = np.bincount(group_of, minlength=n_groups)

    def kth_tied_with_last(self, groups: np.ndarray, distance: np.ndarray, k: int) -> np.ndarray:
        """Per query: does the group holding its k-th item tie with the last group listed?"""
        kth = np.argmax(np.cumsum(self.size[groups], axis=1) >= k, axis=1)
        return distance[np.arange(len(groups)), kth] == distance[:, -1]

    def first_k(self, groups: np.ndarray, distance: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
        """(queries, k) items of each query's listed groups (>= k items in all): nearest first, and
        at equal distance other classes than the query's (`labels`) first, then in list order.
        Each group offers its first k members of other classes and its first k of the query's
        class, as no more of either kind can be taken."""
        start = self.start[groups][..., None]  # (queries, groups, 1)
        run = groups * self.n_classes + labels[:, None]
        lo = np.searchsorted(self.key, run, side="left")[..., None] - start  # the query's class's run
        hi = np.searchsorted(self.key, run, side="right")[..., None] - start
        t = np.arange(k)
        other = np.where(t < lo, t, t + hi - lo)  # t-th member outside the run
        position = np.concatenate([other, lo + t], axis=-1)  # (queries, groups, 2k): other classes, then own
        usable = np.concatenate([other < self.size[groups][..., None], lo + t < hi], axis=-1)
        same = np.broadcast_to(np.arange(2 * k) >= k, position.shape)
        near = np.broadcast_to(distance[..., None], position.shape)
        items = self.members[start + np.where(usable, position, 0)]

        def flat(a):
            return a.reshape(len(groups), -1)

        # lexsort: primary key last, and stable, so equal keys keep the (group, member) order.
        order = np.lexsort((flat(same), flat(near), ~flat(usable)), axis=1)[:, :k]
        return np.take_along_axis(flat(items), order, axis=1)


def knn_neighbours(
    gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray, n_classes: int, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """(rows, first, query_s): each query's k nearest gallery rows under the tie rule, the score
    of the nearest one (similarity for cosine, squared distance for l2), and the seconds of the
    main FAISS search.

    FAISS's float32 scores depend in their last bits on how many threads its BLAS ran on, so the
    nearest one's score is computed again in float64, one dot product per query: the stored
    value is then the same on any number of cores.

    The index holds each distinct gallery vector once, and k (capped at the gallery size) items
    are drawn from the groups it returns. The timed search asks for k + 1 groups. Where the group
    holding the k-th item ties with the last one returned, more tied groups may lie beyond it,
    among which FAISS chose arbitrarily: those queries are searched again, untimed, with twice as
    many groups until the tie ends inside the list or every group is returned.
    """
    gallery_labels = np.asarray(gallery_labels, dtype=np.int64)
    query_labels = np.asarray(query_labels, dtype=np.int64)
    for name, labels in (("gallery", gallery_labels), ("query", query_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"{name} labels must lie in [0, {n_classes})")
    unique, group_of = distinct_rows(np.asarray(gallery, dtype=np.float32))
    groups = _Groups(group_of, gallery_labels, n_classes)
    if metric == "cosine":
        unique, queries = normalise(unique), normalise(queries)
        index = faiss.IndexFlatIP(unique.shape[1])
    else:
        index = faiss.IndexFlatL2(unique.shape[1])
    index.add(np.ascontiguousarray(unique, dtype=np.float32))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(gallery_labels))
    n_groups = index.ntotal

    def distance(scores):  # smaller is nearer, for either metric
        return -scores if metric == "cosine" else scores

    width = min(k + 1, n_groups)
    index.search(queries[:1], width)  # warm-up
    start = time.perf_counter()
    scores, found = index.search(queries, width)
    query_s = time.perf_counter() - start

    rows = np.empty((len(queries), k), dtype=np.int64)
    chunk = max(1, _CELLS // (width * 2 * k))
    for begin in range(0, len(queries), chunk):
        q = slice(begin, begin + chunk)
        rows[q] = groups.first_k(found[q], distance(scores[q]), query_labels[q], k)
    pending = np.flatnonzero(groups.kth_tied_with_last(found, distance(scores), k)) if width < n_groups else []
    while len(pending):
        width = min(2 * width, n_groups)
        chunk = max(1, _CELLS // (width * 2 * k))
        still_tied = []
        for begin in range(0, len(pending), chunk):
            q = pending[begin : begin + chunk]
            wider, found_q = index.search(queries[q], width)
            rows[q] = groups.first_k(found_q, distance(wider), query_labels[q], k)
            if width < n_groups:
                still_tied.append(q[groups.kth_tied_with_last(found_q, distance(wider), k)])
        pending = np.concatenate(still_tied) if still_tied else []
    return rows, _exact_scores(queries, unique[group_of[rows[:, 0]]], metric), query_s


def _exact_scores(queries: np.ndarray, nearest: np.ndarray, metric: str) -> np.ndarray:
    """Row by row: the similarity (cosine, on normalised rows) or squared distance (l2) of each
    query to its nearest gallery vector, summed in float64 by numpy (no threads), as float32."""
    queries, nearest = queries.astype(np.float64), nearest.astype(np.float64)
    if metric == "cosine":
        return np.einsum("ij,ij->i", queries, nearest).astype(np.float32)
    return np.einsum("ij,ij->i", queries - nearest, queries - nearest).astype(np.float32)


def knn_probe(
    gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray, n_classes: int, k: int, metric: str
) -> dict:
    """k-NN vote classification; returns top-1/top-5, per-query top-1 similarity and correctness, and
    the query time (the main FAISS search only, see `knn_neighbours`)."""
    rows, first, query_s = knn_neighbours(gallery, gallery_labels, queries, query_labels, n_classes, k, metric)
    query_labels = np.asarray(query_labels, dtype=np.int64)
    votes = knn_vote(np.asarray(gallery_labels, dtype=np.int64)[rows], n_classes)
    return {
        **topk_from_scores(votes, query_labels),
        "query_s": query_s,
        "top1_similarity": first if metric == "cosine" else -first,
        "correct": true_class_rank(query_labels, votes) == 0,
    }
