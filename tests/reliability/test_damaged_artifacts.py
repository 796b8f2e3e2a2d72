"""A stage reading damaged or mismatched artifacts stops with one line naming the file, and never
computes on what is left."""

import shutil
from re import escape as re_escape

import pyarrow.parquet as pq
import pytest
from conftest import runner

from pipeline import evaluate, index, io
from pipeline.errors import ArtifactError


@pytest.fixture
def embeddings(artifacts, tmp_path):
    """A copy of the tiny run's embeddings, to damage."""
    copy = tmp_path / "embeddings"
    shutil.copytree(artifacts["emb"], copy)
    return copy


def _fails(app, args, *expected: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _index_args(artifacts, embeddings, tmp_path):
    return ["--params", artifacts["data"].parent.parent / "params.yaml", "--embeddings", embeddings, "--out", tmp_path / "index", "--timing", tmp_path / "t.json"]


def _evaluate_args(artifacts, embeddings, tmp_path):
    return [
        "--params", artifacts["data"].parent.parent / "params.yaml", "--data", artifacts["data"], "--embeddings", embeddings,
        "--index", artifacts["index"], "--probe", artifacts["probe"], "--train-reports", artifacts["reports"] / "train",
        "--reports", tmp_path / "reports", "--timing", tmp_path / "t.json",
    ]  # fmt: skip


def test_a_shard_that_lost_rows_stops_index_and_evaluate(artifacts, embeddings, tmp_path):
    shard = embeddings / "images" / "part-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 3), shard)  # still valid Parquet
    n = table.num_rows
    _fails(index.app, _index_args(artifacts, embeddings, tmp_path), f"{embeddings / 'images'}: {n - 3} rows where", f"says embed wrote {n}")
    assert not (tmp_path / "index").exists()
    _fails(evaluate.app, _evaluate_args(artifacts, embeddings, tmp_path), f"no embedding for 3 of the {n} image_ids", "images.parquet", "rerun `dvc repro embed`")
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_repeated_rows_are_refused(artifacts, embeddings, tmp_path):
    shard = embeddings / "images" / "part-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)
    pq.write_table(table.slice(0, 1), embeddings / "images" / "part-00001.parquet")  # the count matches, an id twice
    _fails(index.app, _index_args(artifacts, embeddings, tmp_path), "(1 repeated image_ids)")
    _fails(evaluate.app, _evaluate_args(artifacts, embeddings, tmp_path), "1 image_ids embedded twice")


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"\x00" * 64])
def test_a_damaged_shard_is_named(artifacts, embeddings, tmp_path, damage):
    shard = embeddings / "images" / "part-00000.parquet"
    shard.write_bytes(damage(shard.read_bytes()))
    _fails(index.app, _index_args(artifacts, embeddings, tmp_path), f"{shard}: not a readable Parquet file")
    with pytest.raises(ArtifactError, match="part-00000.parquet: not a readable Parquet file"):
        io.read_embeddings(embeddings / "images")


def test_invalid_json_is_an_artifact_error_naming_the_file(tmp_path):
    (tmp_path / "metrics.json").write_text('{"verification": ')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    for name in ("metrics.json", "binary.json"):
        with pytest.raises(ArtifactError, match=rf"{name}: not valid JSON .*rerun the stage that writes it"):
            io.read_json(tmp_path / name)


