"""`clipline verify` / `clipline similar` / `clipline info` and the Predictor API on a tiny artifact set."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import invoke as _invoke, runner, where as _where

from pipeline import cli
from pipeline.predict import Predictor


def _json(args) -> dict:
    """A command's `--json` answer: stdout alone must be one JSON document (notes go to stderr)."""
    result = runner.invoke(cli.app, [str(a) for a in [*args, "--json"]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)


def test_verify_two_images_uses_the_threshold_evaluate_chose(artifacts):
    a, b = artifacts["images"][0], artifacts["images"][-1]
    chosen = Predictor.from_artifacts(artifacts["model"], artifacts["index"], artifacts["data"], artifacts["reports"] / "metrics.json")
    answer = _json([*_where(artifacts), "verify", a, b])
    assert set(answer) == {"image1", "image2", "distance", "similarity", "threshold", "threshold_source", "metrics", "same", "decision", "p_same"}
    assert (answer["image1"], answer["image2"]) == (str(a), str(b))
    assert answer["threshold"] == pytest.approx(chosen.threshold()) and answer["threshold_source"] == "evaluate"
    assert answer["metrics"] == str(artifacts["reports"] / "metrics.json")
    # The decision is the distance against the threshold; the similarity is the same measure as a cosine.
    assert answer["same"] == (answer["distance"] <= answer["threshold"]) and answer["decision"] == ("same" if answer["same"] else "different")
    assert answer["similarity"] == pytest.approx(1 - answer["distance"] ** 2 / 2)
    # P(same) is evaluate's logistic fit on the val pairs, applied to this distance.
    fit = chosen.verification["calibration"]
    assert answer["p_same"] == pytest.approx(1 / (1 + math.exp(-(fit["intercept"] + fit["coef"] * answer["distance"]))))
    # The line for people says the same.
    out = _invoke(cli.app, [*_where(artifacts), "verify", a, b])
    assert out == f"{answer['decision']}  distance {answer['distance']:.4f}  threshold {answer['threshold']:.4f}  p(same) {answer['p_same']:.2f}\n"

    itself = _json([*_where(artifacts), "verify", a, a])
    assert itself["decision"] == "same" and itself["same"] is True and itself["distance"] == pytest.approx(0, abs=1e-5)
    assert itself["similarity"] == pytest.approx(1, abs=1e-6)
    strict = _json([*_where(artifacts), "verify", a, b, "--threshold", "0"])
    assert strict["decision"] == "different" and strict["threshold"] == 0 and strict["threshold_source"] == "--threshold"


def test_verify_pairs_file_writes_csv(artifacts, tmp_path):
    imgs = artifacts["images"]
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"image1": [imgs[0], imgs[1]], "image2": [imgs[0], imgs[2]]}).to_csv(pairs, index=False)
    out_csv = tmp_path / "results.csv"
    assert "pairs same" in _invoke(cli.app, [*_where(artifacts), "verify", "--pairs", pairs, "--out", out_csv])
    results = pd.read_csv(out_csv)
    assert list(results.columns) == ["image1", "image2", "distance", "same", "threshold", "p_same"]
    assert bool(results.at[0, "same"]) and results.at[0, "distance"] == pytest.approx(0, abs=1e-5)
    assert results["p_same"].between(0.0, 1.0).all()
    # --json: the rows themselves, or with --out the file written and the counts.
    answer = _json([*_where(artifacts), "verify", "--pairs", pairs])
    assert answer["n_pairs"] == 2 and answer["n_same"] == int(results["same"].sum()) and answer["out"] is None
    assert [row["same"] for row in answer["results"]] == list(results["same"])
    assert [row["distance"] for row in answer["results"]] == pytest.approx(list(results["distance"]))
    written = _json([*_where(artifacts), "verify", "--pairs", pairs, "--out", tmp_path / "again.csv"])
    assert written["out"] == str(tmp_path / "again.csv") and "results" not in written
    assert pd.read_csv(tmp_path / "again.csv").equals(results)


