"""Flickr8k source: official token + split files (with the `.jpg.1` quirk) and Karpathy's JSON."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.datasets import flickr8k
from pipeline.prepared import load_prepared
from pipeline.datasets import prepare as prepare_dataset
from pipeline.datasets.base import DatasetError
from pipeline.params import DataParams

TRAIN = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "2258277193_586949ec62.jpg"]
DEV = ["1002674143_1b742ab4b8.jpg"]
TEST = ["1003163366_44323f5815.jpg"]
UNSPLIT = "1007129816_e794419615.jpg"  # captioned and on disk, but in no split file
QUIRK = "2258277193_586949ec62.jpg.1"  # the real token file's name for 2258277193_586949ec62.jpg


def write_jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def token_lines() -> list[str]:
    lines = []
    for name in TRAIN[:2] + DEV + TEST + [UNSPLIT]:
        lines += [f"{name}#{n}\tcaption {n} of {name} ." for n in range(2)]
    lines += [f"{QUIRK}#{n}\tquirk caption {n} ." for n in range(2)]
    return lines


def make_official(root: Path, text_dir: str = "Flickr8k_text", image_dir: str = "Flicker8k_Dataset") -> Path:
    text = root / text_dir
    text.mkdir(parents=True, exist_ok=True)
    token = text / "Flickr8k.token.txt"
    token.write_text("\n".join(token_lines()) + "\n")
    for name, files in (("train", TRAIN), ("dev", DEV), ("test", TEST)):
        (text / f"Flickr_8k.{name}Images.txt").write_text("\n".join(files) + "\n")
    for i, name in enumerate(TRAIN + DEV + TEST + [UNSPLIT]):
        write_jpeg(root / image_dir / name, 20 * i)
    return token


def make_karpathy(root: Path) -> None:
    entries = [
        {"filename": "a_1.jpg", "split": "train", "sentences": [{"raw": "A dog runs."}, {"raw": "A dog."}]},
        {"filename": "b_2.jpg", "split": "restval", "sentences": [{"raw": "Two cats."}]},
        {"filename": "c_3.jpg", "split": "val", "sentences": [{"raw": "A bird."}]},
        {"filename": "d_4.jpg", "split": "test", "sentences": [{"raw": "A boat. "}]},
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_flickr8k.json").write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    for i, entry in enumerate(entries):
        write_jpeg(root / "Images" / entry["filename"], 40 * i)


def params(root: Path, **overrides) -> DataParams:
    return DataParams(**{**dict(source="flickr8k", root=str(root), download=False), **overrides})


def test_official_splits_and_quirk_captions_are_reported_not_fatal(tmp_path):
    root = tmp_path / "flickr8k"
    make_official(root)
    ds = flickr8k.prepare(params(root), tmp_path / "out")  # on_bad_annotation is fail: still no error

    assert ds.image_root == root / "Flicker8k_Dataset"
    split_of = dict(zip(ds.images["path"], ds.images["split"]))
    # The quirk's real image has no captions under its own name, so it is left out.
    assert split_of == {TRAIN[0]: "train", TRAIN[1]: "train", DEV[0]: "val", TEST[0]: "test"}
    assert set(ds.images["image_id"]) == {Path(p).stem for p in split_of}
    assert ds.images["label"].isna().all() and ds.images["class_name"].isna().all()
    assert ds.classes == []

    assert len(ds.rejected) == 1
    assert QUIRK in ds.rejected[0]["reason"] and "2 caption(s)" in ds.rejected[0]["reason"]
    assert "Flickr8k.token.txt:" in ds.rejected[0]["path"]
    assert any("in no split file" in note for note in ds.notes)
    assert any("have no captions" in note for note in ds.notes)

    caps = ds.captions
    assert len(caps) == 8
    assert list(caps.loc[caps["image_id"] == "1002674143_1b742ab4b8", "caption_id"]) == [
        "1002674143_1b742ab4b8#0",
        "1002674143_1b742ab4b8#1",
    ]
    assert caps.set_index("caption_id").loc["1002674143_1b742ab4b8#1", "caption"] == (
        "caption 1 of 1002674143_1b742ab4b8.jpg ."
    )
    assert set(caps.loc[caps["image_id"] == "1002674143_1b742ab4b8", "split"]) == {"val"}


def test_text_files_in_root_and_images_folder(tmp_path):
    root = tmp_path / "flickr8k"
    make_official(root, text_dir=".", image_dir="Images")
    ds = flickr8k.prepare(params(root), tmp_path / "out")
    assert ds.image_root == root / "Images"
    assert len(ds.images) == 4


def test_karpathy_json(tmp_path):
    root = tmp_path / "flickr8k"
    make_karpathy(root)
    ds = flickr8k.prepare(params(root), tmp_path / "out")
    assert dict(zip(ds.images["image_id"], ds.images["split"])) == {
        "a_1": "train",
        "b_2": "train",  # restval -> train
        "c_3": "val",
        "d_4": "test",
    }
    assert list(ds.captions["caption_id"]) == ["a_1#0", "a_1#1", "b_2#0", "c_3#0", "d_4#0"]
    assert list(ds.captions["caption"])[-1] == "A boat."
    assert any("dataset_flickr8k.json" in note for note in ds.notes)


def test_official_token_file_wins_over_karpathy_json(tmp_path):
    root = tmp_path / "flickr8k"
    make_official(root)
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": []}))
    ds = flickr8k.prepare(params(root), tmp_path / "out")
    assert len(ds.images) == 4
    assert any("dataset_flickr8k.json ignored" in note for note in ds.notes)


@pytest.mark.parametrize(
    "bad_line, problem",
    [("1000268201_693b08cb0e.jpg#2 no tab here", "no tab"), ("1000268201_693b08cb0e.jpg\tno number", "#<n>")],
)
def test_malformed_token_line_names_file_and_line(tmp_path, bad_line, problem):
    root = tmp_path / "flickr8k"
    token = make_official(root)
    lines = token.read_text().splitlines()
    lines.insert(2, bad_line)
    token.write_text("\n".join(lines) + "\n")

    with pytest.raises(DatasetError, match=rf"Flickr8k\.token\.txt:3: .*{problem}"):
        flickr8k.prepare(params(root), tmp_path / "out")

    ds = flickr8k.prepare(params(root, on_bad_image="skip", on_bad_annotation="skip"), tmp_path / "out")
    assert len(ds.captions) == 8
    assert [r["path"].endswith("Flickr8k.token.txt:3") for r in ds.rejected].count(True) == 1


def test_image_of_a_split_missing_on_disk(tmp_path):
    root = tmp_path / "flickr8k"
    make_official(root)
    (root / "Flicker8k_Dataset" / TEST[0]).unlink()
    with pytest.raises(DatasetError, match=rf"{TEST[0]}: image of the test split not found"):
        flickr8k.prepare(params(root), tmp_path / "out")
    ds = flickr8k.prepare(params(root, on_bad_image="skip", on_bad_annotation="skip"), tmp_path / "out")
    assert "test" not in set(ds.images["split"])


def test_corrupt_image_is_dropped_with_its_captions_when_skipping(tmp_path):
    root = tmp_path / "flickr8k"
    make_official(root)
    (root / "Flicker8k_Dataset" / DEV[0]).write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError, match=rf"{DEV[0]}: not a readable image"):
        flickr8k.prepare(params(root), tmp_path / "out")
    ds = flickr8k.prepare(params(root, on_bad_image="skip", on_bad_annotation="skip"), tmp_path / "out")
    assert DEV[0] not in set(ds.images["path"])
    assert "1002674143_1b742ab4b8" not in set(ds.captions["image_id"])


def test_missing_data_without_download_says_what_to_get(tmp_path):
    root = tmp_path / "flickr8k"
    with pytest.raises(DatasetError) as err:
        flickr8k.prepare(params(root), tmp_path / "out")
    message = str(err.value)
    assert "Flickr8k_Dataset.zip" in message and "Flickr8k_text.zip" in message
    assert str(root) in message and "data.download is false" in message


def test_download_uses_pinned_checksums_and_reports_failure(tmp_path, monkeypatch, offline_downloads):
    import torchvision.datasets.utils as tv_utils

    root = tmp_path / "flickr8k"
    with pytest.raises(DatasetError, match="downloading Flickr8k_text.zip failed: URLError") as err:
        flickr8k.prepare(params(root, download=True), tmp_path / "out")
    assert "Flicker8k_Dataset" in str(err.value)
    assert offline_downloads == [
        ("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip", flickr8k.TEXT_ARCHIVE[1])
    ]

    # "Downloads" laid out like the real zips (text files at the top, images in a folder) let prepare go on.
    staging = tmp_path / "staging"
    make_official(staging, text_dir=".", image_dir="Flicker8k_Dataset")

    def fake_download(url, root, filename=None, md5=None, **kwargs):
        with zipfile.ZipFile(Path(root) / filename, "w") as archive:
            for file in sorted(staging.rglob("*")):
                in_images = file.parent.name == "Flicker8k_Dataset"
                if file.is_file() and in_images == (filename == "Flickr8k_Dataset.zip"):
                    archive.write(file, file.relative_to(staging).as_posix())

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    ds = flickr8k.prepare(params(root, download=True), tmp_path / "out")
    assert len(ds.images) == 4


def test_prepare_writes_tables_that_load_back(tmp_path):
    root = tmp_path / "flickr8k"
    make_official(root)
    out = tmp_path / "prepared"
    prepare_dataset(params(root), out)
    prepared = load_prepared(out)

    assert prepared.info["source"] == "flickr8k"
    assert prepared.info["n_images_per_split"] == {"train": 2, "val": 1, "test": 1}
    assert prepared.info["n_captions"] == 8
    assert prepared.info["n_rejected"] == {"image": 0, "annotation": 0, "note": 1}
    assert prepared.image_root == root / "Flicker8k_Dataset"
    assert all(p.is_file() for p in prepared.image_files())
    assert prepared.classes == []
    assert list(prepared.captions.columns) == ["caption_id", "image_id", "caption", "split"]
    assert set(prepared.captions["image_id"]) == set(prepared.images["image_id"])


def test_a_byte_order_mark_loses_no_caption(tmp_path):
    # Windows editors save UTF-8 with a BOM; read as plain UTF-8 it glues onto the first image name.
    plain = flickr8k.prepare(params(make_official(tmp_path / "plain").parents[1]), tmp_path / "out-plain")
    token = make_official(tmp_path / "bom")
    token.write_bytes(b"\xef\xbb\xbf" + token.read_bytes())
    (token.parent / "Flickr_8k.trainImages.txt").write_bytes(b"\xef\xbb\xbf" + (token.parent / "Flickr_8k.trainImages.txt").read_bytes())
    with_bom = flickr8k.prepare(params(token.parents[1]), tmp_path / "out-bom")
    pd.testing.assert_frame_equal(with_bom.captions, plain.captions)
    pd.testing.assert_frame_equal(with_bom.images.drop(columns=["content_hash"], errors="ignore"), plain.images.drop(columns=["content_hash"], errors="ignore"))


def test_a_byte_order_mark_in_karpathy_json_is_read(tmp_path):
    root = tmp_path / "k"
    make_karpathy(root)
    plain = flickr8k.prepare(params(root), tmp_path / "out-plain")
    path = next(root.rglob("*.json"))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(flickr8k.prepare(params(root), tmp_path / "out-bom").captions) == len(plain.captions)
