"""Class-disjoint splits (test identities unseen in training) report numbers that mean something."""

from conftest import run_pipeline

from pipeline import io

DISJOINT = {
    "data": {"split_by": "class", "synthetic": {"n_classes": 6, "images_per_class": 8, "extra_test_per_class": 0}, "splits": {"train": 0.34, "val": 0.33, "test": 0.33}},
    "train": {"method": "none"},
    "index": {"factory": "Flat", "search_params": ""},
    "probe": {"k": 3},
    "evaluate": {"n_examples": 1, "recall_k": [1, 5]},
}


def test_the_probe_is_skipped_and_zero_shot_chance_counts_the_test_classes(tmp_path):
    paths = run_pipeline(tmp_path, DISJOINT)
    metrics = io.read_json(paths["reports"] / "metrics.json")
    # The layer probe votes among train classes: with none of the test's, a top-1 would be 0.000 by construction.
    assert "class-disjoint" in metrics["probe"]["skipped"]
    zero_shot = metrics["zero_shot"]
    assert zero_shot["n_classes"] == 2 and zero_shot["n_classes_in_dataset"] == 6 and zero_shot["chance_top1"] == 0.5
    report = (paths["reports"] / "report.md").read_text()
    assert "chooses among the 2 classes present in the `test` split" in report and "Skipped: no class of the 'test' split" in report
