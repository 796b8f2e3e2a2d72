"""`clipline search`, `classify` and `add`, and the gallery behind them, on the tiny artifacts."""

import json
import shutil

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import invoke, load_predictor, runner, where

from pipeline import cli, index, io
from pipeline.datasets.synthetic import draw_shape
from pipeline.predict import PredictError
from pipeline.retrieval.gallery import GalleryError


def _json(args) -> dict:
    """A command's `--json` answer: stdout alone must be one JSON document (notes go to stderr)."""
    result = runner.invoke(cli.app, [str(a) for a in [*args, "--json"]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)


def _new_images(folder):
    """Two images unlike any in the gallery, a byte-identical copy of one, and a text file."""
    (folder / "sub").mkdir(parents=True)
    draw_shape("circle", (200, 30, 30), (255, 255, 255), 64, 30, 34, 14).save(folder / "a.png")
    draw_shape("square", (30, 200, 30), (20, 20, 20), 64, 32, 32, 20).save(folder / "sub" / "b.png")
    shutil.copyfile(folder / "sub" / "b.png", folder / "sub" / "b_again.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_text_search_is_exact_search_over_the_embedded_images(artifacts):
    texts, text_emb = io.read_embeddings(artifacts["emb"] / "texts")
    images, image_emb = io.read_embeddings(artifacts["emb"] / "images")
    caption = pd.read_parquet(artifacts["data"] / "captions.parquet").set_index("caption_id").loc[texts["caption_id"][7], "caption"]
    answer = _json([*where(artifacts), "search", "--text", caption, "--top-k", "4"])
    assert answer["query"] == {"text": caption} and answer["metric"] == "ip" and answer["contact_sheet"] is None
    hits = pd.DataFrame(answer["results"])
    assert list(hits.columns) == ["rank", "score", "image_id", "class", "path"] and list(hits["rank"]) == [1, 2, 3, 4]
    assert hits["score"].is_monotonic_decreasing and all(isinstance(score, float) for score in hits["score"])
    # The query is embedded as embed embedded the captions, and the Flat index is exact search.
    expected = np.argsort(-(image_emb @ text_emb[7]))[:4]
    assert list(hits["image_id"]) == list(images["image_id"].iloc[expected])
    assert np.allclose(hits["score"], (image_emb @ text_emb[7])[expected], atol=1e-5)
    assert all(Path(path).is_file() for path in hits["path"])


def test_the_search_table_shows_the_top_hit_in_full(artifacts):
    """The human table: the top hit's id and its score at 4 decimals, long paths whole on one line
    (not a terminal: no wrapping), no colour codes."""
    top = _json([*where(artifacts), "search", "--text", "a red circle", "-k", "3"])["results"][0]
    out = invoke(cli.app, [*where(artifacts), "search", "--text", "a red circle", "-k", "3"])
    header, rule, first, *rest = out.splitlines()
    assert header.split() == ["rank", "score", "image_id", "class", "path"] and set(rule) == {"─"} and len(rest) == 2
    assert first.split() == ["1", f"{top['score']:.4f}", top["image_id"], top["class"], top["path"]]
    assert "\x1b[" not in out


def test_image_search_finds_the_query_first_and_draws_a_sheet(artifacts, tmp_path):
    query = artifacts["images"][2]
    answer = _json([*where(artifacts), "search", "--image", query, "-k", "3", "--out", tmp_path / "sheet.png"])
    assert answer["query"] == {"image": str(query)} and len(answer["results"]) == 3
    assert answer["results"][0]["image_id"] == query.stem and answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    # With --json the sheet is still drawn, and its path is in the document rather than a printed line.
    assert answer["contact_sheet"] == str(tmp_path / "sheet.png") and (tmp_path / "sheet.png").stat().st_size > 1000
    out = invoke(cli.app, [*where(artifacts), "search", "--text", "a red circle", "-k", "2", "--out", tmp_path / "text_sheet.png"])
    assert out.splitlines()[-1] == f"contact sheet -> {tmp_path / 'text_sheet.png'}"
    assert (tmp_path / "text_sheet.png").stat().st_size > 1000


BAD_SEARCHES = [
    ([], "exactly one of --text or --image"),
    (["--text", "x", "--image", "y.png"], "exactly one"),
    (["--text", " "], "empty"),
    (["--text", "x", "-k", "0"], "at least 1"),
]


@pytest.mark.parametrize("as_json", [[], ["--json"]], ids=["table", "json"])
@pytest.mark.parametrize("args, message", BAD_SEARCHES)
def test_search_rejects_bad_requests_clearly(artifacts, args, message, as_json):
    result = runner.invoke(cli.app, [*map(str, where(artifacts)), "search", *args, *as_json])
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""  # with --json too: a script sees the exit code, nothing to parse


def test_classify_agrees_with_evaluates_zero_shot_predictions(artifacts):
    predictor = load_predictor(artifacts)
    images = pd.read_parquet(artifacts["data"] / "images.parquet")
    test = images[images["split"] == "test"]
    predicted = [predictor.classify(artifacts["data"] / path, k=1).at[0, "label"] for path in test["path"]]
    evaluated = pd.read_csv(artifacts["reports"] / "plots" / "zero_shot_predictions.csv")
    assert predicted == list(evaluated["predicted"])
    top1 = io.read_json(artifacts["reports"] / "metrics.json")["zero_shot"]["top1"]
    assert np.mean(np.array(predicted) == test["class_name"].to_numpy()) == pytest.approx(top1)


def test_classify_prints_probabilities_sorted_over_the_given_labels(artifacts):
    answer = _json([*where(artifacts), "classify", artifacts["images"][0], "--labels", "circle, square,circle,triangle", "--top-k", "5"])
    assert answer["image"] == str(artifacts["images"][0]) and answer["labels_from"] == "--labels"
    assert answer["templates"] and all("{}" in template for template in answer["templates"])
    table = pd.DataFrame(answer["results"])
    assert list(table.columns) == ["rank", "label", "probability", "similarity"] and list(table["rank"]) == [1, 2, 3]
    assert sorted(table["label"]) == ["circle", "square", "triangle"]  # a repeated label counts once
    assert table["probability"].is_monotonic_decreasing and table["probability"].sum() == pytest.approx(1.0, abs=1e-6)
    assert table["similarity"].is_monotonic_decreasing
    dataset = _json([*where(artifacts), "classify", artifacts["images"][0], "--classes-from-dataset", "-k", "2"])
    assert dataset["labels_from"] == "dataset" and len(dataset["results"]) == 2
    assert {row["label"] for row in dataset["results"]} <= set(pd.read_parquet(artifacts["data"] / "images.parquet")["class_name"])
    # The table shows the same ranking, probabilities at 4 decimals.
    out = invoke(cli.app, [*where(artifacts), "classify", artifacts["images"][0], "--classes-from-dataset", "-k", "2"])
    best = dataset["results"][0]
    assert out.splitlines()[2].split() == ["1", best["label"], f"{best['probability']:.4f}", f"{best['similarity']:.4f}"]


@pytest.mark.parametrize("args, message", [(["--labels", "cat"], "at least two different labels"), (["--labels", "a,b", "--classes-from-dataset"], "not both")])
def test_classify_rejects_bad_labels(artifacts, args, message):
    result = runner.invoke(cli.app, [*map(str, where(artifacts)), "classify", str(artifacts["images"][0]), *args])
    assert result.exit_code == 1 and message in result.output


def test_add_then_search_returns_the_added_image_first(artifacts, tmp_path):
    new = _new_images(tmp_path / "new")
    gallery = tmp_path / "gallery"
    base_n = io.read_json(artifacts["index"] / "index.json")["n"]
    duplicate = tmp_path / "dup.png"
    shutil.copyfile(artifacts["images"][4], duplicate)
    out = invoke(cli.app, [*where(artifacts), "--gallery", gallery, "add", new, duplicate])
    assert "2 added, 2 already present, 0 rejected" in out and f"holds {base_n + 2} images" in out
    assert f"{artifacts['images'][4].stem}  {duplicate}" in out  # the dataset's copy is recognised by content
    assert "ignored 1 files" in out

    # The index, the id map and the embeddings Parquet agree; stored files are named by content.
    added, vectors = io.read_embeddings(gallery / "current" / "added.parquet")
    ids = pd.read_parquet(gallery / "current" / "ids.parquet")
    assert len(added) == 2 and vectors.shape == (2, 128) and len(ids) == base_n + 2
    assert list(ids["image_id"].tail(2)) == list(added["image_id"])
    assert all((gallery / p).is_file() for p in added["path"])

    for source in (new / "a.png", new / "sub" / "b.png"):
        top = _json([*where(artifacts), "--gallery", gallery, "search", "--image", source, "-k", "3"])["results"][0]
        assert top["image_id"].startswith("added/") and top["score"] == pytest.approx(1.0, abs=1e-4)
        assert top["path"].startswith(str(gallery / "store")) and top["class"] is None  # an added image has no class

    again = invoke(cli.app, [*where(artifacts), "--gallery", gallery, "add", new / "a.png"])
    assert "0 added, 1 already present" in again and f"holds {base_n + 2} images" in again


def test_add_stops_on_a_corrupt_image_unless_asked_to_skip(artifacts, tmp_path):
    new = _new_images(tmp_path / "new")
    (new / "broken.png").write_bytes((new / "a.png").read_bytes()[:60])  # truncated PNG
    gallery = tmp_path / "gallery"
    result = runner.invoke(cli.app, [*map(str, where(artifacts)), "--gallery", str(gallery), "add", str(new)])
    assert result.exit_code == 1 and str(new / "broken.png") in result.output
    assert not (gallery / "current").exists()  # nothing was added

    out = invoke(cli.app, [*where(artifacts), "--gallery", gallery, "add", new, "--skip-bad"])
    assert "2 added" in out and "1 rejected" in out and f"rejected   {new / 'broken.png'}: not a readable image" in out


def test_add_refuses_an_image_over_the_pixel_limit_from_its_header(artifacts, tmp_path, monkeypatch):
    from PIL import Image

    from pipeline.retrieval import gallery as gallery_lib

    monkeypatch.setattr(gallery_lib, "PIL_MAX_IMAGE_PIXELS", 64 * 64)  # the real limit, 89 M pixels, costs a 90 MB file
    Image.new("RGB", (65, 64)).save(tmp_path / "big.png")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    out = invoke(cli.app, [*where(artifacts), "--gallery", tmp_path / "gallery", "add", tmp_path / "big.png", "--skip-bad"])
    assert "rejected   " in out and "big.png: 65x64 = 4,160 pixels, over the gallery's limit" in out and "0 added" in out
    assert not decoded  # refused from the header


def test_an_interrupted_add_leaves_the_previous_gallery(artifacts, tmp_path, monkeypatch):
    new = _new_images(tmp_path / "new")
    gallery = tmp_path / "gallery"
    predictor = load_predictor(artifacts, gallery)
    predictor.add([new / "a.png"])
    before = pd.read_parquet(gallery / "current" / "ids.parquet")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died while writing the new gallery

    monkeypatch.setattr(io, "write_embedding_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        predictor.add([new / "sub"])
    monkeypatch.undo()

    reopened = load_predictor(artifacts, gallery)
    assert reopened.index.ids["image_id"].tolist() == before["image_id"].tolist()
    assert sorted(p.name for p in gallery.iterdir()) == [".lock", "current", "store"]  # no half-written folder
    # The image whose add was interrupted can be added now.
    assert len(reopened.add([new / "sub"]).added) == 1


def test_a_rebuilt_index_re_embeds_the_added_images(artifacts, tmp_path):
    """After `dvc repro` replaces the index, added images move onto the new one."""
    base = {**artifacts, "index": tmp_path / "index"}
    shutil.copytree(artifacts["index"], base["index"])
    new = _new_images(tmp_path / "new")
    gallery = tmp_path / "gallery"
    load_predictor(base, gallery).add([new])
    old_fingerprint = io.read_json(gallery / "current" / "index.json")["base_fingerprint"]

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"index": {"factory": "HNSW16", "search_params": "efSearch=32"}}))
    invoke(index.app, ["--params", params, "--embeddings", artifacts["emb"], "--out", base["index"], "--timing", tmp_path / "index.json"])
    predictor = load_predictor(base, gallery)
    info = io.read_json(gallery / "current" / "index.json")
    assert info["base_fingerprint"] != old_fingerprint and info["factory"] == "HNSW16" and info["n_added"] == 2
    assert predictor.similar(new / "a.png", 1).at[0, "image_id"].startswith("added/")

    (gallery / io.read_embeddings(gallery / "current" / "added.parquet")[0]["path"][0]).unlink()
    (gallery / "current" / "index.json").write_text((gallery / "current" / "index.json").read_text().replace(info["base_fingerprint"], "stale"))
    with pytest.raises(GalleryError, match="missing from the gallery store"):
        load_predictor(base, gallery)


