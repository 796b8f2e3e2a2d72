"""report.md says why a section is missing, and shows what was measured."""

import pytest

from pipeline.reporting import markdown

METRICS = {
    "dataset": {"source": "flickr8k", "n_images": 8091, "n_classes": 0, "split": "test"},
    "model": {"name": "ViT-B-32", "pretrained": "openai", "method": "none"},
    "zero_shot": {"skipped": "the dataset has no classes (zero-shot needs at least 2)"},
    "retrieval": {
        "text_to_image": {"R@1": 0.5, "R@5": 0.75, "n_queries": 5000, "n_candidates": 998},
        "image_to_text": {"R@1": 0.625, "R@5": 0.875, "n_queries": 1000, "n_candidates": 4990},
        "n_images": 1000,
        "n_texts": 5000,
        "merged": {"repeated_captions": 10, "identical_images": 2},
    },
    "index": {"factory": "IVF64,Flat", "metric": "ip", "n": 8091, "dim": 512, "recall@10": 0.91},
}


def test_skipped_task_is_explained_and_measured_ones_are_tabled():
    report = markdown.render(METRICS, {"examples": "figures/retrieval_examples.png"})
    assert "## Zero-shot classification\n\nSkipped: the dataset has no classes (zero-shot needs at least 2)." in report
    assert "| text to image | 0.5000 | 0.7500 |" in report
    assert "| image to text | 0.6250 | 0.8750 |" in report
    assert "10 captions repeat another caption's exact string and 2 images are identical copies" in report
    assert "(998 distinct images for 5000 caption queries, 4990 distinct captions for 1000 image queries)" in report
    assert "![text-to-image retrieval examples](figures/retrieval_examples.png)" in report
    assert "| factory | IVF64,Flat |" in report and "| recall@10 | 0.9100 |" in report
    assert "## Training" not in report  # no curve was drawn


def test_methods_table_shows_each_dataset_with_its_overrides():
    methods = {
        "generated_by": "python bench/compare_methods.py",
        "date": "2026-01-01",
        "overrides": {"shapes": ["data.split_by=class", "train.epochs=30"], "digits": ["data.source=folder"]},
        "rows": [
            {"dataset": "shapes", "method": "none", "metric_learning.map_at_r": 0.1},
            {"dataset": "digits", "method": "triplet", "metric_learning.map_at_r": 0.65},
        ],
    }
    table = markdown.methods_table(methods)
    assert "- shapes: `data.split_by=class train.epochs=30`" in table and "- digits: `data.source=folder`" in table
    assert "| dataset | method | metric_learning.map_at_r |" in table
    assert "| shapes | none | 0.1000 |" in table and "| digits | triplet | 0.6500 |" in table
    assert markdown.methods_table({"rows": []}) == ""


def test_methods_table_refuses_the_single_list_of_overrides_older_benches_wrote():
    with pytest.raises(ValueError, match="methods.json: 'overrides' must map each dataset"):
        markdown.methods_table({"overrides": ["data.split_by=class"], "rows": [{"method": "none", "metric_learning.map_at_r": 0.1}]})
