"""A predictor loaded once from the pipeline's artifacts: search, classify, verify, add.

    from pipeline.predict import Predictor
    predictor = Predictor.from_artifacts()            # artifacts/, data/prepared, reports/
    predictor.search_text("a red circle", k=5)        # DataFrame of gallery images with scores
    predictor.similar("query.jpg", k=5)               # the same, for an image query
    predictor.classify("photo.jpg", ["cat", "dog"])   # zero-shot probabilities, best first
    predictor.verify("a.jpg", "b.jpg")                # Verdict(same=True, distance=0.41, ...)
    predictor.add(["new/"])                           # embed new images into the gallery

Distances are Euclidean between L2-normalised image embeddings, as in `evaluate`, so the
threshold that evaluate chose (reports/metrics.json, verification.threshold) applies directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy.special import softmax

from pipeline import io
from pipeline.datasets.base import DEFAULT_TEMPLATES, DatasetError
from pipeline.errors import ArtifactError, PredictError  # noqa: F401 (callers import PredictError from here too)
from pipeline.metrics.classification import zero_shot_scores
from pipeline.metrics.verification import pair_distances, same_probability
from pipeline.models import LoadedModel, load_trained
from pipeline.models.encode import encode_class_prompts, encode_images, encode_texts
from pipeline.project import find_project_root
from pipeline.retrieval import faiss_index
from pipeline.retrieval.gallery import AddReport, Artifacts, Gallery

MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature here



def dataset_image_root(data_dir: Path, recorded: Optional[str]) -> Path:
    """Where the prepared rows' image paths start, absolute, so that every result path is one
    kind whatever the source: the prepared folder itself (None: generated images), or the
    source's root as params gave it. A relative one is the project's (prepare runs in the folder
    of dvc.yaml), wherever the command runs from."""
    if recorded is None:
        return data_dir.absolute()
    root = Path(recorded)
    if root.is_absolute():
        return root
    project = find_project_root(data_dir.absolute())
    return (project if project is not None else Path.cwd()) / root


@dataclass
class Verdict:
    same: bool
    distance: float
    threshold: float
    # P(same | distance), the logistic fit evaluate made on the threshold split's pairs
    # (metrics.json verification.calibration, with its calibration error on the test pairs);
    # None when the metrics file has no fit.
    p_same: Optional[float]


@dataclass
class DatasetClasses:
    """The prepared dataset's class names, prompt templates and (when embed made them) prompt embeddings."""

    names: list[str]
    templates: list[str]
    embeddings: Optional[np.ndarray] = None


