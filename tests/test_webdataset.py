"""The WebDataset source: tar shards as img2dataset writes them, prepared as a manifest and read in place.

The shards are written here with webdataset's TarWriter (PNG and JPEG images, `txt` captions,
`cls` classes, a `json` naming the class), beside the same image files as a class-per-folder tree.
"""

import io as bytes_io
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
import yaml
from conftest import invoke
from PIL import Image

from pipeline import embed, io, probe, train
from pipeline import prepare as prepare_stage
from pipeline.datasets import prepare
from pipeline.datasets.synthetic import BACKGROUNDS, COLOURS, SHAPES, draw_shape
from pipeline.errors import DatasetError
from pipeline.images import TarMember, load_rgb
from pipeline.params import DataParams, Params
from pipeline.prepared import load_prepared, rows_for_rank
from pipeline.training.curves import read_curves

ROOT = Path(__file__).resolve().parents[1]
CLASSES = SHAPES[:4]
PER_CLASS = 60  # 240 samples, 60 per shard over 4 shards
SPLITS = {"train": 0.5, "val": 0.25, "test": 0.25}


def make_samples(n_classes: int = len(CLASSES), per_class: int = PER_CLASS, start: int = 0, seed: int = 0) -> list[dict]:
    """Drawn shapes, every third one a JPEG; keys `<shape>_<n>` sort as the folder tree's files do."""
    rng = np.random.default_rng(seed)
    samples = []
    for label, shape in enumerate(SHAPES[:n_classes]):
        for n in range(start, start + per_class):
            colour, background = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
            image = draw_shape(shape, COLOURS[colour], BACKGROUNDS[background], 32, *rng.uniform(10, 22, 2), rng.uniform(5, 9))
            ext = "jpg" if n % 3 == 0 else "png"
            buffer = bytes_io.BytesIO()
            image.save(buffer, "JPEG" if ext == "jpg" else "PNG")
            samples.append(
                {"__key__": f"{shape}_{n:04d}", ext: buffer.getvalue(), "txt": f"a {colour} {shape} on {background}", "cls": label, "json": {"class_name": shape}}
            )
    return samples


