"""Property tests: whatever bytes or structure an annotation file holds, its parser returns a result
or raises DatasetError (with the file named). Never another exception, never a hang."""

import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.datasets import cifar, flickr8k, imagenet, karpathy
from pipeline.datasets.base import DatasetError, Rejections

# More examples for a deeper search: HYPOTHESIS_MAX_EXAMPLES=1000 python -m pytest tests/reliability
SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def text(**kwargs):
    """Text a file can hold: any characters but lone surrogates, which no encoding writes."""
    return st.text(alphabet=st.characters(blacklist_categories=("Cs",)), **kwargs)


# Text that looks like the real formats often enough to get past the first checks.
TOKEN_LINE = st.one_of(
    text(max_size=60),
    st.builds(
        lambda file, n, caption: f"{file}#{n}\t{caption}",
        st.text(alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=20),
        st.one_of(st.integers(-3, 9).map(str), text(max_size=3)),
        text(max_size=30),
    ),
)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
KARPATHY_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "filename": st.one_of(text(max_size=12), JSON_VALUE),
        "filepath": st.one_of(st.sampled_from(["train2014", "val2014"]), JSON_VALUE),
        "split": st.one_of(st.sampled_from(["train", "restval", "val", "test"]), JSON_VALUE),
        "sentences": st.one_of(st.lists(st.one_of(st.fixed_dictionaries({"raw": JSON_VALUE}), JSON_VALUE), max_size=3), JSON_VALUE),
    },
)


def _parse(write, parse):
    """Write a file in a fresh folder and parse it; DatasetError must name the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "annotations"
        write(path)
        try:
            return parse(path)
        except DatasetError as err:
            assert str(path) in str(err) or path.name in str(err), err
            return None


@SETTINGS
@given(lines=st.lists(TOKEN_LINE, max_size=8), policy=st.sampled_from(["fail", "skip"]))
def test_flickr8k_token_file(lines, policy):
    _parse(lambda p: p.write_text("\n".join(lines), encoding="utf-8"), lambda p: flickr8k._read_token_file(p, Rejections(policy, policy)))


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_flickr8k_token_file_raw_bytes(raw):
    _parse(lambda p: p.write_bytes(raw), lambda p: flickr8k._read_token_file(p, Rejections("skip", "skip")))


@SETTINGS
@given(contents=st.lists(text(max_size=40), min_size=3, max_size=3))
def test_flickr8k_split_files(contents):
    def write(path):
        path.mkdir()
        for name, text in zip(flickr8k.SPLIT_FILES.values(), contents):
            (path / name).write_text(text, encoding="utf-8")

    _parse(write, lambda p: flickr8k._read_split_files(p, p))


@SETTINGS
@given(
    document=st.one_of(JSON_VALUE, st.fixed_dictionaries({"images": st.one_of(st.lists(KARPATHY_ENTRY, max_size=4), JSON_VALUE)})),
    policy=st.sampled_from(["fail", "skip"]),
    folder_key=st.sampled_from([None, "filepath"]),  # flickr8k/flickr30k, mscoco
)
def test_karpathy_json(document, policy, folder_key):
    _parse(lambda p: p.write_text(json.dumps(document)), lambda p: karpathy.read_karpathy(p, Rejections(policy, policy), folder_key))


@SETTINGS
@given(raw=st.binary(max_size=100))
def test_karpathy_raw_bytes(raw):
    _parse(lambda p: p.write_bytes(raw), karpathy.read_karpathy)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=100), st.lists(st.one_of(st.integers(-5, 2000).map(str), text(max_size=6)), max_size=8).map(lambda ls: "\n".join(ls).encode("utf-8"))))
def test_imagenet_ground_truth(raw):
    def parse(path):
        lines = imagenet._ground_truth_lines(path)
        assert all(isinstance(number, int) and isinstance(text, str) for number, text in lines)

    _parse(lambda p: p.write_bytes(raw), parse)


SYNSET_FIELD_VALUES = st.one_of(st.integers(-2, 5), text(max_size=8), st.lists(st.integers(0, 3), max_size=3))


@SETTINGS
@given(
    synsets=st.lists(st.dictionaries(st.sampled_from(["ILSVRC2012_ID", "WNID", "words", "num_children", "other"]), SYNSET_FIELD_VALUES), max_size=4),
    as_matrix=st.booleans(),
)
def test_imagenet_meta_mat(synsets, as_matrix):
    def write(path):
        if as_matrix:  # a 'synsets' variable of the wrong shape and type altogether
            scipy.io.savemat(path, {"synsets": np.arange(len(synsets) + 1, dtype=float).reshape(-1, 1)}, format="5")
            return
        records = np.empty(len(synsets), dtype=object)
        for i, fields in enumerate(synsets):
            records[i] = {key: (np.array(value, dtype=float) if isinstance(value, list) else value) for key, value in fields.items()}
        scipy.io.savemat(path, {"synsets": records} if synsets else {"other": 1}, format="5")

    _parse(lambda p: write(p.with_suffix(".mat")) or p.with_suffix(".mat").rename(p), imagenet._read_leaves)


@SETTINGS
@given(raw=st.binary(max_size=300))
def test_imagenet_meta_mat_raw_bytes(raw):
    _parse(lambda p: p.write_bytes(b"MATLAB 5.0 MAT-file" + raw), imagenet._read_leaves)


@SETTINGS
@given(
    obj=st.one_of(
        JSON_VALUE,
        st.fixed_dictionaries({b"data": st.one_of(JSON_VALUE, st.builds(lambda n, m: np.zeros((n, m), np.uint8), st.integers(0, 3), st.sampled_from([0, 7, cifar.N_PIXELS]))), b"labels": JSON_VALUE}),
    ),
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
)
def test_cifar_python_batch(obj, protocol):
    _parse(lambda p: p.write_bytes(pickle.dumps(obj, protocol=protocol)), cifar._read_py_batch)
    _parse(lambda p: p.write_bytes(pickle.dumps(obj, protocol=protocol)), cifar._read_py_meta)


@SETTINGS
@given(raw=st.binary(max_size=2 * cifar.CIFAR100.record_bytes + 3), variant=st.sampled_from([cifar.CIFAR10, cifar.CIFAR100]))
def test_cifar_raw_bytes(raw, variant):
    for parse in (cifar._read_py_batch, cifar._read_bin_batch, cifar._read_py_meta, cifar._read_bin_meta):
        _parse(lambda p: p.write_bytes(raw), lambda p: parse(p, variant))