def test_a_gallery_starts_again_when_the_pipelines_images_change(artifacts, tmp_path, caplog):
    """Images added while working on one dataset belong to it: after `dvc repro` on another one,
    the gallery is the new index alone, and the old gallery is set aside, not deleted."""
    base = {**artifacts, "index": tmp_path / "index"}
    shutil.copytree(artifacts["index"], base["index"])
    new = _new_images(tmp_path / "new")
    gallery = tmp_path / "gallery"
    load_predictor(base, gallery).add([new])
    ids = pd.read_parquet(base["index"] / "ids.parquet")
    ids["image_id"] = "other/" + ids["image_id"].astype(str)  # the same size, other images
    ids.to_parquet(base["index"] / "ids.parquet", index=False)
    predictor = load_predictor(base, gallery)
    assert "starting a new gallery" in caplog.text and "2 added images" in caplog.text
    assert predictor.index.index.ntotal == len(ids) and not predictor.similar(new / "a.png", 3)["image_id"].str.startswith("added/").any()
    (retired,) = (gallery / "retired").iterdir()
    kept = io.read_embeddings(retired / "added.parquet")[0]
    assert len(kept) == 2 and all((gallery / path).is_file() for path in kept["path"])  # the files stay in store/
    assert predictor.add([new / "a.png"]).added  # and the new gallery takes them again


