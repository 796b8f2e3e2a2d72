"""Files from the internet: pickles, checkpoints, annotation paths and archives never get to run
code or write outside the dataset folder."""

import io as bytes_io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from test_datasets_cifar import dump, fake_cifar, write_py
from test_datasets_cifar import params as cifar_params
from test_datasets_flickr8k import make_karpathy, make_official
from test_datasets_flickr8k import params as flickr_params

from pipeline.datasets import cifar, flickr8k
from pipeline.datasets.archives import safe_extract
from pipeline.datasets.base import DatasetError
from pipeline.models import ModelError, create_model, load_weights


class RunsShell:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


class CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


# Protocol 2 names the globals the Python 2 way: posix.system, __builtin__.eval.
@pytest.mark.parametrize(
    "make_payload, refused", [(RunsShell, r"(posix|nt|os)\.system"), (lambda marker: CallsEval(), r"__builtin__\.eval")]
)
def test_cifar_pickle_with_a_forbidden_global_is_refused_and_not_run(tmp_path, make_payload, refused):
    train, test = fake_cifar()
    folder = write_py(tmp_path / "cifar-10-batches-py", train, test)
    marker = tmp_path / "pwned.txt"
    dump(folder / "data_batch_3", {b"data": train[2][0], b"labels": make_payload(marker)})
    with pytest.raises(DatasetError, match=rf"data_batch_3: refusing to unpickle global {refused} "):
        cifar.prepare(cifar_params(folder), tmp_path / "out")
    assert not marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"model": {}, "extra": RunsShell(marker)}, checkpoint)
    with pytest.raises(ModelError, match="evil.pt: holds more than weights; refusing to unpickle"):
        load_weights(checkpoint)
    with pytest.raises(ModelError, match="model.pretrained: .*evil.pt holds more than weights"):
        create_model("clipline-tiny", str(checkpoint))
    assert not marker.exists()
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "plain.pt")
    assert load_weights(tmp_path / "plain.pt")["epoch"] == 3  # tensors and plain containers load


@pytest.mark.parametrize("name", ["../../outside.jpg", "/etc/passwd", "sub/../../outside.jpg"])
def test_annotation_paths_cannot_leave_the_dataset_root(tmp_path, name):
    root = tmp_path / "flickr8k"
    make_official(root)
    split_file = root / "Flickr8k_text" / "Flickr_8k.devImages.txt"
    split_file.write_text(split_file.read_text() + name + "\n")
    with pytest.raises(DatasetError, match=r"Flickr_8k.devImages.txt:\d+: image path .* is not a plain relative path"):
        flickr8k.prepare(flickr_params(root), tmp_path / "out")

    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    split_file.write_text("\n".join(split_file.read_text().splitlines()[:-1]) + "\n")
    token.write_text(token.read_text() + f"{name}#0\ta caption\n")
    with pytest.raises(DatasetError, match=r"Flickr8k.token.txt:\d+: image path"):
        flickr8k.prepare(flickr_params(root), tmp_path / "out")

    karpathy = tmp_path / "karpathy"
    make_karpathy(karpathy)
    listing = karpathy / "dataset_flickr8k.json"
    listing.write_text(listing.read_text().replace('"a_1.jpg"', f'"{name}"'))
    with pytest.raises(DatasetError, match=r"dataset_flickr8k.json: images\[0\]: image path"):
        flickr8k.prepare(flickr_params(karpathy), tmp_path / "out")


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            info.size = len(data)
            archive.addfile(info, bytes_io.BytesIO(data) if data else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    "members, refused",
    [
        ([(_member("ok.txt"), b"fine"), (_member("../escaped.txt"), b"x")], "../escaped.txt"),
        ([(_member("/tmp/clipline-absolute.txt"), b"x")], "/tmp/clipline-absolute.txt"),
        ([(_member("link", tarfile.SYMTYPE, "../../outside"), b"")], "../outside"),
        ([(_member("hard", tarfile.LNKTYPE, "../outside"), b"")], "../outside"),
        ([(_member("dev", tarfile.CHRTYPE), b"")], "dev"),
    ],
    ids=["dot-dot", "absolute", "symlink-out", "hardlink-out", "device"],
)
def test_tar_members_that_escape_are_refused_before_anything_is_written(tmp_path, members, refused):
    archive = _tar(tmp_path / "data.tar.gz", members)
    target = tmp_path / "root" / "dataset"
    with pytest.raises(DatasetError, match=rf"data.tar.gz: refusing to extract .*{refused}"):
        safe_extract(archive, target)
    assert list(target.iterdir()) == []  # refused whole: not even the good member
    assert not (tmp_path / "root" / "escaped.txt").exists() and not Path("/tmp/clipline-absolute.txt").exists()


def test_zip_members_that_escape_are_refused_and_a_good_archive_extracts(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("images/a.txt", "fine")
        archive.writestr("../../escaped.txt", "x")
    with pytest.raises(DatasetError, match=r"bad.zip: refusing to extract '../../escaped.txt'"):
        safe_extract(bad, tmp_path / "target")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "target" / "images").exists()

    good = tmp_path / "good.tar.gz"
    _tar(good, [(_member("folder/a.txt"), b"hello"), (_member("folder/link", tarfile.SYMTYPE, "a.txt"), b"")])
    safe_extract(good, tmp_path / "target")
    assert (tmp_path / "target" / "folder" / "link").read_text() == "hello"
    with pytest.raises(DatasetError, match="not a zip or tar archive"):
        (tmp_path / "plain.bin").write_bytes(b"plain bytes")
        safe_extract(tmp_path / "plain.bin", tmp_path / "target")
