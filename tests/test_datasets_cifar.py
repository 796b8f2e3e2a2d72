"""CIFAR-10 source: Python-pickle and binary batches, PNG round trip, and the restricted unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import cifar
from pipeline.images import StoredPixels, load_rgb
from pipeline.prepared import load_prepared
from pipeline.datasets import prepare as prepare_dataset
from pipeline.datasets.base import DEFAULT_TEMPLATES, DatasetError
from pipeline.params import DataParams

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 4  # 5 train batches x 4 = 20 train images: 2 per class


def fake_cifar(seed: int = 0):
    """(train batches [(data, labels)] x 5, test (data, labels)); data is N x 3072 uint8."""
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.repeat(np.arange(10), 2))
    train = [
        (rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8), train_labels[i * PER_BATCH : (i + 1) * PER_BATCH])
        for i in range(5)
    ]
    test = (rng.integers(0, 256, (3, 3072), dtype=np.uint8), np.array([9, 0, 4]))
    return train, test


def dump(path: Path, obj) -> None:
    # Protocol 2 with bytes keys: what the official (Python 2) batches look like.
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_py(folder: Path, train, test) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (data, labels) in enumerate(train, start=1):
        dump(
            folder / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": [int(v) for v in labels],
                b"data": data,
                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(len(labels))],
            },
        )
    data, labels = test
    dump(
        folder / "test_batch",
        {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in labels], b"data": data},
    )
    dump(
        folder / "batches.meta",
        {b"label_names": [n.encode() for n in NAMES], b"num_cases_per_batch": 10000, b"num_vis": 3072},
    )
    return folder


def write_bin(folder: Path, train, test) -> Path:
    folder.mkdir(parents=True, exist_ok=True)

    def records(data, labels):
        return np.concatenate([np.asarray(labels, np.uint8)[:, None], data], axis=1).tobytes()

    for i, (data, labels) in enumerate(train, start=1):
        (folder / f"data_batch_{i}.bin").write_bytes(records(data, labels))
    (folder / "test_batch.bin").write_bytes(records(*test))
    (folder / "batches.meta.txt").write_text("\n".join(NAMES) + "\n\n")
    return folder


def params(root: Path, **overrides) -> DataParams:
    return DataParams(**{**dict(source="cifar10", root=str(root), val_fraction=0.5, download=False), **overrides})


def as_image(row: np.ndarray) -> np.ndarray:
    return row.reshape(3, 32, 32).transpose(1, 2, 0)


def check_round_trip(ds, out_dir: Path, train, test) -> None:
    train_data = np.concatenate([d for d, _ in train])
    train_labels = np.concatenate([lab for _, lab in train])
    images = ds.images.set_index("image_id")
    assert len(images) == 23
    for i in range(len(train_data)):
        row = images.loc[f"train_{i + 1:05d}"]
        assert row["label"] == train_labels[i] and row["class_name"] == NAMES[train_labels[i]]
        assert row["path"] == f"images/cifar10/{row['split']}/train_{i + 1:05d}.png"
        assert np.array_equal(np.asarray(Image.open(out_dir / row["path"])), as_image(train_data[i]))
    for i, (pixels, label) in enumerate(zip(*test)):
        row = images.loc[f"test_{i + 1:05d}"]
        assert row["split"] == "test" and row["label"] == label
        assert np.array_equal(np.asarray(Image.open(out_dir / row["path"])), as_image(pixels))
    # val_fraction 0.5 of 2 images per class -> 1 train + 1 val per class.
    train_rows = ds.images[ds.images["image_id"].str.startswith("train_")]
    assert (train_rows.groupby(["label", "split"]).size() == 1).all()
    assert [c["name"] for c in ds.classes] == NAMES and ds.templates == DEFAULT_TEMPLATES
    assert ds.image_root == out_dir


@pytest.mark.parametrize("point_at_batches", [False, True])
def test_python_batches_round_trip(tmp_path, point_at_batches):
    train, test = fake_cifar()
    folder = write_py(tmp_path / "cifar" / "cifar-10-batches-py", train, test)
    out = tmp_path / "out"
    ds = cifar.prepare(params(folder if point_at_batches else folder.parent), out)
    check_round_trip(ds, out, train, test)


@pytest.mark.parametrize("point_at_batches", [False, True])
def test_binary_batches_round_trip(tmp_path, point_at_batches):
    train, test = fake_cifar(seed=1)
    folder = write_bin(tmp_path / "cifar" / "cifar-10-batches-bin", train, test)
    out = tmp_path / "out"
    ds = cifar.prepare(params(folder if point_at_batches else folder.parent), out)
    check_round_trip(ds, out, train, test)


def test_bad_shape_and_labels_name_the_file(tmp_path):
    train, test = fake_cifar()
    folder = write_py(tmp_path / "cifar-10-batches-py", train, test)
    dump(folder / "data_batch_2", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]})
    wrong_shape = r"data_batch_2: 'data' must be an N x 3072 uint8 array, got shape \(4, 100\)"
    with pytest.raises(DatasetError, match=wrong_shape):
        cifar.prepare(params(folder), tmp_path / "out")

    dump(folder / "data_batch_2", {b"data": train[1][0], b"labels": [0, 1, 2, 10]})
    with pytest.raises(DatasetError, match=r"data_batch_2: label 10 of image 3 is outside 0..9"):
        cifar.prepare(params(folder), tmp_path / "out")

    (folder / "data_batch_2").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError, match=r"data_batch_2: not a readable CIFAR pickle"):
        cifar.prepare(params(folder), tmp_path / "out")


def test_truncated_binary_batch_names_the_file(tmp_path):
    train, test = fake_cifar()
    folder = write_bin(tmp_path / "cifar-10-batches-bin", train, test)
    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"test_batch\.bin: size .* not a whole number of 3073-byte records"):
        cifar.prepare(params(folder), tmp_path / "out")


def test_missing_data_without_download_says_what_to_get(tmp_path):
    from torchvision.datasets import CIFAR10

    root = tmp_path / "cifar"
    with pytest.raises(DatasetError) as err:
        cifar.prepare(params(root), tmp_path / "out")
    message = str(err.value)
    assert CIFAR10.url in message and CIFAR10.tgz_md5 in message and str(root) in message


def test_download_uses_torchvision_url_and_md5(tmp_path, offline_downloads):
    from torchvision.datasets import CIFAR10

    with pytest.raises(DatasetError, match="downloading failed: URLError"):
        cifar.prepare(params(tmp_path / "cifar", download=True), tmp_path / "out")
    assert offline_downloads == [(CIFAR10.url, CIFAR10.tgz_md5)]


def test_prepare_writes_tables_that_load_back(tmp_path):
    train, test = fake_cifar()
    root = write_py(tmp_path / "cifar" / "cifar-10-batches-py", train, test).parent
    out = tmp_path / "prepared"
    prepare_dataset(params(root), out)
    prepared = load_prepared(out)

    assert prepared.info["source"] == "cifar10"
    assert prepared.info["image_root"] is None  # the PNGs live inside the prepared folder
    assert prepared.info["n_images_per_split"] == {"train": 10, "val": 10, "test": 3}
    assert prepared.image_root == out
    paths = prepared.image_files()
    assert all(p.is_file() for p in paths)
    first = prepared.images.index[prepared.images["image_id"] == "train_00001"][0]
    assert np.array_equal(np.asarray(Image.open(paths[first])), as_image(train[0][0][0]))
    # One size (32 x 32): prepare kept the decoded pixels, and the stages read the same values from them.
    stored = prepared.image_paths()[first]
    assert isinstance(stored, StoredPixels) and np.array_equal(np.asarray(load_rgb(stored)), as_image(train[0][0][0]))
    assert prepared.class_names == NAMES
