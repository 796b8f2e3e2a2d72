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
from pipeline.datasets.base import DatasetError
from pipeline.datasets.cifar import CIFAR_TEMPLATES
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
    assert [c["name"] for c in ds.classes] == NAMES and ds.templates == CIFAR_TEMPLATES
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


# CIFAR-100: fine labels. CLIP's class names (openai/CLIP data/prompts.md); the files spell them with "_".
CLIP_CIFAR100 = [
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom", "oak tree", "orange", "orchid",
    "otter", "palm tree", "pear", "pickup truck", "pine tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf",
    "woman", "worm",
]  # fmt: skip
FINE_NAMES = [name.replace(" ", "_") for name in CLIP_CIFAR100]
COARSE_NAMES = [f"superclass_{i}" for i in range(20)]


def fake_cifar100(seed: int = 0):
    """(train (data, fine, coarse), test (data, fine, coarse)); 2 train images for each of 10 fine
    classes, among them 0 and 99; coarse labels deliberately unlike the fine ones."""
    rng = np.random.default_rng(seed)
    fine = rng.permutation(np.repeat(np.array([0, 1, 7, 30, 41, 47, 58, 83, 97, 99]), 2))
    train = (rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8), fine, (fine * 7 + 3) % 20)
    test_fine = np.array([99, 0, 41])
    test = (rng.integers(0, 256, (3, 3072), dtype=np.uint8), test_fine, (test_fine + 5) % 20)
    return train, test


def write_py100(folder: Path, train, test) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, fine, coarse) in (("train", train), ("test", test)):
        dump(
            folder / name,
            {
                b"filenames": [f"img_{j}.png".encode() for j in range(len(fine))],
                b"batch_label": f"{name}ing batch 1 of 1".encode(),
                b"fine_labels": [int(v) for v in fine],
                b"coarse_labels": [int(v) for v in coarse],
                b"data": data,
            },
        )
    dump(folder / "meta", {b"fine_label_names": [n.encode() for n in FINE_NAMES], b"coarse_label_names": [n.encode() for n in COARSE_NAMES]})
    return folder


def write_bin100(folder: Path, train, test) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, fine, coarse) in (("train", train), ("test", test)):
        labels = np.stack([np.asarray(coarse, np.uint8), np.asarray(fine, np.uint8)], axis=1)
        (folder / f"{name}.bin").write_bytes(np.concatenate([labels, data], axis=1).tobytes())
    (folder / "fine_label_names.txt").write_text("\n".join(FINE_NAMES) + "\n\n")
    (folder / "coarse_label_names.txt").write_text("\n".join(COARSE_NAMES) + "\n\n")
    return folder


def params100(root: Path, **overrides) -> DataParams:
    return params(root, **{"source": "cifar100", **overrides})


def check_round_trip_100(ds, out_dir: Path, train, test) -> None:
    images = ds.images.set_index("image_id")
    assert len(images) == len(train[1]) + len(test[1])
    for prefix, (data, fine, _) in (("train", train), ("test", test)):
        for i, (pixels, label) in enumerate(zip(data, fine)):
            row = images.loc[f"{prefix}_{i + 1:05d}"]
            assert row["label"] == label and row["class_name"] == CLIP_CIFAR100[label]  # fine, not coarse
            assert row["path"] == f"images/cifar100/{row['split']}/{prefix}_{i + 1:05d}.png"
            assert np.array_equal(np.asarray(Image.open(out_dir / row["path"])), as_image(pixels))
            assert (row["split"] == "test") == (prefix == "test")
    assert [c["name"] for c in ds.classes] == CLIP_CIFAR100
    assert ds.classes[1]["aliases"] == ["aquarium fish", "aquarium_fish"] and ds.classes[0]["aliases"] == ["apple"]
    assert ds.templates == CIFAR_TEMPLATES and ds.source == "cifar100"


@pytest.mark.parametrize("point_at_batches", [False, True])
def test_cifar100_python_batches_use_fine_labels(tmp_path, point_at_batches):
    train, test = fake_cifar100()
    folder = write_py100(tmp_path / "cifar" / "cifar-100-python", train, test)
    out = tmp_path / "out"
    ds = cifar.prepare(params100(folder if point_at_batches else folder.parent), out)
    check_round_trip_100(ds, out, train, test)


@pytest.mark.parametrize("point_at_batches", [False, True])
def test_cifar100_binary_records_use_the_second_label_byte(tmp_path, point_at_batches):
    train, test = fake_cifar100(seed=1)
    folder = write_bin100(tmp_path / "cifar" / "cifar-100-binary", train, test)
    out = tmp_path / "out"
    ds = cifar.prepare(params100(folder if point_at_batches else folder.parent), out)
    check_round_trip_100(ds, out, train, test)


