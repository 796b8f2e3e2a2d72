"""The two metric-learning benchmarks' own parts: the digits class folders compare_methods and
metric_ablation train on, and the nearest-neighbour colour count behind the README's explanation
of precision@1 on the shapes."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import params as params_lib
from pipeline.datasets import prepare
from pipeline.prepared import load_prepared

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ablation():
    return _module("metric_ablation")


def test_digits_are_ten_class_folders_split_by_digit_as_the_readme_says(ablation, tmp_path):
    root = ablation.write_digits(tmp_path / "digits")
    assert sorted(p.name for p in root.iterdir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in root.rglob("*.png")) == 1797
    first = np.asarray(Image.open(next((root / "0").iterdir())))
    assert first.shape == (32, 32, 3) and first[0, 0].tolist() == [255, 255, 255]  # dark strokes on white

    raw = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    for override in [*ablation.OVERRIDES["digits"], f"data.root={root}"]:
        params_lib.apply_override(raw, override)
    prepare(params_lib.parse(raw).data, tmp_path / "prepared")
    images = load_prepared(tmp_path / "prepared").images
    classes = images.groupby("split")["class_name"].nunique().to_dict()
    assert classes == {"train": 6, "val": 2, "test": 2}
    assert images.groupby("class_name")["split"].nunique().max() == 1  # no digit in two splits


class _Prepared:
    """The two things neighbour_colours reads: the images table and where each image is."""

    def __init__(self, images, paths):
        self.images, self._paths = images, paths

    def image_paths(self, frame):
        return [self._paths[i] for i in frame.index]


def _square(path: Path, fill: tuple, background: tuple) -> Path:
    pixels = np.full((8, 8, 3), background, dtype=np.uint8)
    pixels[2:6, 2:6] = fill
    Image.fromarray(pixels).save(path)
    return path


def test_neighbour_colours_counts_shared_colours_and_precision_either_way(ablation, tmp_path):
    import pandas as pd

    red, blue, white, black = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
    colours = [(red, white), (red, white), (blue, black), (blue, white)]
    paths = [_square(tmp_path / f"{i}.png", fill, bg) for i, (fill, bg) in enumerate(colours)]
    images = pd.DataFrame({"split": ["test"] * 4, "label": [0, 0, 1, 2]})
    # Nearest neighbours: 0 <-> 1 (same colours, same class), 2 <-> 3 (other colours, other class).
    emb = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0], [0.1, 0.995]])
    found = ablation.neighbour_colours(_Prepared(images, paths), emb, "test")
    assert found["nn_same_colours"] == 0.5
    assert found["precision_at_1_same_colours"] == 1.0
    assert found["precision_at_1_other_colours"] == 0.0
    assert found["same_colours_by_chance"] == pytest.approx((1 / 3 + 1 / 3 + 0 + 0) / 4, abs=1e-4)
    assert ablation.fill_and_background(paths[2]) == (blue, black)


def test_mean_rows_average_each_dataset_and_method_over_its_seeds():
    compare = _module("compare_methods")
    rows = [
        {"dataset": "shapes", "method": m, "data_seed": seed, **{key: value for key in compare.KEYS}, "timing.train_s": 10.0 * seed}
        for m, values in (("none", (0.1, 0.2)), ("triplet", (0.3, 0.6)))
        for seed, value in zip((1, 2), values)
    ]
    means = {row["method"]: row for row in compare.mean_rows(rows)}
    assert set(means) == {"none", "triplet"} and means["none"]["data_seed"] == "mean of 2"
    assert means["none"]["metric_learning.map_at_r"] == pytest.approx(0.15)
    assert means["triplet"]["verification.accuracy"] == pytest.approx(0.45)
    assert means["triplet"]["timing.train_s"] == pytest.approx(15.0)
    rows[0]["metric_learning.map_at_r"] = None  # a run without the metric: no mean that hides it
    assert compare.mean_rows(rows)[0]["metric_learning.map_at_r"] is None