def test_relative_paths_in_a_pairs_file_are_read_from_its_folder(artifacts, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(artifacts["images"][0], folder / "a.png")
    shutil.copy(artifacts["images"][1], folder / "b.png")
    pd.DataFrame({"image1": ["a.png", "a.png"], "image2": ["a.png", "b.png"]}).to_csv(folder / "pairs.csv", index=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where a.png is not
    answer = _json([*_where(artifacts), "verify", "--pairs", folder / "pairs.csv"])
    assert [row["image1"] for row in answer["results"]] == ["a.png", "a.png"]  # the rows as the file gives them
    assert answer["results"][0]["distance"] == pytest.approx(0, abs=1e-5) and answer["results"][1]["distance"] > 0.01
    pd.DataFrame({"image1": ["a.png"], "image2": ["c.png"]}).to_csv(folder / "pairs.csv", index=False)
    result = runner.invoke(cli.app, [*map(str, _where(artifacts)), "verify", "--pairs", str(folder / "pairs.csv")])
    assert result.exit_code == 1 and f"{folder / 'c.png'}: image file not found" in result.stderr  # where it looked


@pytest.mark.parametrize("command", [["classify", "{folder}"], ["similar", "{folder}"], ["verify", "{folder}", "{image}"]])
def test_a_folder_given_as_an_image_is_called_a_folder(artifacts, tmp_path, command):
    args = [c.format(folder=tmp_path, image=artifacts["images"][0]) for c in command]
    result = runner.invoke(cli.app, [*map(str, _where(artifacts)), *args])
    assert result.exit_code == 1 and f"{tmp_path}: a folder, not an image file" in result.stderr


def test_similar_finds_the_query_itself_first_and_draws_a_sheet(artifacts, tmp_path):
    query = artifacts["images"][3]
    sheet = tmp_path / "sheet.png"
    answer = _json([*_where(artifacts), "similar", query, "--top-k", "3", "--out", sheet])
    assert answer["query"] == {"image": str(query)} and answer["contact_sheet"] == str(sheet)
    assert [hit["rank"] for hit in answer["results"]] == [1, 2, 3]
    top = answer["results"][0]
    assert top["image_id"] == query.stem and top["score"] == pytest.approx(1.0, abs=1e-4) and top["path"] == str(query)
    assert [hit["score"] for hit in answer["results"]] == sorted((hit["score"] for hit in answer["results"]), reverse=True)
    assert sheet.stat().st_size > 1000
    # `similar Q` is `search --image Q`.
    assert _json([*_where(artifacts), "search", "--image", query, "--top-k", "3"])["results"] == answer["results"]


def test_info_json_is_metrics_json_and_the_table_shows_it_flat(artifacts):
    metrics = json.loads((artifacts["reports"] / "metrics.json").read_text())
    assert _json(["info", "--reports", artifacts["reports"]]) == metrics
    out = _invoke(cli.app, ["info", "--reports", artifacts["reports"]])
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert rows["dataset.source"] == [metrics["dataset"]["source"]]
    assert rows["zero_shot.top1"] == [f"{metrics['zero_shot']['top1']:.4f}"]


def test_info_shows_nan_as_null_and_blank(tmp_path):
    """JSON has no NaN: a metric that came out NaN (or infinite) is null in --json and blank in the table."""
    (tmp_path / "metrics.json").write_text('{"verification": {"roc_auc": NaN, "eer": Infinity, "n_pairs": 0}, "probe": {"dims": [1, 2]}}')
    result = runner.invoke(cli.app, ["info", "--reports", str(tmp_path), "--json"])
    assert result.exit_code == 0 and "NaN" not in result.stdout
    assert json.loads(result.stdout) == {"verification": {"roc_auc": None, "eer": None, "n_pairs": 0}, "probe": {"dims": [1, 2]}}
    out = _invoke(cli.app, ["info", "--reports", tmp_path])
    assert [line.split() for line in out.splitlines()[2:]] == [["verification.roc_auc"], ["verification.eer", "inf"], ["verification.n_pairs", "0"]]


BAD_PATHS = [
    ["verify", "{missing}", "{image}"], ["similar", "{missing}"], ["verify", "--pairs", "{missing}"],
    ["classify", "{missing}"], ["search", "--image", "{missing}"],
]  # fmt: skip


@pytest.mark.parametrize("as_json", [[], ["--json"]], ids=["table", "json"])
@pytest.mark.parametrize("command", BAD_PATHS)
def test_bad_paths_are_clear_errors_not_tracebacks(artifacts, tmp_path, command, as_json):
    missing = tmp_path / "no_such_image.jpg"
    args = [c.format(missing=missing, image=artifacts["images"][0]) for c in command]
    result = runner.invoke(cli.app, [*map(str, _where(artifacts)), *args, *as_json])
    assert result.exit_code == 1 and result.stdout == ""  # --json too: nothing on stdout for a script to misread
    assert "error:" in result.stderr and str(missing) in result.stderr and "Traceback" not in result.output


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
        assert _json(["similar", artifacts["images"][3], "-k", "2"])["results"][0]["image_id"] == artifacts["images"][3].stem
        assert "dataset.source" in _invoke(cli.app, ["info"])
        assert _json(["verify", artifacts["images"][0], artifacts["images"][1]])["metrics"] == str(root / "reports" / "metrics.json")
    finally:
        (root / "dvc.yaml").unlink()
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here or above
    result = runner.invoke(cli.app, ["similar", str(artifacts["images"][3])])
    assert result.exit_code == 1 and f"no dvc.yaml in {tmp_path} or any folder above it" in result.output
    # One error names every path still needed, where it goes on the command line.
    assert "clipline --model PATH --index PATH --data PATH --metrics PATH --embeddings PATH similar ..." in result.output
    result = runner.invoke(cli.app, ["--model", str(artifacts["model"]), "search", "--text", "a red circle"])
    assert result.exit_code == 1 and "give the paths: clipline --index PATH --data PATH --metrics PATH --embeddings PATH search ..." in result.output
    result = runner.invoke(cli.app, ["info"])
    assert result.exit_code == 1 and "give the paths: clipline info --reports PATH" in result.output
    # Given them, every command works from outside the project.
    assert "dataset.source" in _invoke(cli.app, ["info", "--reports", artifacts["reports"]])
    assert _json([*_where(artifacts), "similar", artifacts["images"][3], "-k", "1"])["results"][0]["image_id"] == artifacts["images"][3].stem


def test_result_paths_are_absolute_whatever_the_source_and_the_folder(artifacts, tmp_path, monkeypatch):
    """A source outside the prepared folder (class folders, a file list) records its root as params
    gave it, relative to the project; results name the files absolutely from any folder."""
    import shutil

    project = tmp_path / "project"
    data = project / "data" / "prepared"
    shutil.copytree(artifacts["data"], data)
    images = pd.read_parquet(data / "images.parquet")
    for path in images["path"]:  # the images move out of the prepared folder, under data/raw
        (project / "data" / "raw" / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(data / path, project / "data" / "raw" / path)
    (data / "pixels.npy").unlink(missing_ok=True)
    info = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**info, "image_root": "data/raw"}))
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "notebooks").mkdir()
    monkeypatch.chdir(project / "notebooks")
    options = [*map(str, _where(artifacts))]
    options[options.index("--data") + 1] = str(data)
    query = project / "data" / "raw" / images["path"].iloc[3]
    hits = _json([*options, "similar", query, "-k", "3"])["results"]
    assert hits[0]["path"] == str(query) and all(Path(hit["path"]).is_absolute() and Path(hit["path"]).is_file() for hit in hits)
    synthetic = _json([*_where(artifacts), "similar", artifacts["images"][3], "-k", "3"])["results"]
    assert all(Path(hit["path"]).is_absolute() and Path(hit["path"]).is_file() for hit in synthetic)


