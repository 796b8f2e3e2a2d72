"""Bad image files: each is an error naming the file and why, or, with on_bad_image: skip, a recorded rejection.

Also: images in other modes are converted to RGB, and the decompression-bomb limit comes from params.
"""

import io as bytes_io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_datasets_folder import make_tree, params

from pipeline import io
from pipeline.datasets import prepare
from pipeline.errors import DatasetError
from pipeline.images import load_rgb


def _jpeg_bytes(side: int = 32) -> bytes:
    buffer = bytes_io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _png_bytes(side: int = 32) -> bytes:
    buffer = bytes_io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    buffer = bytes_io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")  # a few KB on disk, width x height once decoded
    return buffer.getvalue()


# (file name, bytes, words the reason must contain)
BAD_FILES = [
    ("truncated.jpg", _jpeg_bytes()[:300], "not a readable image"),
    ("truncated.png", _png_bytes()[:200], "not a readable image"),
    ("garbage.jpg", b"\xff\xd8\xff" + bytes(range(256)) * 4, "not a readable image"),
    ("empty.png", b"", "empty file (0 bytes)"),
    ("text.jpg", b"this is a text file, not a JPEG\n", "not a readable image"),
    ("huge.png", _bomb_png(3000, 2000), "6,000,000 pixels, over data.max_image_pixels (1,000,000)"),
]


@pytest.mark.parametrize("name, content, reason", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_fail_names_the_file_and_the_reason(tmp_path, name, content, reason):
    root = make_tree(tmp_path / "tree")
    (root / "ant" / name).write_bytes(content)
    with pytest.raises(DatasetError) as err:
        prepare(params(root, max_image_pixels=1_000_000), tmp_path / "out")
    assert str(root / "ant" / name) in str(err.value) and reason in str(err.value)
    assert "on_bad_image: skip" in str(err.value)  # says how to go on
    assert not (tmp_path / "out").exists()  # nothing half-prepared


def test_skip_records_every_rejected_file_with_its_reason(tmp_path):
    root = make_tree(tmp_path / "tree")
    for name, content, _ in BAD_FILES:
        (root / "zebra" / name).write_bytes(content)
    out = tmp_path / "out"
    prepare(params(root, on_bad_image="skip", max_image_pixels=1_000_000), out)

    rejected = pd.read_parquet(out / "rejected.parquet")
    assert sorted(rejected["path"]) == sorted(str(root / "zebra" / name) for name, _, _ in BAD_FILES)
    for name, _, reason in BAD_FILES:
        assert reason in rejected.loc[rejected["path"] == str(root / "zebra" / name), "reason"].item()
    assert set(rejected["kind"]) == {"image"}
    info = io.read_json(out / "dataset.json")
    assert info["n_rejected"] == {"image": len(BAD_FILES), "annotation": 0, "note": 0}
    kept = pd.read_parquet(out / "images.parquet")
    assert len(kept) == 12 and not kept["path"].str.contains("|".join(n for n, _, _ in BAD_FILES)).any()


def test_a_clean_dataset_writes_an_empty_rejected_table(tmp_path):
    prepare(params(make_tree(tmp_path / "tree")), tmp_path / "out")
    rejected = pd.read_parquet(tmp_path / "out" / "rejected.parquet")
    assert rejected.empty and list(rejected.columns) == ["path", "kind", "reason"]


def test_rejected_count_reaches_the_reports(artifacts, tmp_path):
    """evaluate copies the counts from dataset.json into reports/metrics.json."""
    import shutil

    from conftest import invoke

    from pipeline import evaluate

    data = tmp_path / "prepared"
    shutil.copytree(artifacts["data"], data)
    info = io.read_json(data / "dataset.json")
    io.write_json(data / "dataset.json", {**info, "n_rejected": {"image": 3, "annotation": 2, "note": 0}})
    reports = tmp_path / "reports"
    params_file = tmp_path / "params.yaml"
    params_file.write_text("evaluate: {n_examples: 1, recall_k: [1, 5]}\nindex: {factory: Flat, search_params: ''}\n")
    invoke(
        evaluate.app,
        ["--params", params_file, "--data", data, "--embeddings", artifacts["emb"], "--index", artifacts["index"],
         "--probe", artifacts["probe"], "--train-reports", artifacts["reports"] / "train",
         "--reports", reports, "--timing", reports / "timing.json"],
    )  # fmt: skip
    dataset = io.read_json(reports / "metrics.json")["dataset"]
    assert dataset["n_rejected_images"] == 3 and dataset["n_rejected_annotations"] == 2


@pytest.mark.parametrize(
    "mode, pixel, expected",
    [
        ("L", 128, (128, 128, 128)),  # grayscale
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # cyan 0, magenta and yellow full: red
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # fully transparent: the white it is composited on
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),  # opaque: unchanged
        ("LA", (50, 255), (50, 50, 50)),
        ("I;16", 65535, (255, 255, 255)),
    ],
)
def test_other_modes_are_converted_to_rgb(tmp_path, mode, pixel, expected):
    path = tmp_path / ("image.tif" if mode in ("CMYK", "I;16") else "image.png")
    Image.new(mode, (4, 4), pixel).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == pytest.approx(expected, abs=2)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "palette.png", transparency=1)
    assert load_rgb(tmp_path / "palette.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("P", (4, 4), 1).save(tmp_path / "opaque.png")
    assert load_rgb(tmp_path / "opaque.png").mode == "RGB"


def test_bomb_limit_is_a_param_capped_at_pils(tmp_path):
    from pipeline.params import PIL_MAX_IMAGE_PIXELS, ParamsError, load

    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"data: {{max_image_pixels: {PIL_MAX_IMAGE_PIXELS + 1}}}\n")
    with pytest.raises(ParamsError, match="data.max_image_pixels"):
        load(params_file)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped(tmp_path, suffix):
    import numpy as np
    from PIL import Image

    from pipeline.images import load_rgb

    ramp = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(ramp).save(tmp_path / f"grey16{suffix}")
    assert np.asarray(load_rgb(tmp_path / f"grey16{suffix}"))[0, :, 0].tolist() == [0, 1, 128, 255]
