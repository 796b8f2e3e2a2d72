"""The fast input path (pipeline.pixels): it must give the model exactly what open_clip's own
transforms give, and the decoded-image cache must change speed only, never a sample."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

from pipeline.datasets import prepare, write_pixel_store
from pipeline.images import PIXEL_STORE, StoredPixels, image_refs, load_rgb
from pipeline.models import create_model
from pipeline.models.encode import PreprocessedImages, StoreBatches, encode_images, image_loader
from pipeline.params import DataParams
from pipeline.prepared import load_prepared
from pipeline.pixels import DecodedImages, Normalise, split_transform, resized_crop_box
from pipeline.training.augment import augmented
from pipeline.training.clip import ImageCaptionPairs


@pytest.fixture(scope="module")
def loaded():
    return create_model("clipline-tiny", "none", "cpu")


def _images(folder, sizes=((64, 64), (80, 50), (33, 97))) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_eval_batches_are_bit_identical_to_open_clips_preprocess(loaded, tmp_path):
    paths = _images(tmp_path)
    sample, normalise = split_transform(loaded.preprocess)
    assert sample.to_uint8 and not sample.needs_torch_rng
    for path in paths:
        image = Image.open(path).convert("RGB")
        expected = loaded.preprocess(image)
        pixels = sample(image)
        assert pixels.dtype == torch.uint8
        assert torch.equal(normalise(pixels[None])[0], expected)
    # Through the loader the stages use, batched, and preprocessed once and kept.
    kept = PreprocessedImages(loaded, paths, batch_size=2, max_mb=100)
    assert kept.pixels is not None
    streamed = list(image_loader(loaded, paths, batch_size=2))
    assert all(torch.equal(a, b) for a, b in zip(kept, streamed))
    assert not PreprocessedImages(loaded, paths, batch_size=2, max_mb=0).pixels


def test_train_transform_is_open_clips_crop_with_the_box_from_numpy(loaded):
    sample, normalise = split_transform(loaded.preprocess_train)
    crop = loaded.preprocess_train.transforms[0]
    assert isinstance(crop, transforms.RandomResizedCrop) and not sample.needs_torch_rng
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    box = resized_crop_box(np.random.default_rng(7), image.height, image.width, crop.scale, crop.ratio)
    ours = normalise(sample(image, np.random.default_rng(7))[None])[0]
    theirs = loaded.preprocess_train.transforms[-1](
        transforms.functional.to_tensor(transforms.functional.resized_crop(image, *box, crop.size, crop.interpolation, antialias=True))
    )
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="generator"):
        sample(image)


def test_crop_boxes_follow_torchvisions_distribution():
    rng = np.random.default_rng(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = np.array([resized_crop_box(rng, 120, 200, scale, ratio) for _ in range(4000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 120).all() and (left + w <= 200).all()
    torch.manual_seed(0)
    reference = np.array([transforms.RandomResizedCrop.get_params(torch.zeros(3, 120, 200), scale, ratio) for _ in range(4000)])
    ours, theirs = h * w / (120 * 200), reference[:, 2] * reference[:, 3] / (120 * 200)
    assert abs(ours.mean() - theirs.mean()) < 0.02
    assert abs(np.median(w / h) - np.median(reference[:, 3] / reference[:, 2])) < 0.05
    # No box fits a 1-pixel-high strip at these ratios: torchvision's central fallback.
    assert resized_crop_box(rng, 1, 50, (0.9, 1.0), ratio) == (0, math.floor((50 - round(1 * 4 / 3)) / 2), 1, round(4 / 3))


def test_other_random_steps_keep_a_seeded_torch_rng(loaded):
    sample, normalise = split_transform(augmented(loaded.preprocess, True))  # flip + colour jitter in front
    assert sample.needs_torch_rng and sample.to_uint8
    assert isinstance(normalise, Normalise) and normalise.mean is not None
    # A step it does not know is assumed to draw from torch's RNG, never run unseeded.
    blurred, _ = split_transform(transforms.Compose([transforms.GaussianBlur(3), *loaded.preprocess.transforms]))
    assert blurred.needs_torch_rng


def test_a_transform_that_cannot_be_split_is_kept_whole():
    whole = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3), transforms.RandomErasing()])
    sample, normalise = split_transform(whole)
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    out = sample(image)
    assert out.dtype == torch.float32 and torch.equal(normalise(out[None])[0], out)


def test_cached_and_streamed_training_samples_are_identical(loaded, tmp_path):
    paths = _images(tmp_path)
    sample, _ = loaded.train_pixels
    cached, streamed = DecodedImages(paths, max_mb=100), DecodedImages(paths, max_mb=0)
    assert cached.cached and not streamed.cached and "runtime.image_cache_mb" in streamed.reason
    captions = [["a", "b"], ["c"], ["d", "e", "f"]]
    a = ImageCaptionPairs(cached, captions, loaded.tokenizer, sample, seed=3)
    b = ImageCaptionPairs(streamed, captions, loaded.tokenizer, sample, seed=3)
    for epoch in (1, 2):
        a.epoch = b.epoch = epoch
        for i in range(len(paths)):
            (pa, ta), (pb, tb) = a[i], b[i]
            assert torch.equal(pa, pb) and torch.equal(ta, tb)
    a.epoch = 1
    first = a[0][0]
    a.epoch = 2
    assert not torch.equal(first, a[0][0])  # a new crop each epoch


def test_the_cache_gives_up_when_images_turn_out_larger_than_estimated(tmp_path):
    small = [tmp_path / f"s{i}.png" for i in range(40)]
    for path in small:
        Image.new("RGB", (4, 4)).save(path)
    big = tmp_path / "big.png"
    Image.new("RGB", (1500, 1500)).save(big)
    # The header probe reads 32 evenly spaced files of 41: put the big one where it does not look.
    unseen = min(set(range(41)) - set(np.linspace(0, 40, 32).astype(int)))
    refs = small[:unseen] + [big] + small[unseen:]
    assert DecodedImages.estimated_mb(refs) < 1
    decoded = DecodedImages(refs, max_mb=1)
    assert not decoded.cached and "passed runtime.image_cache_mb" in decoded.reason
    assert decoded[unseen].size == (1500, 1500)  # still readable, from disk


def _prepare_synthetic(out, image_size=32, **data):
    synthetic = {"n_classes": 3, "images_per_class": 6, "extra_test_per_class": 2, "image_size": image_size}
    prepare(DataParams(synthetic=synthetic, splits={"train": 0.5, "val": 0.25, "test": 0.25}, **data), out)
    return load_prepared(out)


def test_prepare_keeps_the_decoded_images_and_later_stages_read_them_instead_of_files(loaded, tmp_path):
    prepared = _prepare_synthetic(tmp_path / "prepared")
    store = np.load(tmp_path / "prepared" / PIXEL_STORE)
    assert store.shape == (len(prepared.images), 32, 32, 3) and store.dtype == np.uint8
    files = image_refs(prepared.images, prepared.image_root)
    for row, path in enumerate(files):
        assert np.array_equal(store[row], np.asarray(Image.open(path).convert("RGB")))
    # A subset, renumbered as the stages renumber it, still finds its own rows (by image_id).
    test = prepared.images[prepared.images["split"] == "test"].reset_index(drop=True)
    refs = prepared.image_paths(test)
    assert all(isinstance(r, StoredPixels) for r in refs)
    assert [str(r) for r in refs] == [str(prepared.image_root / p) for p in test["path"]]  # errors and figures name the file
    assert all(np.array_equal(np.asarray(load_rgb(r)), np.asarray(load_rgb(f))) for r, f in zip(refs, image_refs(test, prepared.image_root)))
    # Same embeddings, to the bit, as from the files: resized from 32 px here, through the DataLoader...
    assert not isinstance(image_loader(loaded, refs, 4), StoreBatches)
    assert np.array_equal(encode_images(loaded, refs, batch_size=4), encode_images(loaded, image_refs(test, prepared.image_root), batch_size=4))
    # ... and at the model's own 64 px, sliced straight from the store, in any row order.
    native = _prepare_synthetic(tmp_path / "native", image_size=64)
    rows = native.images.sample(frac=1, random_state=0)
    refs = native.image_paths(rows)
    assert isinstance(image_loader(loaded, refs, 4), StoreBatches)
    files = image_refs(rows, native.image_root)
    assert all(torch.equal(a, b) for a, b in zip(image_loader(loaded, refs, 4), image_loader(loaded, files, 4)))
    assert np.array_equal(encode_images(loaded, refs, batch_size=4), encode_images(loaded, files, batch_size=4))


def test_no_pixel_store_without_the_decode_check_or_for_images_of_several_sizes(tmp_path):
    prepared = _prepare_synthetic(tmp_path / "unchecked", check_images=False)
    assert not (tmp_path / "unchecked" / PIXEL_STORE).exists()
    assert all(str(ref).endswith(".png") and not isinstance(ref, StoredPixels) for ref in prepared.image_paths())
    paths = _images(tmp_path)  # three sizes
    images = pd.DataFrame({"path": [p.name for p in paths]})
    assert not write_pixel_store(images, tmp_path, tmp_path / "mixed.npy")
    assert not (tmp_path / "mixed.npy").exists()
    same = images.iloc[[0, 0]]
    assert not write_pixel_store(same, tmp_path, tmp_path / "big.npy", max_mb=0.001)  # over the size limit
    assert write_pixel_store(same, tmp_path, tmp_path / "ok.npy") and np.load(tmp_path / "ok.npy").shape == (2, 64, 64, 3)
