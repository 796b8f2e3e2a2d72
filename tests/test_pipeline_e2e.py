"""One real `dvc repro` of the whole pipeline on a small config, and DVC's change tracking: what a
change reruns, and what it must not."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.params import Params
from pipeline.reporting import markdown

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "data": {"synthetic": {"n_classes": 4, "images_per_class": 15, "extra_test_per_class": 0}, "splits": {"train": 0.6, "val": 0.2, "test": 0.2}},
    "train": {"epochs": 2, "batch_size": 16},
    "index": {"factory": "Flat", "search_params": ""},
    "evaluate": {"n_examples": 2},
}
DEFAULT_RECALL_K = Params().evaluate.recall_k


def _run(args, cwd):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _dvc(cwd, *args):
    return _run([sys.executable, "-m", "dvc", *args], cwd)


def _set(params_file: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load(params_file.read_text())
    params[section][key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def _merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        base[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project with a small params.yaml, reproduced once."""
    work = tmp_path_factory.mktemp("project")
    for name in ("pipeline", ".dvc"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    for name in ("dvc.yaml", ".dvcignore", "reports/methods.json"):  # a benchmark's output in the workspace
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, work / name)
    # From the defaults in code, never the checkout's params.yaml: an experiment left in the
    # workspace (`dvc exp run -S model.name=ViT-B-32 ...`) must not change what this test runs.
    params = _merge(Params().model_dump(), SMALL)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], work)
    _commit(work, "the project")  # DVCLive (train) needs a commit; so does `dvc exp run`
    _dvc(work, "repro")
    return work


def _commit(cwd, message: str) -> None:
    _run(["git", "add", "-A"], cwd)
    _run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", message], cwd)


def test_repro_writes_metrics_plots_and_report(project):
    metrics = json.loads((project / "reports/metrics.json").read_text())
    zero_shot, retrieval, index = metrics["zero_shot"], metrics["retrieval"], metrics["index"]
    assert set(zero_shot) >= {"top1", "chance_top1", "n"} and zero_shot["chance_top1"] == 0.25
    assert "top5" not in zero_shot  # 4 classes: top-5 would be trivially 1
    for direction in ("text_to_image", "image_to_text"):
        assert set(retrieval[direction]) == {"R@1", "R@5", "R@10", "n_queries", "n_candidates"}
        assert all(0.0 <= retrieval[direction][f"R@{k}"] <= 1.0 for k in (1, 5, 10))
    assert retrieval["n_images"] == 12 and retrieval["n_texts"] == 60
    # A candidate is its content: the distinct strings and pixel contents of the test split.
    images, captions = (pd.read_parquet(project / f"data/prepared/{t}.parquet") for t in ("images", "captions"))
    test_captions = captions[captions["split"] == "test"]
    assert retrieval["text_to_image"]["n_queries"] == 60 and retrieval["image_to_text"]["n_queries"] == 12
    assert retrieval["image_to_text"]["n_candidates"] == test_captions["caption"].nunique()
    assert retrieval["text_to_image"]["n_candidates"] == images.loc[images["split"] == "test", "content_hash"].nunique()
    assert retrieval["merged"]["repeated_captions"] == 60 - test_captions["caption"].nunique()
    assert index["factory"] == "Flat" and index["recall@10"] == 1.0 and index["n"] == 60
    assert "timing" not in metrics and "qps" not in index  # times are not results: reports/timing/
    timing = {path.stem: json.loads(path.read_text()) for path in (project / "reports/timing").glob("*.json")}
    assert set(timing) == {"prepare", "train", "embed", "index", "probe", "evaluate"}
    assert timing["train"]["train_s"] > 0 and timing["index"]["qps"] > 0
    assert list(metrics["probe"]) == ["pixels", "block2", "block3", "final", "zero_shot"]
    encode_ms = [timing["probe"]["points"][p]["encode_ms"] for p in ("pixels", "block2", "final")]
    assert encode_ms[0] < encode_ms[1] and encode_ms[0] < encode_ms[2]  # pixels need no encoder at all
    report = (project / "reports/report.md").read_text()
    assert "## Retrieval" in report and "figures/retrieval_examples.png" in report
    assert markdown.merged_line(retrieval) in report  # what counting by content merged, if anything
    assert "Methods compared" not in report  # bench/compare_methods.py's results are not this run's
    drawn = sorted(f"figures/{path.name}" for path in (project / "reports/figures").glob("*.png"))
    assert drawn and [figure for figure in drawn if figure not in report] == []  # every figure drawn is shown
    assert set(metrics["verification"]) >= {"threshold", "accuracy", "precision", "recall", "f1", "roc_auc", "eer", "n_pairs", "calibration"}
    assert set(metrics["metric_learning"]) >= {"precision_at_1", "r_precision", "map_at_r"}
    for figure in ("training_curve", "similarity_heatmap", "retrieval_examples", "confusion", "verification_distances", "verification_roc"):
        assert (project / f"reports/figures/{figure}.png").stat().st_size > 1000
    assert (project / "reports/train/plots/metrics/train/loss.tsv").read_text().count("\n") == 3  # header + 2 epochs
    shown = json.dumps(json.loads(_dvc(project, "metrics", "show", "--json")))
    assert "reports/metrics.json" in shown and "reports/timing/train.json" in shown
    assert json.loads(_dvc(project, "status", "--json")) == {}


def test_a_forced_train_that_reproduces_its_weights_reruns_nothing_downstream(project):
    """Cached outputs hold no timings, so the same weights are the same bytes: embed, probe, index
    and evaluate stay up to date after train reruns."""
    out = _dvc(project, "repro", "--force", "--single-item", "train")
    assert "Running stage 'train'" in out
    assert json.loads(_dvc(project, "status", "--json")) == {}


