"""Cross-modal retrieval Recall@K as the CLIP papers (and CLIP_benchmark) define it.

text -> image: every caption is a query; a hit when its own image is in the top K.
image -> text: every image is a query; a hit when ANY of its captions is in the top K.

Ties: a tie never helps the model. A query's rank counts every competitor scoring at least as
high as its match: for text -> image the other images, for image -> text the texts of other images
(an image's other captions are matches too, not competitors) against its best caption. A hit at K
needs rank < K. So a collapsed image tower (every image embedding equal) gets text -> image
R@K = 0 for K < N rather than 1, and image -> text no better than any image-blind ranking of the
texts; without ties the numbers are CLIP_benchmark's. Ties are exact float equality;
bitwise-identical embeddings are scored once (`dot_scores`), so they always tie.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from pipeline.metrics.classification import distinct_rows, dot_scores

_CHUNK = 1024  # queries per similarity block, to bound memory on large galleries


def _ranks_text_to_image(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    images = distinct_rows(image_emb)
    ranks = np.empty(len(text_emb), dtype=np.int64)
    for start in range(0, len(text_emb), _CHUNK):
        sims = dot_scores(text_emb[start : start + _CHUNK], *images)
        rows = np.arange(len(sims))
        correct = sims[rows, text_image[start : start + _CHUNK]]
        # "Not strictly lower" counts ties (and NaNs) against the query; - 1 drops the match itself.
        ranks[start : start + len(sims)] = (~(sims < correct[:, None])).sum(axis=1) - 1
    return ranks


def _ranks_image_to_text(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    texts = distinct_rows(text_emb)
    ranks = np.empty(len(image_emb), dtype=np.int64)
    for start in range(0, len(image_emb), _CHUNK):
        sims = dot_scores(image_emb[start : start + _CHUNK], *texts)  # (images, texts)
        own = text_image[None, :] == np.arange(start, start + len(sims))[:, None]
        best_own = np.where(own, sims, -np.inf).max(axis=1)
        # Only other images' texts compete; a tie (or a NaN) with the best caption counts against it.
        ranks[start : start + len(sims)] = (~own & ~(sims < best_own[:, None])).sum(axis=1)
    return ranks


def recall_at_k(
    image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, ks: Iterable[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """Recall@K both ways.

    image_emb: (I, d) and text_emb: (T, d), compared by dot product (L2-normalise for cosine).
    text_image: (T,) index into image_emb of each text's image. Every image needs >= 1 text.
    """
    text_image = np.asarray(text_image, dtype=np.int64)
    if len(text_image) != len(text_emb):
        raise ValueError(f"{len(text_emb)} texts but {len(text_image)} text->image links")
    if len(image_emb) == 0 or len(text_emb) == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if np.setdiff1d(np.arange(len(image_emb)), text_image).size:
        raise ValueError("every image needs at least one text for image->text recall")
    t2i = _ranks_text_to_image(image_emb, text_emb, text_image)
    i2t = _ranks_image_to_text(image_emb, text_emb, text_image)
    return {
        "text_to_image": {f"R@{k}": float(np.mean(t2i < k)) for k in ks},
        "image_to_text": {f"R@{k}": float(np.mean(i2t < k)) for k in ks},
    }


def recall_curve(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, max_k: int) -> list[dict]:
    """Recall at every K in 1..max_k both ways, as rows for a DVC plot."""
    text_image = np.asarray(text_image, dtype=np.int64)
    t2i = _ranks_text_to_image(image_emb, text_emb, text_image)
    i2t = _ranks_image_to_text(image_emb, text_emb, text_image)
    return [
        {"k": k, "text_to_image": float(np.mean(t2i < k)), "image_to_text": float(np.mean(i2t < k))}
        for k in range(1, max_k + 1)
    ]
