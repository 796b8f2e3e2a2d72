"""Cross-modal retrieval Recall@K as the CLIP papers (and CLIP_benchmark) define it, with a
candidate counted once per content.

text -> image: every caption row is a query; a hit when a correct image is in the top K.
image -> text: every image row is a query; a hit when a correct caption is in the top K.

A candidate is its content (`ContentMatches`): identical caption strings are one caption, and images
with one content hash (identical decoded pixels, recorded by `prepare`: a copied or re-encoded file
is the same image) are one image. So a caption's correct images are every image that carries that
exact string, and their identical copies; an image's correct captions are the distinct strings
attached to it or to an identical copy. Retrieving "a small orange circle on a white background" for
an image captioned exactly so is a correct answer, whichever image the dataset happened to attach
that copy of the string to. Where nothing repeats, every row is its own candidate and the numbers
are CLIP_benchmark's `recall_at_k` (the tests check this against the package).

Ties never help the model: a query's rank is the number of OTHER distinct candidates scoring at
least as high as its best correct one, and a hit at K needs rank < K. So a collapsed image tower
(every image embedding equal) gets text -> image R@K = 0 for K below the number of distinct
images, and image -> text no better than an image-blind ranking of the captions. Ties are exact
float equality; bitwise-identical embeddings are scored once (`dot_scores`), so they always tie,
also when they belong to different contents (two captions that differ only past the tokenizer's
context length are two candidates with one embedding: a tie, against the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from pipeline.metrics.classification import distinct_rows, dot_scores

_CHUNK = 1024  # queries per similarity block, to bound memory on large galleries


@dataclass(frozen=True)
class ContentMatches:
    """Which captions and images are one candidate, and which caption contents fit which images.

    text_image: (T,) row of each caption's image. text_content: (T,) the caption's distinct
    string, 0..S-1. image_content: (I,) the image's distinct content, 0..C-1. Numbered in order
    of first appearance, so with nothing repeated both are 0..n-1 in row order.
    """

    text_image: np.ndarray
    text_content: np.ndarray
    image_content: np.ndarray

    @classmethod
    def build(cls, text_image, captions: Sequence[str], image_keys: Sequence) -> "ContentMatches":
        """From each caption's image row, the caption strings and each image's content key (the
        `content_hash` of images.parquet)."""
        text_image = np.asarray(text_image, dtype=np.int64)
        if len(captions) != len(text_image):
            raise ValueError(f"{len(captions)} caption strings for {len(text_image)} captions")
        text_content = pd.factorize(pd.Series(list(captions), dtype=object))[0]
        image_content = pd.factorize(pd.Series(list(image_keys), dtype=object))[0]
        if (text_content < 0).any() or (image_content < 0).any():
            raise ValueError("a caption string or an image content key is missing (None/NaN)")
        return cls._checked(text_image, text_content, image_content)

    @classmethod
    def distinct(cls, text_image, n_images: int) -> "ContentMatches":
        """Every caption and every image its own content: nothing repeats."""
        text_image = np.asarray(text_image, dtype=np.int64)
        return cls._checked(text_image, np.arange(len(text_image)), np.arange(n_images))

    @classmethod
    def _checked(cls, text_image: np.ndarray, text_content: np.ndarray, image_content: np.ndarray) -> "ContentMatches":
        n_images = len(image_content)
        if len(text_image) and (text_image.min() < 0 or text_image.max() >= n_images):
            raise ValueError(f"caption->image links must lie in [0, {n_images}), got {text_image.min()}..{text_image.max()}")
        return cls(text_image, np.asarray(text_content, dtype=np.int64), np.asarray(image_content, dtype=np.int64))

    @property
    def n_texts(self) -> int:
        return len(self.text_image)

    @property
    def n_images(self) -> int:
        return len(self.image_content)

    @property
    def n_distinct_texts(self) -> int:
        return int(self.text_content.max()) + 1 if self.n_texts else 0

    @property
    def n_distinct_images(self) -> int:
        return int(self.image_content.max()) + 1 if self.n_images else 0

    def fits(self) -> sparse.csr_matrix:
        """(distinct captions, distinct images) bool: the caption is attached to an image of that content."""
        rows, cols = self.text_content, self.image_content[self.text_image]
        data = np.ones(len(rows), dtype=bool)
        matrix = sparse.csr_matrix((data, (rows, cols)), shape=(self.n_distinct_texts, self.n_distinct_images), dtype=bool)
        matrix.sum_duplicates()
        return matrix

    def counts(self) -> dict[str, dict[str, int]]:
        """Queries and distinct candidates behind each direction, for metrics.json."""
        return {
            "text_to_image": {"n_queries": self.n_texts, "n_candidates": self.n_distinct_images},
            "image_to_text": {"n_queries": self.n_images, "n_candidates": self.n_distinct_texts},
        }

    def merged(self) -> dict[str, int]:
        """How many caption rows repeat an earlier string, and image rows an earlier content."""
        return {"repeated_captions": self.n_texts - self.n_distinct_texts, "identical_images": self.n_images - self.n_distinct_images}


def _first_rows(content: np.ndarray) -> np.ndarray:
    """The first row of each content 0..n-1: the one whose embedding stands for the candidate."""
    return np.unique(content, return_index=True)[1]


def _ranks(queries: np.ndarray, candidates: np.ndarray, correct_of_query) -> np.ndarray:
    """For each query row, how many non-correct candidates score >= its best correct candidate.

    `correct_of_query(start, stop)` gives the (stop - start, candidates) bool block of correct ones.
    "Not strictly lower" counts ties (and NaNs) against the query."""
    scored = distinct_rows(candidates)
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), _CHUNK):
        sims = dot_scores(queries[start : start + _CHUNK], *scored)
        correct = correct_of_query(start, start + len(sims))
        best = np.where(correct, sims, -np.inf).max(axis=1)  # NaN when a correct one scores NaN: then all count
        ranks[start : start + len(sims)] = (~correct & ~(sims < best[:, None])).sum(axis=1)
    return ranks


@dataclass(frozen=True)
class RetrievalRanks:
    """Each query's rank (0 = a correct candidate scores strictly highest) in both directions."""

    text_to_image: np.ndarray  # (T,)
    image_to_text: np.ndarray  # (I,)

    def recall(self, ks: Iterable[int]) -> dict[str, dict[str, float]]:
        return {direction: {f"R@{k}": float(np.mean(ranks < k)) for k in ks} for direction, ranks in self._directions()}

    def curve(self, max_k: int) -> list[dict]:
        """Recall at every K in 1..max_k both ways, as rows for a DVC plot."""
        return [{"k": k, **{direction: float(np.mean(ranks < k)) for direction, ranks in self._directions()}} for k in range(1, max_k + 1)]

    def _directions(self):
        return (("text_to_image", self.text_to_image), ("image_to_text", self.image_to_text))


