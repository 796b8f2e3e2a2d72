"""`clipline verify` / `clipline similar` and the Predictor API on a tiny artifact set."""

import pandas as pd
import pytest
from conftest import invoke as _invoke, runner, where as _where

from pipeline import cli
from pipeline.predict import Predictor


def test_verify_two_images_uses_the_threshold_evaluate_chose(artifacts):
    a, b = artifacts["images"][0], artifacts["images"][-1]
    out = _invoke(cli.app, [*_where(artifacts), "verify", a, b])
    assert out.split()[0] in ("same", "different") and "distance" in out and "confidence" in out
    chosen = Predictor.from_artifacts(artifacts["model"], artifacts["index"], artifacts["data"], artifacts["reports"] / "metrics.json")
    assert f"threshold {chosen.threshold():.4f}" in out
    assert _invoke(cli.app, [*_where(artifacts), "verify", a, a]).startswith("same  distance 0.0000")
    assert _invoke(cli.app, [*_where(artifacts), "verify", a, b, "--threshold", "0"]).startswith("different")


def test_verify_pairs_file_writes_csv(artifacts, tmp_path):
    imgs = artifacts["images"]
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"image1": [imgs[0], imgs[1]], "image2": [imgs[0], imgs[2]]}).to_csv(pairs, index=False)
    out_csv = tmp_path / "results.csv"
    assert "pairs same" in _invoke(cli.app, [*_where(artifacts), "verify", "--pairs", pairs, "--out", out_csv])
    results = pd.read_csv(out_csv)
    assert list(results.columns) == ["image1", "image2", "distance", "same", "threshold", "confidence"]
    assert bool(results.at[0, "same"]) and results.at[0, "distance"] == pytest.approx(0, abs=1e-5)
    assert results["confidence"].between(0.5, 1.0).all()


def test_similar_finds_the_query_itself_first_and_draws_a_sheet(artifacts, tmp_path):
    query = artifacts["images"][3]
    sheet = tmp_path / "sheet.png"
    out = _invoke(cli.app, [*_where(artifacts), "similar", query, "--top-k", "3", "--out", sheet])
    lines = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 3 and query.stem in lines[0] and " 1.0000 " in f" {lines[0].split()[1]} "
    assert sheet.stat().st_size > 1000


@pytest.mark.parametrize("command", [["verify", "{missing}", "{image}"], ["similar", "{missing}"], ["verify", "--pairs", "{missing}"]])
def test_bad_paths_are_clear_errors_not_tracebacks(artifacts, tmp_path, command):
    missing = tmp_path / "no_such_image.jpg"
    args = [c.format(missing=missing, image=artifacts["images"][0]) for c in command]
    result = runner.invoke(cli.app, [*map(str, _where(artifacts)), *args])
    assert result.exit_code == 1
    assert "error:" in result.output and str(missing) in result.output and "Traceback" not in result.output


def test_corrupt_image_and_missing_second_image(artifacts, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    result = runner.invoke(cli.app, [*map(str, _where(artifacts)), "similar", str(corrupt)])
    assert result.exit_code == 1 and str(corrupt) in result.output and "not a readable image" in result.output
    result = runner.invoke(cli.app, [*map(str, _where(artifacts)), "verify", str(artifacts["images"][0])])
    assert result.exit_code == 1 and "give two images" in result.output


def test_predictor_api(artifacts):
    predictor = Predictor.from_artifacts(artifacts["model"], artifacts["index"], artifacts["data"], artifacts["reports"] / "metrics.json")
    verdict = predictor.verify(artifacts["images"][0], artifacts["images"][0])
    assert verdict.same and verdict.distance == pytest.approx(0, abs=1e-5)
    hits = predictor.similar(artifacts["images"][5], k=2)
    assert list(hits.columns[:2]) == ["image_id", "path"] and len(hits) == 2


def test_probe_rows_reach_metrics_and_their_timings_reach_reports_timing(artifacts):
    import json

    probe_rows = json.loads((artifacts["reports"] / "metrics.json").read_text())["probe"]
    assert list(probe_rows) == ["pixels", "block2", "block3", "final", "zero_shot"]
    for name, row in probe_rows.items():
        assert set(row) <= {"top1", "top5", "dim"} and row["dim"] > 0 and 0 <= row["top1"] <= 1, name
    assert probe_rows["pixels"]["dim"] == 3 * 64 * 64
    # Times are the probe stage's metric, outside its cached output and outside metrics.json.
    times = json.loads((artifacts["timing"] / "probe.json").read_text())["points"]
    assert list(times) == list(probe_rows)
    assert all(row["encode_ms"] > 0 and row["query_ms"] > 0 for row in times.values())
    assert (artifacts["reports"] / "probe_tradeoff.png").stat().st_size > 1000
    assert "## Layer probe" in (artifacts["reports"] / "report.md").read_text()


def test_commands_find_the_project_from_any_folder_inside_it(artifacts, monkeypatch, tmp_path):
    """The artifacts fixture has the default layout under one root; with a dvc.yaml there, the
    commands work from a subfolder with no options, as git and dvc do."""
    root = artifacts["data"].parents[1]
    (root / "dvc.yaml").write_text("stages: {}\n")
    try:
        monkeypatch.chdir(artifacts["reports"] / "train")
        out = _invoke(cli.app, ["similar", artifacts["images"][3], "-k", "2"])
        assert artifacts["images"][3].stem in out.splitlines()[1]
        assert "dataset.source" in _invoke(cli.app, ["info"])
    finally:
        (root / "dvc.yaml").unlink()
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here or above
    result = runner.invoke(cli.app, ["similar", str(artifacts["images"][3])])
    assert result.exit_code == 1 and f"no dvc.yaml in {tmp_path} or any folder above it" in result.output


@pytest.mark.parametrize("out", ["{tmp}", "{tmp}/sheet"])
def test_a_contact_sheet_path_without_an_image_format_is_refused_up_front(artifacts, tmp_path, out):
    out = out.format(tmp=tmp_path)
    result = runner.invoke(cli.app, [*map(str, _where(artifacts)), "similar", str(artifacts["images"][0]), "--out", out])
    assert result.exit_code == 1 and f"error: --out {out}:" in result.output and "Traceback" not in result.output


def test_a_negative_threshold_is_refused(artifacts):
    result = runner.invoke(cli.app, [*map(str, _where(artifacts)), "verify", str(artifacts["images"][0]), str(artifacts["images"][1]), "--threshold", "-1"])
    assert result.exit_code == 2 and "--threshold" in result.output
