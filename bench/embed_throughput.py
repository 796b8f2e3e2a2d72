"""Images per second of the embed stage's code path, against two references.

1. pipeline:   what `embed` does: image files -> DataLoader -> preprocess -> batched encode under
               inference_mode (AMP on CUDA), plus the class-prompt ensemble encoded once and a
               zero-shot prediction for every image.
2. bare:       the model's forward pass alone on already-preprocessed batches in memory (an upper
               bound: no decoding, no transforms).
3. naive loop: one image at a time, re-encoding every class prompt for every image, the way a
               first script often does it.

Run:  python bench/embed_throughput.py                      # the model `dvc repro` trained
      python bench/embed_throughput.py --model ViT-B-32 --pretrained openai --device cuda
This is a benchmark, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer

from pipeline.datasets.synthetic import BACKGROUNDS, COLOURS, SHAPES, draw_shape
from pipeline.models import create_model, load_trained
from pipeline.models.encode import autocast, encode_class_prompts, encode_images
from pipeline.images import load_rgb

CLASS_NAMES = SHAPES
TEMPLATES = ["a small {}", "a large {}", "a picture of a {}", "there is a {}"]


def _write_images(folder: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        image = draw_shape(
            SHAPES[i % len(SHAPES)],
            list(COLOURS.values())[rng.integers(len(COLOURS))],
            list(BACKGROUNDS.values())[rng.integers(len(BACKGROUNDS))],
            size,
            size * rng.uniform(0.3, 0.7),
            size * rng.uniform(0.3, 0.7),
            size * 0.25,
        )
        paths.append(folder / f"{i:05d}.png")
        image.save(paths[-1])
    return paths


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
        paths = _write_images(Path(tmp), n_images, max(size, 64))
        encode_images(loaded, paths[:batch_size], batch_size, num_workers)  # warm-up

        def pipeline_path():
            image_emb = encode_images(loaded, paths, batch_size, num_workers)
            class_emb = encode_class_prompts(loaded, CLASS_NAMES, TEMPLATES)
            (image_emb @ class_emb.T).argmax(axis=1)

        t_pipeline = _timed(pipeline_path, dev)

        batch = torch.stack([loaded.preprocess(load_rgb(p)) for p in paths[:batch_size]]).to(dev)

        @torch.inference_mode()
        def bare():
            for _ in range(0, n_images, batch_size):
                with autocast(dev):
                    loaded.model.encode_image(batch)

        bare()  # warm-up
        t_bare = _timed(bare, dev)

        @torch.inference_mode()
        def naive():
            for path in paths[:n_naive]:
                image = loaded.preprocess(load_rgb(path)).unsqueeze(0).to(dev)
                image_emb = F.normalize(loaded.model.encode_image(image), dim=-1)
                prompts = [t.format(c) for c in CLASS_NAMES for t in TEMPLATES]
                text_emb = F.normalize(loaded.model.encode_text(loaded.tokenizer(prompts).to(dev)), dim=-1)
                class_emb = F.normalize(text_emb.reshape(len(CLASS_NAMES), len(TEMPLATES), -1).mean(1), dim=-1)
                (image_emb @ class_emb.T).argmax()

        t_naive = _timed(naive, dev)

    rows = [
        ("pipeline (embed stage code path)", n_images / t_pipeline),
        ("bare forward pass (preprocessed, in memory)", n_images / t_bare),
        ("naive per-image loop, prompts re-encoded", n_naive / t_naive),
    ]
    typer.echo(f"model {loaded.name}/{loaded.pretrained} on {dev}, {torch.get_num_threads()} CPU threads, batch {batch_size}, {size}px")
    for name, rate in rows:
        typer.echo(f"{name:<46} {rate:10.1f} images/s")
    typer.echo(f"pipeline / bare: {rows[0][1] / rows[1][1]:.2f}   pipeline / naive: {rows[0][1] / rows[2][1]:.1f}x")


if __name__ == "__main__":
    typer.run(main)