def test_a_gallery_belongs_to_one_index(artifacts, tmp_path):
    other = tmp_path / "other_index"
    shutil.copytree(artifacts["index"], other)
    gallery = tmp_path / "gallery"
    load_predictor(artifacts, gallery).add([_new_images(tmp_path / "new") / "a.png"])
    with pytest.raises(GalleryError, match="extends the index in .*give this index its own gallery"):
        load_predictor({**artifacts, "index": other}, gallery)


def test_text_search_and_classify_refuse_an_image_only_head(artifacts):
    predictor = load_predictor(artifacts)
    predictor.loaded.image_head = object()  # what a triplet-trained model carries
    for call in (lambda: predictor.search_text("a circle"), lambda: predictor.classify(artifacts["images"][0])):
        with pytest.raises(PredictError, match="trained on images only"):
            call()


def test_top_k_past_what_hnsw_finds_falls_back_to_exact_search(artifacts, tmp_path, caplog):
    """HNSW returns at most about efSearch results; asking for more answers by exact search rather
    than silently returning fewer than the gallery holds."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"index": {"factory": "HNSW8", "search_params": "efSearch=4"}}))
    invoke(index.app, ["--params", params, "--embeddings", artifacts["emb"], "--out", tmp_path / "index", "--timing", tmp_path / "t.json"])
    predictor = load_predictor({**artifacts, "index": tmp_path / "index"}, tmp_path / "gallery")
    n = predictor.index.index.ntotal
    hits = predictor.similar(artifacts["images"][0], k=10 * n)
    assert len(hits) == n and hits["image_id"].is_unique
    assert "answering by exact search" in caplog.text


def test_a_top_k_past_the_gallery_says_both_numbers_in_one_clean_line(artifacts, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"index": {"factory": "HNSW8", "search_params": "efSearch=4"}}))
    invoke(index.app, ["--params", params, "--embeddings", artifacts["emb"], "--out", tmp_path / "index", "--timing", tmp_path / "t.json"])
    options = [str(a) for a in where({**artifacts, "index": tmp_path / "index", "gallery": tmp_path / "gallery"})]
    n = len(pd.read_parquet(tmp_path / "index" / "ids.parquet"))
    result = runner.invoke(cli.app, [*options, "similar", str(artifacts["images"][0]), "--top-k", "100000"])
    assert result.exit_code == 0, result.output
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: 100000 results asked for, of {n} vectors in the HNSW8 index")
    assert "WARNING" not in result.output and "pipeline.retrieval" not in result.output
    assert result.stdout.splitlines()[-1] == f"{n} results: the gallery holds {n} images, fewer than the 100000 asked for"
