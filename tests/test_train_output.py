"""What `train` tells a person watching `dvc repro` (no terminal, so no progress bars)."""

import yaml

from pipeline import train
from pipeline.datasets import prepare
from pipeline.params import DataParams
from pipeline.training.checkpoints import TrainResult, snapshot


def test_one_line_per_epoch_and_a_word_on_class_prompts_as_captions(tmp_path, capsys):
    data = tmp_path / "prepared"
    prepare(DataParams(synthetic={"n_classes": 3, "images_per_class": 8, "extra_test_per_class": 0}, splits={"train": 0.5, "val": 0.25, "test": 0.25}), data)
    (data / "captions.parquet").unlink()  # a caption-less source, as class folders are
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"method": "clip", "epochs": 2, "batch_size": 4}, "evaluate": {"recall_k": [1]}}))
    train.main(params_file=params, data=data, out=tmp_path / "model", reports=tmp_path / "reports", timing=tmp_path / "timing.json")
    out = capsys.readouterr().out
    assert "has no captions, so each image is paired with its class's prompts (4 templates x class name)" in out
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"]
    assert all(" loss " in line and "val mean_recall" in line and line.endswith("s") for line in epochs)


def test_the_closing_line_gives_the_score_of_the_kept_checkpoint_not_the_last_epoch(tmp_path, capsys, monkeypatch):
    """best.pt is epoch 1 (val 0.700); the last epoch scored 0.400. The line must name epoch 1 and 0.700."""
    data = tmp_path / "prepared"
    prepare(DataParams(synthetic={"n_classes": 3, "images_per_class": 8, "extra_test_per_class": 0}, splits={"train": 0.5, "val": 0.25, "test": 0.25}), data)

    def two_epochs(loaded, *args, **kwargs):
        state = snapshot(loaded.model, 1)
        rows = [{"epoch": 0, "map_at_r": 0.1, "precision_at_1": 0.2}, {"epoch": 1, "map_at_r": 0.7, "precision_at_1": 0.8},
                {"epoch": 2, "map_at_r": 0.4, "precision_at_1": 0.5}]  # fmt: skip
        return TrainResult(best=state, last={**state, "epoch": 2}, best_epoch=1, loss_rows=[{"epoch": e, "loss": 0.1, "epoch_s": 0.0} for e in (1, 2)], val_rows=rows)

    monkeypatch.setitem(train.TRAINERS, "siamese", two_epochs)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"method": "siamese", "epochs": 2}, "evaluate": {"recall_k": [1]}}))
    train.main(params_file=params, data=data, out=tmp_path / "model", reports=tmp_path / "reports", timing=tmp_path / "timing.json")
    out = capsys.readouterr().out
    closing = out.strip().splitlines()[-1]
    assert "best epoch 1, val map_at_r 0.700 in" in closing, closing
    # 3 val classes: best.pt is picked by a noisy score, and the run says so before it trains.
    assert "train siamese: warning: the val split holds 3 class(es): MAP@R over so few identities is a noisy score" in out