def test_runtime_settings_rerun_nothing(project):
    params_file = project / "params.yaml"
    before = params_file.read_text()
    _set(params_file, "runtime", "device", "cpu")
    _set(params_file, "runtime", "num_workers", 2)
    _set(params_file, "runtime", "batch_size", 3)
    _set(params_file, "runtime", "resume", True)
    _set(params_file, "runtime", "processes", 2)
    try:
        assert json.loads(_dvc(project, "status", "--json")) == {}
    finally:
        params_file.write_text(before)


@pytest.mark.parametrize(
    "edited, rerun",
    [
        ("pipeline/models/probe.py", {"probe"}),  # the probe's encoder cut: not train, embed or index
        ("pipeline/metrics/probe.py", {"probe"}),
        ("pipeline/retrieval/gallery.py", set()),  # the CLI's gallery: no stage runs it
        ("pipeline/datasets/base.py", {"prepare"}),  # split logic: only prepare parses sources
        ("pipeline/images.py", {"prepare", "train", "embed", "probe", "evaluate"}),  # every stage that decodes pixels
        ("pipeline/metrics/retrieval.py", {"train", "evaluate"}),  # validation recall picks best.pt
    ],
)
def test_a_code_edit_marks_exactly_the_stages_that_run_it(project, edited, rerun):
    path = project / edited
    before = path.read_text()
    path.write_text(before + "\n# edited\n")
    try:
        assert set(json.loads(_dvc(project, "status", "--json"))) == rerun
    finally:
        path.write_text(before)
    assert json.loads(_dvc(project, "status", "--json")) == {}


def test_a_param_that_breaks_a_later_stage_fails_the_first_stage_it_reruns(project, tmp_path):
    """A triplet head of 100 dims cannot hold PQ8 codes (8 must divide the dimension): train, the
    first stage the change reruns, refuses it before building a model, not index after training."""
    work = tmp_path / "project"
    shutil.copytree(project, work, symlinks=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"].update(method="triplet", triplet={**params["train"]["triplet"], "head_dim": 100})
    params["index"].update(factory="PQ8", search_params="")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Running stage 'train'" in output and "Running stage 'prepare'" not in output
    assert "error: index.factory 'PQ8' is not a valid FAISS factory string for dim 100" in output
    assert "Traceback" not in output and "epoch" not in output  # refused before any training


def test_a_profile_started_with_git_checkout_does_not_inherit_the_last_experiment(project, tmp_path):
    """`dvc exp run -S` leaves its values in params.yaml; the README's profiles reset it first."""
    work = tmp_path / "project"
    shutil.copytree(project, work, symlinks=True)
    _run(["git", "add", "-A"], work)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "defaults"], work)
    _dvc(work, "exp", "run", "-n", "first", "-S", "evaluate.recall_k=[1,3]")
    assert yaml.safe_load((work / "params.yaml").read_text())["evaluate"]["recall_k"] == [1, 3]  # left behind
    _run(["bash", "-c", "git checkout params.yaml && python -m dvc exp run -n second -S evaluate.n_examples=1"], work)
    second = yaml.safe_load((work / "params.yaml").read_text())["evaluate"]
    assert second["n_examples"] == 1 and second["recall_k"] == DEFAULT_RECALL_K


def test_evaluate_param_reruns_only_evaluate(project):
    _set(project / "params.yaml", "evaluate", "recall_k", [1, 2])
    assert set(json.loads(_dvc(project, "status", "--json"))) == {"evaluate"}
    out = _dvc(project, "repro")
    assert "Running stage 'evaluate'" in out
    assert not any(f"Running stage '{s}'" in out for s in ("prepare", "train", "embed", "index", "probe"))
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics["retrieval"]["text_to_image"]) == {"R@1", "R@2", "n_queries", "n_candidates"}


def test_train_param_reruns_train_and_downstream_not_prepare(project):
    _set(project / "params.yaml", "train", "epochs", 1)
    assert set(json.loads(_dvc(project, "status", "--json"))) == {"train"}
    _set(project / "params.yaml", "train", "epochs", 2)  # back: `dvc exp run -S` below sets it
    _commit(project, "the reproduced pipeline")  # the experiment's baseline
    out = _dvc(project, "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1")
    assert "Running stage 'train'" in out and "Running stage 'probe'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'prepare'" not in out
    assert (project / "reports/train/plots/metrics/train/loss.tsv").read_text().count("\n") == 2
    # DVCLive's per-epoch log is what `dvc exp show` lists for the experiment.
    shown = json.loads(_dvc(project, "exp", "show", "--json"))
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    runs = [run["revs"][0]["data"] for run in experiments if run.get("name") == "one-epoch"]
    assert runs, shown
    train_metrics = runs[0]["metrics"]["reports/train/metrics.json"]["data"]
    assert train_metrics["step"] == 1 and train_metrics["train"]["loss"] > 0 and 0 <= train_metrics["val"]["mean_recall"] <= 1


def test_torchrun_shards_embed_and_match_one_process(project, tmp_path):
    """Two ranks (CPU, gloo) write one shard each, contiguous blocks of rows: concatenated, they are
    the single-process run's rows in its order."""
    from pipeline import io

    out = tmp_path / "embeddings"
    timing = tmp_path / "embed.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline.embed", "--out", str(out), "--timing", str(timing)], project)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert json.loads(timing.read_text())["world_size"] == 2
    single_meta, single = io.read_embeddings(project / "artifacts/embeddings/images")
    sharded_meta, sharded = io.read_embeddings(out / "images")
    pd.testing.assert_frame_equal(sharded_meta, single_meta)
    assert np.allclose(single, sharded, atol=1e-6)
