"""What `train` tells a person watching `dvc repro` (no terminal, so no progress bars)."""

import yaml

from pipeline import train
from pipeline.datasets import prepare
from pipeline.params import DataParams


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