def _index_copy(artifacts, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(artifacts["index"], copy)
    return copy


@pytest.mark.parametrize("vectors, dim, expected", [
    (50, None, "(50 vectors in index.faiss, 32 rows in ids.parquet, 32 n in index.json)"),
    (5000, None, "(5000 vectors in index.faiss, 32 rows in ids.parquet"),
    (32, 256, "; dimension 256 in index.faiss, 128 in index.json)"),
])  # fmt: skip
def test_an_index_of_another_size_or_dimension_is_refused(artifacts, tmp_path, vectors, dim, expected):
    import faiss
    import numpy as np

    from pipeline.retrieval import faiss_index

    folder = _index_copy(artifacts, tmp_path)
    dim = dim or io.read_json(folder / "index.json")["dim"]
    other = faiss.IndexFlatIP(dim)
    other.add(np.random.default_rng(0).standard_normal((vectors, dim)).astype(np.float32))
    faiss.write_index(other, str(folder / "index.faiss"))
    with pytest.raises(ArtifactError, match=re_escape(expected)) as refused:
        faiss_index.load(folder)
    assert str(refused.value).startswith(f"{folder}: the index files do not fit together (")


@pytest.mark.parametrize("name", ["index.faiss", "ids.parquet"])
def test_a_truncated_index_file_is_named(artifacts, tmp_path, name):
    from pipeline.retrieval import faiss_index

    folder = _index_copy(artifacts, tmp_path)
    (folder / name).write_bytes((folder / name).read_bytes()[:40])
    with pytest.raises(ArtifactError, match=re_escape(f"{folder / name}: not a readable")):
        faiss_index.load(folder)


@pytest.mark.parametrize("damage", ["truncate index.faiss", "delete added.parquet"])
def test_a_damaged_gallery_says_how_to_recover_it(artifacts, tmp_path, damage):
    from conftest import load_predictor

    from pipeline.datasets.synthetic import draw_shape
    from pipeline.errors import GalleryError

    gallery = tmp_path / "gallery"
    draw_shape("ring", (200, 30, 30), (240, 240, 240), 64, 32, 32, 18).save(tmp_path / "mine.png")
    load_predictor(artifacts, gallery).add([tmp_path / "mine.png"])
    current = gallery / "current"
    if damage == "truncate index.faiss":
        (current / "index.faiss").write_bytes((current / "index.faiss").read_bytes()[:100])
    else:
        (current / "added.parquet").unlink()
    with pytest.raises(GalleryError, match=re_escape(f"the gallery is damaged: restore {current}, or delete {gallery} to start the gallery again")) as refused:
        load_predictor(artifacts, gallery).gallery.load()
    named = "index.faiss: not a readable FAISS index" if damage == "truncate index.faiss" else "added.parquet: not found"
    assert f"{current}/{named}" in str(refused.value) and "dvc repro" not in str(refused.value)


def _model_copy(artifacts, tmp_path, checkpoint_state=None, raw: bytes | None = None):
    """The tiny run's model folder, with model.json pointing at a checkpoint we write."""
    import json

    import torch

    folder = tmp_path / "model"
    shutil.copytree(artifacts["model"], folder)
    info = json.loads((folder / "model.json").read_text())
    info["checkpoint"] = "best.pt"
    (folder / "model.json").write_text(json.dumps(info))
    if raw is not None:
        (folder / "best.pt").write_bytes(raw)
    else:
        torch.save(checkpoint_state, folder / "best.pt")
    return folder


@pytest.mark.parametrize("case, expected", [
    ("random bytes", "best.pt: not a checkpoint ("),
    ("truncated", "best.pt: not a readable checkpoint, truncated or damaged"),
    ("a list", "best.pt: not a checkpoint of this pipeline (expected a dict with a 'model' state dict, found list)"),
    ("wrong shapes", "best.pt: its 'model' weights do not fit the model in model.json"),
])  # fmt: skip
def test_a_damaged_checkpoint_is_one_line_that_never_suggests_the_unsafe_load(artifacts, tmp_path, case, expected):
    import numpy as np
    import torch

    from pipeline.models import ModelError, load_trained

    good = torch.load(artifacts["model"] / "last.pt", weights_only=True)
    if case == "random bytes":
        folder = _model_copy(artifacts, tmp_path, raw=np.random.default_rng(0).bytes(2000))
    elif case == "truncated":
        folder = _model_copy(artifacts, tmp_path, raw=(artifacts["model"] / "last.pt").read_bytes()[:5000])
    elif case == "a list":
        folder = _model_copy(artifacts, tmp_path, [1, 2, 3])
    else:
        first = next(iter(good["model"]))
        folder = _model_copy(artifacts, tmp_path, {**good, "model": {**good["model"], first: torch.zeros(3, 3)}})
    with pytest.raises(ModelError, match=re_escape(expected)) as refused:
        load_trained(folder, "cpu")
    message = str(refused.value)
    assert "\n" not in message and "weights_only" not in message and "allowlist" not in message


def test_an_unreadable_resume_state_starts_training_afresh_with_a_warning(tmp_path, caplog):
    from pipeline.training.checkpoints import Resume

    path = tmp_path / "model.resume.pt"
    path.write_bytes(b"PK\x03\x04 cut short")
    with caplog.at_level("WARNING"):
        assert Resume(path=path, fingerprint="f", enabled=True).load() is None
    assert "model.resume.pt: not a readable checkpoint" in caplog.text and "training starts from the beginning" in caplog.text


def test_a_corrupt_metrics_file_stops_verify_only(artifacts, tmp_path):
    from conftest import where

    args = [str(a) for a in where(artifacts)]
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{not json")
    args[args.index("--metrics") + 1] = str(metrics)
    args[args.index("--gallery") + 1] = str(tmp_path / "gallery")
    from pipeline import cli

    searched = runner.invoke(cli.app, [*args, "search", "--text", "a red circle", "--top-k", "2"])
    assert searched.exit_code == 0, searched.output
    image = str(artifacts["images"][0])
    verified = runner.invoke(cli.app, [*args, "verify", image, image])
    assert verified.exit_code == 1 and f"{metrics}: not valid JSON" in verified.output and "pass --threshold" in verified.output


@pytest.mark.parametrize("damage", ["truncate", "drop a row"])
def test_a_damaged_pixel_store_is_named(artifacts, tmp_path, damage):
    import numpy as np

    from pipeline.images import load_rgb
    from pipeline.prepared import load_prepared

    data = tmp_path / "prepared"
    shutil.copytree(artifacts["data"], data)
    store = data / "pixels.npy"
    if damage == "truncate":
        store.write_bytes(store.read_bytes()[:-1000])
        expected = f"{store}: not a readable pixel store (mmap length is greater than file size)"
    else:
        pixels = np.load(store)
        np.save(store, pixels[:-1])
        expected = f"{store}: {len(pixels) - 1} images where {data / 'images.parquet'} lists {len(pixels)}"
    with pytest.raises(ArtifactError, match=re_escape(expected)):
        prepared = load_prepared(data)
        load_rgb(prepared.image_paths()[0])