@dataclass
class Predictor:
    loaded: LoadedModel
    index: Optional[faiss_index.LoadedIndex]  # the gallery: the pipeline's index plus added images
    gallery: Optional[Gallery]
    image_root: Path
    verification: dict
    classes: DatasetClasses

    @classmethod
    def from_artifacts(
        cls,
        model_dir: str | Path = "artifacts/model",
        index_dir: str | Path = "artifacts/index",
        data_dir: str | Path = "data/prepared",
        metrics_path: str | Path = "reports/metrics.json",
        device: str = "auto",
        embeddings_dir: str | Path = "artifacts/embeddings",
        gallery_dir: Optional[str | Path] = None,
    ) -> "Predictor":
        """Load everything once. The gallery defaults to `gallery/` beside the index folder."""
        loaded, model_info = load_trained(model_dir, device)
        info = io.read_json(Path(data_dir) / "dataset.json") if Path(data_dir, "dataset.json").exists() else {"image_root": None}
        image_root = dataset_image_root(Path(data_dir), info["image_root"])
        try:
            metrics = io.read_json(metrics_path) if Path(metrics_path).exists() else {}
        except ArtifactError as err:  # only verification reads it: search and classify go on
            metrics = {"verification": {"skipped": str(err)}}
        predictor = cls(
            loaded=loaded,
            index=None,
            gallery=None,
            image_root=image_root,
            verification=metrics.get("verification", {}),
            classes=_dataset_classes(Path(data_dir), Path(embeddings_dir), model_info),
        )
        if Path(index_dir, "index.faiss").exists():
            gallery_dir = (Path(index_dir).parent / "gallery" if gallery_dir is None else Path(gallery_dir)).absolute()
            predictor.gallery = Gallery(gallery_dir, Artifacts(Path(index_dir), Path(model_dir), image_root), predictor.embed)
            predictor.index = predictor.gallery.load()
        return predictor

    def embed(self, paths: Sequence[str | Path]) -> np.ndarray:
        for path in paths:
            if Path(path).is_dir():
                raise DatasetError(f"{path}: a folder, not an image file (`clipline add` takes folders)")
            if not Path(path).is_file():
                raise DatasetError(f"{path}: image file not found")
        return encode_images(self.loaded, list(paths), batch_size=64)

    def threshold(self, override: Optional[float] = None) -> float:
        if override is not None:
            return float(override)
        if "threshold" not in self.verification:
            why = self.verification.get("skipped", "reports/metrics.json has no verification results; run `dvc repro`")
            raise PredictError(f"no verification threshold to use ({why}); pass --threshold")
        return float(self.verification["threshold"])

    def p_same(self, distances: np.ndarray) -> np.ndarray:
        """P(same | distance) from evaluate's fit; NaN where the metrics file has none."""
        calibration = self.verification.get("calibration")
        if calibration is None:
            return np.full(len(distances), np.nan)
        return same_probability(distances, calibration)

    def verify(self, image1: str | Path, image2: str | Path, threshold: Optional[float] = None) -> Verdict:
        row = self.verify_pairs(pd.DataFrame({"image1": [str(image1)], "image2": [str(image2)]}), threshold).iloc[0]
        p_same = None if np.isnan(row["p_same"]) else float(row["p_same"])
        return Verdict(bool(row["same"]), float(row["distance"]), float(row["threshold"]), p_same)

    def verify_pairs(self, pairs: pd.DataFrame, threshold: Optional[float] = None, relative_to: Optional[Path] = None) -> pd.DataFrame:
        """`pairs` has columns image1, image2; returns them (as given) with distance, same, threshold,
        p_same. Relative image paths are read from `relative_to` when given (a pairs file's folder,
        as dataset lists are read), else from the current folder."""
        missing = {"image1", "image2"} - set(pairs.columns)
        if missing:
            raise PredictError(f"pairs need columns image1 and image2; missing {sorted(missing)}")
        t = self.threshold(threshold)

        def located(column: str) -> list[str]:
            return [str(p if relative_to is None or p.is_absolute() else Path(relative_to) / p) for p in map(Path, pairs[column].astype(str))]

        first_paths, second_paths = located("image1"), located("image2")
        paths = list(dict.fromkeys(first_paths + second_paths))
        row = {path: i for i, path in enumerate(paths)}
        first = np.array([row[p] for p in first_paths])
        second = np.array([row[p] for p in second_paths])
        out = pairs.copy()
        # The distance evaluate chose the threshold on, so the two always agree.
        out["distance"] = pair_distances(self.embed(paths), first, second)
        out["same"] = out["distance"] <= t
        out["threshold"] = t
        out["p_same"] = self.p_same(out["distance"].to_numpy())
        return out

    def similar(self, image: str | Path, k: int = 5) -> pd.DataFrame:
        """The k nearest gallery images to an image (score = similarity per the index metric), best first."""
        return self._search(self.embed([image]), k)

    def search_text(self, text: str, k: int = 5) -> pd.DataFrame:
        """The k gallery images that best match a text, best first."""
        self._require_shared_space("text search")
        if not text.strip():
            raise PredictError("the search text is empty")
        return self._search(encode_texts(self.loaded, [text]), k)

    def _search(self, query: np.ndarray, k: int) -> pd.DataFrame:
        if self.index is None:
            raise PredictError("no index found; run `dvc repro index`")
        if k < 1:
            raise PredictError(f"--top-k must be at least 1, got {k}")
        return self.index.search(query, k)[0]

    def classify(self, image: str | Path, labels: Optional[Sequence[str]] = None, k: int = 5) -> pd.DataFrame:
        """Zero-shot: probabilities over `labels` (default: the dataset's classes), best first, top k.

        Each label is embedded as the mean of its prompt-template ensemble (the dataset's templates),
        exactly as evaluate's zero-shot task does; probabilities are a softmax over the similarities
        scaled by the model's learned temperature.
        """
        self._require_shared_space("zero-shot classification")
        if k < 1:
            raise PredictError(f"--top-k must be at least 1, got {k}")
        names, class_emb = self._class_embeddings(labels)
        similarity = zero_shot_scores(self.embed([image]), class_emb)[0]
        scale = float(min(self.loaded.model.logit_scale.exp().item(), MAX_LOGIT_SCALE))
        probability = softmax(scale * similarity)
        order = np.argsort(-similarity, kind="stable")[:k]
        return pd.DataFrame({"label": [names[i] for i in order], "probability": probability[order], "similarity": similarity[order]})

    def _class_embeddings(self, labels: Optional[Sequence[str]]) -> tuple[list[str], np.ndarray]:
        if labels is None:
            if len(self.classes.names) < 2:
                raise PredictError("the prepared dataset has no classes to choose from; pass --labels")
            if self.classes.embeddings is None:  # embed's class prompts are missing or from another model
                self.classes.embeddings = encode_class_prompts(self.loaded, self.classes.names, self.classes.templates)
            return self.classes.names, self.classes.embeddings
        names = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
        if len(names) < 2:
            raise PredictError(f"zero-shot classification needs at least two different labels, got {names}")
        return names, encode_class_prompts(self.loaded, names, self.classes.templates)

    def _require_shared_space(self, what: str) -> None:
        if self.loaded.image_head is not None:
            raise PredictError(
                f"{what} needs images and texts in one embedding space, and this model's image projection head "
                "(train.method: triplet) was trained on images only; use image search (similar), or verify"
            )

    def add(self, paths: Sequence[str | Path], skip_bad: bool = False) -> AddReport:
        """Embed images (files, or folders searched recursively) into the gallery; see `retrieval.gallery`."""
        if self.gallery is None:
            raise PredictError("no index to add to; run `dvc repro index` first")
        report, self.index = self.gallery.add(paths, skip_bad)
        return report


def _dataset_classes(data_dir: Path, embeddings_dir: Path, model_info: dict) -> DatasetClasses:
    """Class names and templates from classes.json; prompt embeddings from embed when the same model made them."""
    if not (data_dir / "classes.json").exists():
        return DatasetClasses(names=[], templates=list(DEFAULT_TEMPLATES))
    classes = io.read_json(data_dir / "classes.json")
    names = [c["name"] for c in classes["classes"]]
    result = DatasetClasses(names=names, templates=classes.get("templates") or list(DEFAULT_TEMPLATES))
    embedded, embed_info = embeddings_dir / "classes.parquet", embeddings_dir / "embed.json"
    if embedded.exists() and embed_info.exists() and io.read_json(embed_info).get("model") == model_info:
        meta, vectors = io.read_embeddings(embedded)
        if list(meta["name"]) == names:
            result.embeddings = vectors
    return result
