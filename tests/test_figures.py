"""Every figure survives degenerate data (constant values, one point, one class, nothing), and a
figure that fails anyway costs the report one picture, never the metrics."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.reporting import figures, markdown
from pipeline.reporting.outputs import Figures


def _nearly_one(n: int) -> np.ndarray:
    """What a random tiny model's final similarities look like: 1.0 up to rounding."""
    return 1.0 - np.arange(n) * np.finfo(np.float64).eps


@pytest.mark.parametrize("values", [np.array([]), np.array([0.7]), np.full(50, 0.7), _nearly_one(50), np.array([np.nan, 0.2])])
def test_histogram_bins_cover_any_data(values):
    bins = figures.histogram_bins(values, 20)
    assert len(bins) == 21 and np.all(np.diff(bins) > 0)
    finite = values[np.isfinite(values)]
    assert np.all((finite >= bins[0]) & (finite <= bins[-1]))


@pytest.mark.parametrize("n", [1, 40])
def test_figures_draw_constant_and_single_point_data(tmp_path, n):
    same = np.arange(n) % 2 == 0
    figures.distance_histograms(np.full(n, 0.0), same, 0.0, tmp_path / "distances.png")
    neighbours = pd.DataFrame({"probe": "final", "top1_similarity": _nearly_one(n), "correct": same})
    figures.probe_similarity_histograms(neighbours, tmp_path / "probe.png")
    figures.similarity_heatmap(np.ones((n, 4)), np.ones((n, 4)), [str(i) for i in range(n)], tmp_path / "heatmap.png")
    figures.confusion(np.zeros(n, dtype=int), np.zeros(n, dtype=int), ["only"], tmp_path / "confusion.png")
    figures.roc_curve_plot([0.0, 1.0], [0.0, 1.0], 0.5, 0.5, tmp_path / "roc.png")
    figures.verification_confusion({"tn": 0, "fp": n, "fn": 0, "tp": 0}, tmp_path / "vconf.png")
    figures.probe_tradeoff({"final": {"top1": 0.0, "encode_ms": 0.0, "query_ms": 0.0}}, tmp_path / "tradeoff.png")
    figures.probe_tradeoff({}, tmp_path / "skipped.png", skipped="no gallery")
    one_epoch = pd.DataFrame({"epoch": [1] * min(n, 1), "loss": [0.5] * min(n, 1)})
    figures.training_curve(one_epoch, None, tmp_path / "curve.png")
    (tmp_path / "input").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "input" / "image.png")
    figures.retrieval_examples(["a caption"], [[(tmp_path / "input" / "image.png", 1.0, True)]], tmp_path / "examples.png")
    for png in tmp_path.glob("*.png"):
        assert png.stat().st_size > 500, png.name


def test_a_failing_figure_is_recorded_and_the_report_still_renders(tmp_path):
    def broken(path):
        raise ValueError("Too many bins for data range")

    drawn = Figures(tmp_path)
    drawn.draw("broken", "broken.png", broken)
    drawn.draw("roc", "roc.png", figures.roc_curve_plot, [0.0, 1.0], [0.0, 1.0], 0.5, 0.5)
    assert drawn.written == {"roc": "figures/roc.png"} and drawn.failed == {"broken": "ValueError: Too many bins for data range"}
    metrics = {
        "dataset": {"source": "folder", "n_images": 4, "n_classes": 2, "split": "test"},
        "model": {"name": "clipline-tiny", "pretrained": "none", "method": "none"},
        "zero_shot": {"skipped": "x"}, "retrieval": {"skipped": "x"}, "index": {"factory": "Flat"},
    }  # fmt: skip
    report = markdown.render(metrics, drawn.written, drawn.failed)
    assert "## Figures not drawn" in report and "`broken`: ValueError: Too many bins for data range" in report
