"""CLIP training on class folders, where every image's captions are its class's prompts: the
validation score counts each prompt string once, so it keeps rising while the model learns and
the best checkpoint is a late one.

Counted per caption row, every validation prompt is shared by a class's images, its copies tie
with it, and the score stopped moving once the classes separated (on this data: 0.133 from epoch
12 of 20 on, best epoch 12; by content the same run rises to 0.99, best epoch 18)."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from pipeline import models
from pipeline.datasets import prepare
from pipeline.params import DataParams, TrainParams
from pipeline.prepared import load_prepared
from pipeline.training.clip import Validation, train_clip


def write_digit_folders(root, per_class: int, size: int = 64) -> None:
    """scikit-learn's handwritten digits (real 8x8 scans), dark on light, as root/<digit>/<n>.png."""
    digits = load_digits()
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for n, i in enumerate(np.flatnonzero(digits.target == label)[:per_class]):
            pixels = (255 - digits.images[i] * 16).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").resize((size, size), Image.NEAREST).save(root / str(label) / f"{n:03d}.png")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digit_folders(root / "raw", per_class=44)
    # Many validation images per class: 20 share each class's 5 prompts.
    prepare(DataParams(source="folder", root=str(root / "raw"), splits={"train": 0.5, "val": 0.45, "test": 0.05}), root / "prepared")
    return load_prepared(root / "prepared")


def test_validation_counts_each_class_prompt_once(digits):
    loaded = models.create_model(models.TINY_MODEL, "none", "cpu")
    validation = Validation(loaded, digits)
    matches = validation.matches
    assert matches.n_images == 200 and matches.n_texts == 200 * 5  # 20 a class, 5 templates each
    assert matches.counts()["image_to_text"]["n_candidates"] == 50  # 10 classes x 5 templates
    assert len(validation.tokens) == 50  # each string tokenised (and encoded) once


def test_clip_on_class_folders_selects_a_late_checkpoint(digits):
    torch.manual_seed(0)
    loaded = models.create_model(models.TINY_MODEL, "none", "cpu")
    epochs = 14
    result = train_clip(loaded, digits, TrainParams(method="clip", epochs=epochs, batch_size=32))
    scores = {row["epoch"]: row["mean_recall"] for row in result.val_rows}
    assert result.best_epoch >= epochs * 2 // 3, scores
    assert scores[result.best_epoch] > scores[3] + 0.3, scores  # it kept rising well past the first few
    best = next(row for row in result.val_rows if row["epoch"] == result.best_epoch)
    assert best["image_to_text_R@1"] > 0.5  # the image's own class prompt first among 50: chance 0.1
