"""Same params and seed on the CPU: every cached output byte for byte, so DVC can skip work.

A cached output must be a pure function of its stage's inputs. If a rerun that computes the same
thing wrote other bytes (a timing, a device name, a process count), DVC would see a changed
output and rerun everything downstream. Timings go to reports/timing/ instead.
"""

import hashlib

import torch
import yaml
from conftest import run_pipeline

from pipeline import train
from pipeline.datasets import prepare
from pipeline.params import DataParams

# Trains (CLIP, two epochs) so that the check covers the training loop, not only inference.
SMALL = {
    "data": {"synthetic": {"n_classes": 4, "images_per_class": 10, "extra_test_per_class": 0}, "splits": {"train": 0.6, "val": 0.2, "test": 0.2}},
    "train": {"method": "clip", "epochs": 2, "batch_size": 8},
    "index": {"factory": "HNSW16", "search_params": "efSearch=16"},
    "probe": {"k": 3},
    "evaluate": {"n_examples": 1, "recall_k": [1, 5]},
}
CACHED_OUTPUTS = ("data", "model", "emb", "index", "probe")  # DVC-cached: other stages depend on them


def _hashes(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_runs_write_byte_identical_outputs_and_metrics(tmp_path):
    first, second = run_pipeline(tmp_path / "first", SMALL), run_pipeline(tmp_path / "second", SMALL)
    for output in CACHED_OUTPUTS:
        assert _hashes(first[output]) == _hashes(second[output]), f"{output}: a rerun with the same inputs wrote other bytes"
    for report in ("metrics.json", "train/metrics.json", "train/plots/metrics/train/loss.tsv", "train/plots/metrics/val/mean_recall.tsv"):
        assert (first["reports"] / report).read_bytes() == (second["reports"] / report).read_bytes(), report
    # The timings exist, beside the outputs rather than in them.
    timing = {path.stem for path in first["timing"].glob("*.json")}
    assert timing == {"prepare", "train", "embed", "index", "probe", "evaluate"}


def test_dataloader_workers_do_not_change_what_training_learns(tmp_path):
    """runtime.num_workers is not an experiment param: augmentations are drawn per sample, so 0 and
    2 workers give the same weights (siamese: random flips and jitter on both images of a pair)."""
    data = tmp_path / "prepared"
    prepare(DataParams(**SMALL["data"]), data)
    weights = {}
    for workers in (0, 2):
        folder = tmp_path / f"workers{workers}"
        folder.mkdir()
        params = {"train": {"method": "siamese", "epochs": 2, "batch_size": 8, "siamese": {"samples_per_class": 4}},
                  "evaluate": SMALL["evaluate"], "runtime": {"num_workers": workers}}  # fmt: skip
        (folder / "params.yaml").write_text(yaml.safe_dump(params))
        train.main(params_file=folder / "params.yaml", data=data, out=folder / "model", reports=folder / "reports", timing=folder / "timing.json")
        weights[workers] = torch.load(folder / "model" / "last.pt", weights_only=True)["model"]
    assert weights[0].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