def test_cifar100_label_out_of_range_and_missing_key(tmp_path):
    train, test = fake_cifar100()
    folder = write_py100(tmp_path / "cifar-100-python", train, test)
    data, fine, coarse = test
    dump(folder / "test", {b"data": data, b"fine_labels": [99, 100, 0], b"coarse_labels": [int(c) for c in coarse]})
    with pytest.raises(DatasetError, match=r"cifar-100-python/test: label 100 of image 1 is outside 0..99"):
        cifar.prepare(params100(folder), tmp_path / "out")
    dump(folder / "test", {b"data": data, b"labels": [int(f) for f in fine]})  # CIFAR-10's key
    with pytest.raises(DatasetError, match=r"cifar-100-python/test: no 'fine_labels' entry"):
        cifar.prepare(params100(folder), tmp_path / "out")

    folder = write_bin100(tmp_path / "cifar-100-binary", train, test)
    records = bytearray((folder / "train.bin").read_bytes())
    records[1 + 3 * 3074] = 100  # the fine byte of the fourth record
    (folder / "train.bin").write_bytes(bytes(records))
    with pytest.raises(DatasetError, match=r"train\.bin: label 100 of image 3 is outside 0..99"):
        cifar.prepare(params100(folder), tmp_path / "out")
    (folder / "train.bin").write_bytes(bytes(records[:-1]))
    with pytest.raises(DatasetError, match=r"train\.bin: size \d+ bytes is not a whole number of 3074-byte records"):
        cifar.prepare(params100(folder), tmp_path / "out")


def test_cifar100_names_file_with_the_wrong_count(tmp_path):
    train, test = fake_cifar100()
    folder = write_bin100(tmp_path / "cifar-100-binary", train, test)
    (folder / "fine_label_names.txt").write_text("\n".join(COARSE_NAMES))
    with pytest.raises(DatasetError, match=r"fine_label_names\.txt: expected 100 class names, found 20"):
        cifar.prepare(params100(folder), tmp_path / "out")


class _RunsShell:
    """Unpickling this would run a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"echo pwned > {self.marker}",))


def test_cifar100_unpickler_refuses_a_malicious_batch(tmp_path):
    train, test = fake_cifar100()
    folder = write_py100(tmp_path / "cifar-100-python", train, test)
    marker = tmp_path / "pwned.txt"
    dump(folder / "train", {b"data": train[0], b"fine_labels": _RunsShell(marker)})
    with pytest.raises(DatasetError, match=r"cifar-100-python/train: refusing to unpickle global (posix|nt|os)\.system"):
        cifar.prepare(params100(folder), tmp_path / "out")
    assert not marker.exists()
    dump(folder / "meta", {b"fine_label_names": _RunsShell(marker)})
    with pytest.raises(DatasetError, match=r"cifar-100-python/meta: refusing to unpickle global"):
        cifar.prepare(params100(folder), tmp_path / "out")
    assert not marker.exists()


def test_archives_match_torchvisions_url_and_md5():
    from torchvision.datasets import CIFAR10, CIFAR100

    for variant, reference in ((cifar.CIFAR10, CIFAR10), (cifar.CIFAR100, CIFAR100)):
        assert (variant.url, variant.archive, variant.md5, variant.py_dir) == (
            reference.url, reference.filename, reference.tgz_md5, reference.base_folder,
        )  # fmt: skip
    assert cifar.CIFAR100.md5 == "eb9058c3a382ffc7106e4002c42a8d85"


def test_cifar100_missing_data_and_download(tmp_path, offline_downloads):
    root = tmp_path / "cifar100"
    with pytest.raises(DatasetError) as err:
        cifar.prepare(params100(root), tmp_path / "out")
    message = str(err.value)
    assert message.startswith("CIFAR-100 not found")
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message and cifar.CIFAR100.md5 in message
    assert "cifar-100-binary" in message and str(root) in message

    with pytest.raises(DatasetError, match="CIFAR-100 not found .*downloading failed: URLError"):
        cifar.prepare(params100(root, download=True), tmp_path / "out")
    assert offline_downloads == [(cifar.CIFAR100.url, cifar.CIFAR100.md5)]


def test_cifar100_prepare_writes_tables_that_load_back(tmp_path):
    train, test = fake_cifar100()
    root = write_py100(tmp_path / "cifar100" / "cifar-100-python", train, test).parent
    out = tmp_path / "prepared"
    prepare_dataset(params100(root), out)
    prepared = load_prepared(out)
    assert prepared.info["source"] == "cifar100" and prepared.info["n_classes"] == 100
    assert prepared.info["n_images_per_split"] == {"train": 10, "val": 10, "test": 3}
    assert prepared.class_names == CLIP_CIFAR100