def write_shards(folder: Path, samples: list[dict], n_shards: int, first: int = 0) -> list[Path]:
    """`shard-NNNNN.tar` files holding consecutive runs of the samples."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(samples)), n_shards)):
        paths.append(folder / f"shard-{first + i:05d}.tar")
        with wds.TarWriter(str(paths[-1])) as writer:
            for j in part:
                writer.write(samples[j])
    return paths


def write_tree(folder: Path, samples: list[dict]) -> Path:
    """The same images as `<class>/<key>.<ext>` files."""
    for sample in samples:
        ext = "jpg" if "jpg" in sample else "png"
        path = folder / sample["json"]["class_name"] / f"{sample['__key__']}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample[ext])
    return folder


def wds_params(root, **data) -> DataParams:
    return DataParams(source="webdataset", root=str(root), splits=SPLITS, **data)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return make_samples()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, samples) -> Path:
    folder = tmp_path_factory.mktemp("wds") / "shards"
    write_shards(folder, samples, 4)
    return folder


def test_prepare_writes_a_manifest_and_reads_images_in_place(tmp_path, shards, samples):
    out = tmp_path / "prepared"
    prepare(wds_params(shards), out)
    prepared = load_prepared(out)
    images = prepared.images
    assert len(images) == len(samples) and images["image_id"].is_unique
    assert list(images["image_id"]) == [s["__key__"] for s in samples]  # shard order, then tar order
    assert sorted(set(images["shard"])) == [f"shard-{i:05d}.tar" for i in range(4)]
    assert (images["path"] == images["shard"] + "/" + images["member"]).all()
    assert prepared.info["image_root"] == str(shards) and not (out / "images").exists()  # nothing copied
    assert [c["name"] for c in prepared.classes] == CLASSES and [c["cls"] for c in prepared.classes] == [0, 1, 2, 3]
    assert (images["class_name"] == [s["json"]["class_name"] for s in samples]).all()
    assert (images["label"].to_numpy() == [s["cls"] for s in samples]).all()
    captions = prepared.captions
    assert list(captions["caption"]) == [s["txt"] for s in samples] and (captions["split"] == images["split"]).all()

    members = prepared.image_files()
    assert all(isinstance(m, TarMember) for m in members)
    stored = prepared.image_paths()  # the shards' images, one size, decoded into the pixel store by prepare
    for i in (0, 1, 100, len(samples) - 1):  # JPEG and PNG members, first and last of a shard
        ext = "jpg" if "jpg" in samples[i] else "png"
        expected = np.asarray(Image.open(bytes_io.BytesIO(samples[i][ext])).convert("RGB"))
        assert np.array_equal(np.asarray(load_rgb(members[i])), expected)
        assert np.array_equal(np.asarray(load_rgb(stored[i])), expected)
        # A `<shard>.tar/<member>` path (what the report's figures and the gallery hold) reads the same pixels.
        assert np.array_equal(np.asarray(load_rgb(prepared.image_root / images["path"].iloc[i])), expected)


def test_brace_pattern_names_the_same_shards_and_a_missing_shard_is_an_error(tmp_path, shards):
    prepare(wds_params(shards), tmp_path / "folder")
    prepare(wds_params(f"{shards}/shard-{{00000..00003}}.tar"), tmp_path / "pattern")
    assert pd.read_parquet(tmp_path / "folder" / "images.parquet").equals(pd.read_parquet(tmp_path / "pattern" / "images.parquet"))
    assert io.read_json(tmp_path / "pattern" / "dataset.json")["image_root"] == str(shards)
    with pytest.raises(DatasetError, match=r"shard-00004\.tar: shard not found"):
        prepare(wds_params(f"{shards}/shard-{{00000..00004}}.tar"), tmp_path / "missing")


def test_splits_follow_a_seeded_key_hash_and_stay_put_when_shards_are_added(tmp_path, samples):
    folder = tmp_path / "shards"
    write_shards(folder, samples, 4)
    prepare(wds_params(folder), tmp_path / "four")
    four = pd.read_parquet(tmp_path / "four" / "images.parquet").set_index("image_id")["split"]
    shares = four.value_counts(normalize=True)
    assert all(abs(shares[split] - ratio) < 0.1 for split, ratio in SPLITS.items())

    write_shards(folder, make_samples(start=PER_CLASS, per_class=10, seed=1), 1, first=4)
    prepare(wds_params(folder), tmp_path / "five")
    five = pd.read_parquet(tmp_path / "five" / "images.parquet").set_index("image_id")["split"]
    assert len(five) == len(four) + 40 and five.loc[four.index].equals(four)

    prepare(wds_params(folder, seed=1), tmp_path / "reseeded")
    reseeded = pd.read_parquet(tmp_path / "reseeded" / "images.parquet").set_index("image_id")["split"]
    assert (reseeded.loc[four.index] != four).mean() > 0.3  # the seed does move samples


def _corrupt_image(sample):
    ext = "jpg" if "jpg" in sample else "png"
    sample[ext] = sample[ext][:40]


BAD_SAMPLES = {
    "corrupt image": (_corrupt_image, "not a readable image"),
    "missing caption": (lambda sample: sample.pop("txt"), "no caption (.txt member)"),
    "no image": (lambda sample: [sample.pop(ext, None) for ext in ("jpg", "png")], "no image member"),
}


@pytest.mark.parametrize("problem", BAD_SAMPLES)
def test_a_bad_sample_fails_naming_shard_and_key_or_is_recorded_with_skip(tmp_path, problem):
    samples = make_samples(per_class=6)
    spoil, reason = BAD_SAMPLES[problem]
    spoil(samples[13])
    folder = tmp_path / "shards"
    shard = write_shards(folder, samples, 4)[2]  # 24 samples: number 13 is in the third shard
    key = samples[13]["__key__"]
    with pytest.raises(DatasetError) as err:
        prepare(wds_params(folder), tmp_path / "failed")
    assert str(shard) in str(err.value) and key in str(err.value) and reason in str(err.value)
    assert "on_bad_image: skip" in str(err.value)

    out = tmp_path / "skipped"
    prepare(wds_params(folder, on_bad_image="skip"), out)
    rejected = pd.read_parquet(out / "rejected.parquet")
    assert len(rejected) == 1 and rejected["kind"].item() == "image"
    assert str(shard) in rejected["path"].item() and key in rejected["path"].item() and reason in rejected["reason"].item()
    assert key not in set(pd.read_parquet(out / "images.parquet")["image_id"])
    assert io.read_json(out / "dataset.json")["n_rejected"]["image"] == 1


def test_a_key_in_two_shards_is_a_bad_annotation(tmp_path):
    samples = make_samples(per_class=4)
    folder = tmp_path / "shards"
    shards = write_shards(folder, samples, 2)
    with wds.TarWriter(str(folder / "shard-00002.tar")) as writer:
        writer.write({**samples[0], "txt": "another caption"})
    with pytest.raises(DatasetError, match=rf"shard-00002\.tar:{samples[0]['__key__']}: key .* is also in {shards[0]}"):
        prepare(wds_params(folder), tmp_path / "out")
    prepare(wds_params(folder, on_bad_annotation="skip"), tmp_path / "out")
    assert len(pd.read_parquet(tmp_path / "out" / "images.parquet")) == len(samples)


def test_a_compressed_shard_is_refused_with_the_reason(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "shard-00000.tar", "w:gz") as tar:
        tar.add(write_tree(tmp_path / "tree", make_samples(n_classes=1, per_class=1)) / "circle" / "circle_0000.jpg", "a.jpg")
    with pytest.raises(DatasetError, match=r"shard-00000\.tar: not an uncompressed tar file"):
        prepare(wds_params(folder), tmp_path / "out")


def test_rows_for_rank_gives_whole_shards_on_webdataset_and_contiguous_blocks_otherwise(tmp_path, shards):
    prepare(wds_params(shards), tmp_path / "prepared")
    prepared = load_prepared(tmp_path / "prepared")
    for world in (1, 2, 3, 5):
        parts = [rows_for_rank(prepared, rank, world) for rank in range(world)]
        assert pd.concat(parts).equals(prepared.images)  # every row once, in table order
        assert all(not set(a["shard"]) & set(b["shard"]) for i, a in enumerate(parts) for b in parts[i + 1 :])
    assert [set(p["shard"]) for p in (rows_for_rank(prepared, r, 2) for r in range(2))] == [
        {"shard-00000.tar", "shard-00001.tar"},
        {"shard-00002.tar", "shard-00003.tar"},
    ]
    plain = prepared.images.drop(columns=["shard", "key", "member", "offset", "size"])
    prepared.images = plain
    assert [len(rows_for_rank(prepared, r, 3)) for r in range(3)] == [80, 80, 80]
    assert rows_for_rank(prepared, 1, 3).equals(plain.iloc[80:160])


def _stage_params(root: Path, data: dict, train_section: dict, **sections) -> Path:
    params = {"data": data, "train": train_section, "index": {"factory": "Flat", "search_params": ""}, "runtime": {"batch_size": 64}, **sections}
    Params.model_validate(params)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, shards, samples):
    """The shards and the same images as a folder tree, prepared, and embedded by one untrained model."""
    root = tmp_path_factory.mktemp("embedded")
    tree = write_tree(root / "tree", samples)
    folders = {}
    for source, data_root in (("webdataset", shards), ("folder", tree)):
        params = _stage_params(root / source, {"source": source, "root": str(data_root), "splits": SPLITS}, {"method": "none"})
        invoke(prepare_stage.app, ["--params", params, "--out", root / source / "data", "--timing", root / source / "t1.json"])
        folders[source] = root / source
    model = root / "model"
    invoke(train.app, ["--params", folders["webdataset"] / "params.yaml", "--data", folders["webdataset"] / "data", "--out", model,
                       "--reports", root / "train", "--timing", root / "t2.json"])  # fmt: skip
    for folder in folders.values():
        invoke(embed.app, ["--params", folder / "params.yaml", "--data", folder / "data", "--model", model, "--out", folder / "emb",
                           "--timing", folder / "t3.json"])  # fmt: skip
    return root, folders, model


def test_embeddings_of_shards_equal_those_of_the_same_images_in_folders(embedded, samples):
    _, folders, _ = embedded
    wds_meta, wds_emb = io.read_embeddings(folders["webdataset"] / "emb" / "images")
    folder_meta, folder_emb = io.read_embeddings(folders["folder"] / "emb" / "images")
    assert len(wds_meta) == len(folder_meta) == len(samples)
    keys = folder_meta["image_id"].str.split("/").str[1]  # folder ids are <class>/<key>
    order = pd.Series(np.arange(len(wds_meta)), index=wds_meta["image_id"]).loc[keys].to_numpy()
    assert np.array_equal(wds_emb[order], folder_emb)
    # Labels number the classes differently (cls order against folder names' order); the names agree.
    assert (wds_meta["class_name"].to_numpy()[order] == folder_meta["class_name"].to_numpy()).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_two_rank_embed_covers_every_sample_once_each_rank_its_own_shards(embedded, tmp_path):
    root, folders, model = embedded
    folder = folders["webdataset"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "pipeline.embed",
               "--params", folder / "params.yaml", "--data", folder / "data", "--model", model, "--out", tmp_path / "emb", "--timing", tmp_path / "t.json"]  # fmt: skip
    result = subprocess.run([str(c) for c in command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    images = load_prepared(folder / "data").images
    parts = [pd.read_parquet(tmp_path / "emb" / "images" / f"part-{rank:05d}.parquet") for rank in range(2)]
    assert sorted(pd.concat(parts)["image_id"]) == sorted(images["image_id"])  # every sample exactly once
    shard_of = images.set_index("image_id")["shard"]
    assert [set(shard_of.loc[p["image_id"]]) for p in parts] == [{"shard-00000.tar", "shard-00001.tar"}, {"shard-00002.tar", "shard-00003.tar"}]
    meta, emb = io.read_embeddings(tmp_path / "emb" / "images")
    one_meta, one_emb = io.read_embeddings(folder / "emb" / "images")
    assert meta["image_id"].equals(one_meta["image_id"])  # the parts concatenate in table order
    np.testing.assert_allclose(emb, one_emb, atol=1e-5)
    assert io.read_json(tmp_path / "emb" / "embed.json")["n_images"] == len(images)


def test_clip_training_and_the_probe_read_the_shards(tmp_path):
    """prepare, train (clip, one epoch: shuffled random access into the shards), probe and embed."""
    shards = tmp_path / "shards"
    write_shards(shards, make_samples(per_class=12), 4)
    params = _stage_params(tmp_path, {"source": "webdataset", "root": str(shards), "splits": SPLITS},
                           {"method": "clip", "epochs": 1, "batch_size": 8}, probe={"points": ["pixels", "final"], "k": 3},
                           evaluate={"recall_k": [1, 5]})  # fmt: skip
    data, model = tmp_path / "data", tmp_path / "model"
    invoke(prepare_stage.app, ["--params", params, "--out", data, "--timing", tmp_path / "t0.json"])
    invoke(train.app, ["--params", params, "--data", data, "--out", model, "--reports", tmp_path / "train", "--timing", tmp_path / "t1.json"])
    assert io.read_json(model / "model.json")["trained_on"] == "webdataset"
    assert len(read_curves(tmp_path / "train")[0]) >= 1  # it took steps on images read from the shards
    invoke(probe.app, ["--params", params, "--data", data, "--model", model, "--out", tmp_path / "probe",
                       "--timing", tmp_path / "t2.json", "--tradeoff-figure", tmp_path / "tradeoff.png"])  # fmt: skip
    assert {"pixels", "final"} <= set(io.read_json(tmp_path / "probe" / "probe.json")["points"])
    invoke(embed.app, ["--params", params, "--data", data, "--model", model, "--out", tmp_path / "emb", "--timing", tmp_path / "t3.json"])
    assert len(io.read_embeddings(tmp_path / "emb" / "images")[0]) == 48


@pytest.mark.parametrize("cut", ["between samples", "inside an image"])
def test_a_truncated_shard_says_where_it_ends_and_what_was_lost(tmp_path, cut):
    samples = make_samples(per_class=6)
    folder = tmp_path / "shards"
    shard = write_shards(folder, samples, 2)[0]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    fourth = [m for m in members if m.name.startswith(samples[3]["__key__"] + ".")]
    image = next(m for m in fourth if m.name.rsplit(".", 1)[1] in ("jpg", "png"))
    end = fourth[-1].offset_data + fourth[-1].size + 100 if cut == "between samples" else image.offset_data + image.size // 2
    shard.write_bytes(shard.read_bytes()[:end])

    with pytest.raises(DatasetError) as err:
        prepare(wds_params(folder), tmp_path / "failed")
    whole = 4 if cut == "between samples" else 3
    assert f"{shard}: truncated: the file ends at byte {end:,}" in str(err.value)
    assert f"{whole} whole samples precede the cut" in str(err.value)

    out = tmp_path / "skipped"
    prepare(wds_params(folder, on_bad_image="skip"), out)
    rejected = pd.read_parquet(out / "rejected.parquet")
    kept = set(pd.read_parquet(out / "images.parquet")["image_id"])
    in_shard = {s["__key__"] for s in samples[:12]}
    assert kept & in_shard == {s["__key__"] for s in samples[:whole]}
    assert kept - in_shard == {s["__key__"] for s in samples[12:]}  # the other shard is whole
    assert rejected["path"].tolist() == [str(shard)] + ([] if cut == "between samples" else [f"{shard}:{samples[3]['__key__']}"])
    if cut == "inside an image":
        before = ", ".join(m.name.rsplit(".", 1)[1] for m in fourth if m.offset < image.offset)
        assert rejected["reason"].iloc[1] == f"cut short by the shard's truncation (only {before} remain)"
