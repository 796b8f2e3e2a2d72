"""Images per second of the embed stage's code path, against two references.

1. pipeline:   what `embed` does on the default data: the prepared dataset's pixel store (images
               `prepare` decoded once) -> DataLoader -> per-sample geometry (uint8) -> batched
               normalisation and encode under inference_mode (AMP on CUDA), plus the class-prompt
               ensemble encoded once and a zero-shot prediction for every image.
   from files: the same, reading and decoding the PNG files (a source without a pixel store).
2. bare:       the model's forward pass alone on already-preprocessed batches in memory (an upper
               bound: no decoding, no transforms).
3. naive loop: one image at a time, re-encoding every class prompt for every image, the way a
               first script often does it.

Run:  python bench/embed_throughput.py                      # the model `dvc repro` trained
      python bench/embed_throughput.py --model ViT-B-32 --pretrained openai --device cuda
This is a benchmark, not a test: numbers depend on the machine. The pipeline and bare passes
alternate `--repeats` times and the medians are reported, so a busy moment hits both alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import typer

from pipeline.datasets import prepare
from pipeline.datasets.synthetic import PROMPT_TEMPLATES as TEMPLATES
from pipeline.datasets.synthetic import SHAPES as CLASS_NAMES
from pipeline.images import load_rgb
from pipeline.models import create_model, load_trained
from pipeline.models.encode import autocast, encode_class_prompts, encode_images
from pipeline.params import DataParams
from pipeline.images import image_refs
from pipeline.prepared import load_prepared


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(
    model_dir: Path = typer.Option(Path("artifacts/model"), help="trained model folder (used unless --model is given)"),
    model: Optional[str] = typer.Option(None, help="an open_clip model name instead of the trained model"),
    pretrained: str = typer.Option("none", help="weights for --model"),
    device: str = typer.Option("auto"),
    n_images: int = typer.Option(1024, help="images for the pipeline and bare measurements"),
    n_naive: int = typer.Option(64, help="images for the (slow) per-image loop"),
    batch_size: int = typer.Option(256),
    num_workers: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    repeats: int = typer.Option(5, help="interleaved timings of each path; medians are reported"),
) -> None:
    if threads:
        torch.set_num_threads(threads)
    if model:
        loaded = create_model(model, pretrained, device)
        loaded.model.eval()
    else:
        loaded, _ = load_trained(model_dir, device)
    dev = loaded.device
    size = loaded.model.visual.image_size
    size = size if isinstance(size, int) else size[0]

    with tempfile.TemporaryDirectory() as tmp:
        # The default dataset's images at the model's size, prepared as `dvc repro` prepares them.
        per_class = -(-n_images // 8)
        synthetic = {"n_classes": 8, "images_per_class": per_class, "extra_test_per_class": 0, "image_size": max(size, 32)}
        prepare(DataParams(synthetic=synthetic), Path(tmp) / "prepared")
        prepared = load_prepared(Path(tmp) / "prepared")
        stored = prepared.image_paths()[:n_images]  # the pixel store, as embed reads it
        files = image_refs(prepared.images, prepared.image_root)[:n_images]  # the PNG files
        encode_images(loaded, stored[:batch_size], batch_size, num_workers)  # warm-up

        def pipeline_path(refs):
            def run():
                image_emb = encode_images(loaded, refs, batch_size, num_workers)
                class_emb = encode_class_prompts(loaded, CLASS_NAMES, TEMPLATES)
                (image_emb @ class_emb.T).argmax(axis=1)

            return run

        # The model's input as the pipeline feeds it (normalised uint8, channels-last), kept in memory.
        sample, normalise = loaded.eval_pixels
        batch = normalise(torch.stack([sample(load_rgb(p)) for p in files[:batch_size]])).to(dev)

        @torch.inference_mode()
        def bare():
            for _ in range(0, n_images, batch_size):
                with autocast(dev):
                    loaded.model.encode_image(batch)

        bare()  # warm-up
        times = {"pipeline": [], "files": [], "bare": []}
        for _ in range(repeats):  # interleaved: a busy moment slows all three alike
            times["pipeline"].append(_timed(pipeline_path(stored), dev))
            times["files"].append(_timed(pipeline_path(files), dev))
            times["bare"].append(_timed(bare, dev))
        t_pipeline, t_files, t_bare = (statistics.median(times[k]) for k in ("pipeline", "files", "bare"))

        @torch.inference_mode()
        def naive():
            for path in files[:n_naive]:
                image = loaded.preprocess(load_rgb(path)).unsqueeze(0).to(dev)
                image_emb = F.normalize(loaded.model.encode_image(image), dim=-1)
                prompts = [t.format(c) for c in CLASS_NAMES for t in TEMPLATES]
                text_emb = F.normalize(loaded.model.encode_text(loaded.tokenizer(prompts).to(dev)), dim=-1)
                class_emb = F.normalize(text_emb.reshape(len(CLASS_NAMES), len(TEMPLATES), -1).mean(1), dim=-1)
                (image_emb @ class_emb.T).argmax()

        t_naive = _timed(naive, dev)

    rows = [
        ("pipeline (embed stage code path, pixel store)", n_images / t_pipeline),
        ("pipeline reading the PNG files", n_images / t_files),
        ("bare forward pass (preprocessed, in memory)", n_images / t_bare),
        ("naive per-image loop, prompts re-encoded", n_naive / t_naive),
    ]
    typer.echo(f"model {loaded.name}/{loaded.pretrained} on {dev}, {torch.get_num_threads()} CPU threads, batch {batch_size}, {size}px")
    for name, rate in rows:
        typer.echo(f"{name:<46} {rate:10.1f} images/s")
    bare_rate = rows[2][1]
    typer.echo(
        f"pipeline / bare: {rows[0][1] / bare_rate:.2f} (worst of the repeats {min(t_bare / t for t in times['pipeline']):.2f})   "
        f"from files / bare: {rows[1][1] / bare_rate:.2f}   pipeline / naive: {rows[0][1] / rows[3][1]:.1f}x   (medians of {repeats})"
    )


if __name__ == "__main__":
    typer.run(main)
