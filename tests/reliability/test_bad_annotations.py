"""Malformed annotations: each is a DatasetError naming the file, and the line where there is one."""

import numpy as np
import pytest
import scipy.io
from test_datasets_cifar import dump, fake_cifar, write_bin, write_py
from test_datasets_cifar import params as cifar_params
from test_datasets_flickr8k import make_official
from test_datasets_flickr8k import params as flickr_params
from test_datasets_imagenet import make_imagenet
from test_datasets_imagenet import params as imagenet_params

from pipeline.datasets import cifar, flickr8k, imagenet
from pipeline.datasets.base import DatasetError


@pytest.mark.parametrize(
    "line, reason",
    [
        ("1000268201_693b08cb0e.jpg#0 no tab here", "found no tab"),
        ("1000268201_693b08cb0e.jpg\tA caption without its number.", "before the tab"),
        ("1000268201_693b08cb0e.jpg#x\tA caption with a bad number.", "before the tab"),
    ],
)
def test_flickr8k_malformed_token_line(tmp_path, line, reason):
    root = tmp_path / "flickr8k"
    token = make_official(root)
    lines = token.read_text().splitlines()
    token.write_text("\n".join([*lines[:2], line, *lines[2:]]) + "\n")
    with pytest.raises(DatasetError, match=rf"Flickr8k.token.txt:3: .*{reason}"):
        flickr8k.prepare(flickr_params(root), tmp_path / "out")
    skipped = flickr8k.prepare(flickr_params(root, on_bad_annotation="skip"), tmp_path / "out")
    assert [r for r in skipped.rejected if r["kind"] == "annotation"][0]["path"].endswith("Flickr8k.token.txt:3")


def test_flickr8k_split_file_naming_an_unknown_image(tmp_path):
    root = tmp_path / "flickr8k"
    make_official(root)
    split_file = root / "Flickr8k_text" / "Flickr_8k.testImages.txt"
    n_lines = len(split_file.read_text().splitlines())
    split_file.write_text(split_file.read_text() + "999_not_there.jpg\n")
    with pytest.raises(DatasetError, match=rf"999_not_there.jpg: image of the test split not found \(listed at .*testImages.txt:{n_lines + 1}\)"):
        flickr8k.prepare(flickr_params(root), tmp_path / "out")


def test_imagenet_meta_mat_missing_a_field_or_of_the_wrong_shape(tmp_path):
    make_imagenet(tmp_path / "in")
    meta = tmp_path / "in" / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    table = np.zeros((2, 1), dtype=[("ILSVRC2012_ID", object), ("WNID", object)])  # no words, no num_children
    table[0, 0], table[1, 0] = (1, "n01"), (2, "n02")
    scipy.io.savemat(meta, {"synsets": table})
    with pytest.raises(DatasetError, match=r"meta.mat: synsets\(1\) lacks field\(s\) \['words', 'num_children'\]"):
        imagenet.prepare(imagenet_params(tmp_path / "in"), tmp_path / "out")
    scipy.io.savemat(meta, {"synsets": np.arange(6.0).reshape(3, 2)})  # numbers, not a struct array
    with pytest.raises(DatasetError, match=r"meta.mat: synsets\(1\) lacks field"):
        imagenet.prepare(imagenet_params(tmp_path / "in"), tmp_path / "out")
    scipy.io.savemat(meta, {"classes": np.zeros(3)})
    with pytest.raises(DatasetError, match=r"meta.mat: no 'synsets' variable \(found \['classes'\]\)"):
        imagenet.prepare(imagenet_params(tmp_path / "in"), tmp_path / "out")


def test_imagenet_ground_truth_line_that_is_not_a_class(tmp_path):
    gt = make_imagenet(tmp_path / "in")
    lines = gt.read_text().splitlines()
    gt.write_text("\n".join([*lines[:4], "9999", *lines[5:]]) + "\n")
    with pytest.raises(DatasetError, match=r"ground_truth.txt:5: ILSVRC2012_ID 9999 is not a leaf class"):
        imagenet.prepare(imagenet_params(tmp_path / "in"), tmp_path / "out")


def test_cifar_batches_of_the_wrong_size(tmp_path):
    train, test = fake_cifar()
    folder = write_py(tmp_path / "py" / "cifar-10-batches-py", train, test)
    data, labels = train[1]
    dump(folder / "data_batch_2", {b"data": data[:, :1000], b"labels": [int(v) for v in labels]})  # rows of 1000 bytes, not 3072
    with pytest.raises(DatasetError, match=r"data_batch_2: 'data' must be an N x 3072 uint8 array, got shape \(\d+, 1000\)"):
        cifar.prepare(cifar_params(folder), tmp_path / "out")
    dump(folder / "data_batch_2", {b"data": data, b"labels": [int(v) for v in labels][:-1]})
    with pytest.raises(DatasetError, match=r"data_batch_2: \d+ labels for \d+ images"):
        cifar.prepare(cifar_params(folder), tmp_path / "out")

    folder = write_bin(tmp_path / "bin" / "cifar-10-batches-bin", train, test)
    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-7])
    with pytest.raises(DatasetError, match=r"test_batch.bin: size \d+ bytes is not a whole number of 3073-byte records"):
        cifar.prepare(cifar_params(folder), tmp_path / "out")
