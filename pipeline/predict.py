"""A predictor loaded once from the pipeline's artifacts: verify pairs and find similar images.

    from pipeline.predict import Predictor
    predictor = Predictor.from_artifacts()            # artifacts/, data/prepared, reports/
    predictor.verify("a.jpg", "b.jpg")                # Verdict(same=True, distance=0.41, ...)
    predictor.similar("query.jpg", k=5)               # DataFrame of neighbours with scores

Distances are Euclidean between L2-normalised image embeddings, as in `evaluate`, so the
threshold that evaluate chose (reports/metrics.json, verification.threshold) applies directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from pipeline import io
from pipeline.datasets.base import DatasetError
from pipeline.metrics.verification import pair_distances
from pipeline.models import LoadedModel, load_trained
from pipeline.models.encode import encode_images
from pipeline.retrieval import faiss_index


class PredictError(ValueError):
    """A user request that cannot be answered; the message says why and what to do."""


@dataclass
class Verdict:
    same: bool
    distance: float
    threshold: float
    # Margin-based, in [0.5, 1]: how far the distance sits from the threshold relative to the
    # typical distance of its side on the threshold split. Not a calibrated probability.
    confidence: float


@dataclass
class Predictor:
    loaded: LoadedModel
    index: Optional[faiss_index.LoadedIndex]
    image_root: Path
    verification: dict

    @classmethod
    def from_artifacts(
        cls,
        model_dir: str | Path = "artifacts/model",
        index_dir: str | Path = "artifacts/index",
        data_dir: str | Path = "data/prepared",
        metrics_path: str | Path = "reports/metrics.json",
        device: str = "auto",
    ) -> "Predictor":
        loaded, _ = load_trained(model_dir, device)
        index = faiss_index.load(index_dir) if Path(index_dir, "index.faiss").exists() else None
        info = io.read_json(Path(data_dir) / "dataset.json") if Path(data_dir, "dataset.json").exists() else {"image_root": None}
        image_root = Path(data_dir) if info["image_root"] is None else Path(info["image_root"])
        metrics = io.read_json(metrics_path) if Path(metrics_path).exists() else {}
        return cls(loaded=loaded, index=index, image_root=image_root, verification=metrics.get("verification", {}))

    def embed(self, paths: Sequence[str | Path]) -> np.ndarray:
        for path in paths:
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

    def _confidence(self, distance: float, threshold: float, same: bool) -> float:
        typical = self.verification.get("mean_same_distance" if same else "mean_different_distance")
        if typical is None or abs(typical - threshold) < 1e-9:
            return 0.5
        return 0.5 + 0.5 * min(1.0, abs(distance - threshold) / abs(typical - threshold))

    def verify(self, image1: str | Path, image2: str | Path, threshold: Optional[float] = None) -> Verdict:
        row = self.verify_pairs(pd.DataFrame({"image1": [str(image1)], "image2": [str(image2)]}), threshold).iloc[0]
        return Verdict(bool(row["same"]), float(row["distance"]), float(row["threshold"]), float(row["confidence"]))

    def verify_pairs(self, pairs: pd.DataFrame, threshold: Optional[float] = None) -> pd.DataFrame:
        """`pairs` has columns image1, image2; returns them with same, distance, threshold, confidence."""
        missing = {"image1", "image2"} - set(pairs.columns)
        if missing:
            raise PredictError(f"pairs need columns image1 and image2; missing {sorted(missing)}")
        t = self.threshold(threshold)
        paths = pd.unique(pd.concat([pairs["image1"], pairs["image2"]]).astype(str))
        row = {path: i for i, path in enumerate(paths)}
        first = np.array([row[str(p)] for p in pairs["image1"]])
        second = np.array([row[str(p)] for p in pairs["image2"]])
        out = pairs.copy()
        # The distance evaluate chose the threshold on, so the two always agree.
        out["distance"] = pair_distances(self.embed(paths), first, second)
        out["same"] = out["distance"] <= t
        out["threshold"] = t
        out["confidence"] = [self._confidence(d, t, s) for d, s in zip(out["distance"], out["same"])]
        return out

    def similar(self, image: str | Path, k: int = 5) -> pd.DataFrame:
        """The k nearest gallery images (score = similarity per the index metric), best first."""
        if self.index is None:
            raise PredictError("no index found; run `dvc repro index`")
        if k < 1:
            raise PredictError(f"--top-k must be at least 1, got {k}")
        hits = self.index.search(self.embed([image]), k)[0]
        hits["full_path"] = [str(self.image_root / p) for p in hits["path"]]
        return hits