@pytest.mark.parametrize("out", ["{tmp}", "{tmp}/sheet"])
def test_a_contact_sheet_path_without_an_image_format_is_refused_up_front(artifacts, tmp_path, out):
    out = out.format(tmp=tmp_path)
    result = runner.invoke(cli.app, [*map(str, _where(artifacts)), "similar", str(artifacts["images"][0]), "--out", out])
    assert result.exit_code == 1 and f"error: --out {out}:" in result.output and "Traceback" not in result.output


def test_a_negative_threshold_is_refused(artifacts):
    result = runner.invoke(cli.app, [*map(str, _where(artifacts)), "verify", str(artifacts["images"][0]), str(artifacts["images"][1]), "--threshold", "-1"])
    assert result.exit_code == 2 and "--threshold" in result.output


def test_a_narrow_terminal_folds_long_paths_instead_of_cutting_them(monkeypatch):
    """On a terminal the table fits its width; a long path folds onto more lines, every character kept."""
    import io as stdio
    import re

    class Terminal(stdio.StringIO):
        def isatty(self):
            return True

    path = "/a/rather/long/folder/name/that/does/not/fit/in/forty/columns/image_00001.png"
    terminal = Terminal()
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setattr("sys.stdout", terminal)
    cli._emit(False, {}, [{"rank": 1, "score": 0.123456, "image_id": "image_00001", "class": None, "path": path}])
    lines = re.sub(r"\x1b\[[0-9;]*m", "", terminal.getvalue()).splitlines()  # a terminal gets colour; these tests do not read it
    assert max(len(line) for line in lines) <= 40 and "…" not in terminal.getvalue()
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    assert lines[rule + 1].split()[:2] == ["1", "0.1235"]
    assert "".join(line.split()[-1] for line in lines[rule + 1 :]) == path  # the last column, folded


def test_help_option_errors_and_info_load_no_model_libraries(artifacts):
    """Start-up: torch and open_clip take seconds to import, and --help, a mistyped option or info
    need neither (bench/cli_startup.py measures the time)."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom pipeline.cli import app\n"
        f"for args in (['--help'], ['search', '--txet', 'x'], ['info', '--reports', {str(artifacts['reports'])!r}]):\n"
        "    try:\n        app(args, prog_name='clipline')\n    except SystemExit as end:\n        print('exit', end.code)\n"
        "print('loaded:', sorted(name for name in ('torch', 'open_clip', 'faiss', 'gradio') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    exits = [line for line in result.stdout.splitlines() if line.startswith("exit ")]
    assert exits == ["exit 0", "exit 2", "exit 0"], result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.strip().endswith("loaded: []")