def retrieval_ranks(image_emb: np.ndarray, text_emb: np.ndarray, matches: ContentMatches) -> RetrievalRanks:
    """Ranks both ways. image_emb: (I, d) and text_emb: (T, d), compared by dot product
    (L2-normalise for cosine). Every image content needs >= 1 caption.

    A query scores with its own embedding; a candidate with the embedding of its content's first
    row (copies of one content embed alike, up to float rounding across batches)."""
    if len(matches.text_image) != len(text_emb):
        raise ValueError(f"{len(text_emb)} texts but {len(matches.text_image)} text->image links")
    if matches.n_images != len(image_emb):
        raise ValueError(f"{len(image_emb)} images but {matches.n_images} image content keys")
    if len(image_emb) == 0 or len(text_emb) == 0:
        raise ValueError("retrieval needs at least one image and one text")
    fits = matches.fits()
    if (fits.getnnz(axis=0) == 0).any():
        raise ValueError("every image needs at least one text for image->text recall")
    fits_t = fits.T.tocsr()
    image_candidates = image_emb[_first_rows(matches.image_content)]
    text_candidates = text_emb[_first_rows(matches.text_content)]
    t2i = _ranks(text_emb, image_candidates, lambda a, b: fits[matches.text_content[a:b]].toarray())
    i2t = _ranks(image_emb, text_candidates, lambda a, b: fits_t[matches.image_content[a:b]].toarray())
    return RetrievalRanks(t2i, i2t)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, matches: ContentMatches, ks: Iterable[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """Recall@K both ways (see `retrieval_ranks`)."""
    return retrieval_ranks(image_emb, text_emb, matches).recall(ks)


def recall_curve(image_emb: np.ndarray, text_emb: np.ndarray, matches: ContentMatches, max_k: int) -> list[dict]:
    """Recall at every K in 1..max_k both ways, as rows for a DVC plot."""
    return retrieval_ranks(image_emb, text_emb, matches).curve(max_k)


def oracle_embeddings(matches: ContentMatches) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of a model that knows which captions fit which images and nothing else: each
    caption is its string's one-hot vector, each image the normalised sum of the strings that fit
    its content. Its Recall@K is the best any model can score under these matches (1.0 unless a
    caption has no image, which `retrieval_ranks` refuses)."""
    fits = matches.fits().T.toarray().astype(np.float32)  # (distinct images, distinct captions)
    fits /= np.linalg.norm(fits, axis=1, keepdims=True).clip(min=1e-12)
    texts = np.eye(matches.n_distinct_texts, dtype=np.float32)[matches.text_content]
    return fits[matches.image_content], texts
