"""A seeded, offline dataset of drawn shapes with five varied captions each.

Each image has a class (the shape) and attributes the class does not determine: colour, size,
position and background. Captions mention different subsets of these in different words, so
caption-to-image retrieval needs more than the class, and zero-shot classification of the shape
is a separate task.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pipeline.datasets.base import PreparedDataset, class_entry, split_images
from pipeline.params import DataParams

# The first `data.synthetic.n_classes` are used (8 by default). The rest are there for class-disjoint
# splits, where metric learning needs many training identities; new shapes go at the end, so a
# given n_classes always draws the same images.
SHAPES = [
    "circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring", "pentagon", "semicircle", "crescent", "arrow",
    "heart", "trapezoid", "parallelogram", "hourglass", "chevron", "ellipse", "house", "frame",
]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (245, 245, 245)}
SIZES = {"small": 0.2, "large": 0.34}  # radius as a fraction of the image side
POSITIONS = {"center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7)}
POSITION_PHRASES = {
    "center": "in the middle",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

CAPTION_TEMPLATES = [
    "a {size} {colour} {shape} on a {background} background",
    "{a_colour} {shape} {where}",
    "a {shape} drawn in {colour}, {size}, {where}",
    "{where} there is a {size} {shape}",
    "a picture of {a_colour} {shape} with a {background} backdrop",
]
PROMPT_TEMPLATES = ["a small {}", "a large {}", "a picture of a {}", "there is a {}"]


def _polygon(cx: float, cy: float, r: float, n: int, rotation: float = -math.pi / 2, inner: float = 1.0):
    points = []
    steps = n * (2 if inner != 1.0 else 1)
    for i in range(steps):
        radius = r if i % 2 == 0 or inner == 1.0 else r * inner
        angle = rotation + 2 * math.pi * i / steps
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_shape(shape: str, colour: tuple, background: tuple, size: int, cx: float, cy: float, r: float) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r * 0.35)))
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3), fill=colour)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4), fill=colour)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rotation=0.0), fill=colour)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, inner=0.45), fill=colour)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5), fill=colour)
    elif shape == "semicircle":
        draw.pieslice((cx - r, cy - r * 0.5, cx + r, cy + r * 1.5), 180, 360, fill=colour)
    elif shape == "crescent":
        draw.ellipse(box, fill=colour)
        shift = r * 0.55
        draw.ellipse((cx - r + shift, cy - r - shift * 0.3, cx + r + shift, cy + r - shift * 0.3), fill=background)
    elif shape == "arrow":
        w = r * 0.3
        draw.rectangle((cx - r, cy - w, cx + r * 0.1, cy + w), fill=colour)
        draw.polygon([(cx + r * 0.1, cy - r * 0.7), (cx + r, cy), (cx + r * 0.1, cy + r * 0.7)], fill=colour)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif shape == "heart":
        draw.ellipse((cx - r, cy - r * 0.75, cx, cy + r * 0.25), fill=colour)
        draw.ellipse((cx, cy - r * 0.75, cx + r, cy + r * 0.25), fill=colour)
        draw.polygon([(cx - r * 0.97, cy - r * 0.1), (cx + r * 0.97, cy - r * 0.1), (cx, cy + r)], fill=colour)
    elif shape == "trapezoid":
        draw.polygon([(cx - r * 0.5, cy - r * 0.6), (cx + r * 0.5, cy - r * 0.6), (cx + r, cy + r * 0.6), (cx - r, cy + r * 0.6)], fill=colour)
    elif shape == "parallelogram":
        draw.polygon([(cx - r * 0.4, cy - r * 0.55), (cx + r, cy - r * 0.55), (cx + r * 0.4, cy + r * 0.55), (cx - r, cy + r * 0.55)], fill=colour)
    elif shape == "hourglass":
        draw.polygon([(cx - r * 0.8, cy - r), (cx + r * 0.8, cy - r), (cx, cy)], fill=colour)
        draw.polygon([(cx - r * 0.8, cy + r), (cx + r * 0.8, cy + r), (cx, cy)], fill=colour)
    elif shape == "chevron":
        draw.line([(cx - r, cy + r * 0.5), (cx, cy - r * 0.5), (cx + r, cy + r * 0.5)], fill=colour, width=max(2, int(r * 0.35)), joint="curve")
    elif shape == "ellipse":
        draw.ellipse((cx - r, cy - r * 0.55, cx + r, cy + r * 0.55), fill=colour)
    elif shape == "house":
        draw.rectangle((cx - r * 0.7, cy - r * 0.1, cx + r * 0.7, cy + r), fill=colour)
        draw.polygon([(cx - r * 0.95, cy - r * 0.1), (cx + r * 0.95, cy - r * 0.1), (cx, cy - r)], fill=colour)
    elif shape == "frame":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), outline=colour, width=max(2, int(r * 0.3)))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def prepare(params: DataParams, out_dir: Path) -> PreparedDataset:
    cfg = params.synthetic
    rng = np.random.default_rng(params.seed)
    shapes = SHAPES[: cfg.n_classes]
    side = cfg.image_size
    image_dir = out_dir / "images" / "synthetic"
    image_dir.mkdir(parents=True, exist_ok=True)

    images, captions = [], []

    def draw(label: int, shape: str, k: int) -> None:
        colour = rng.choice(list(COLOURS))
        background = rng.choice(list(BACKGROUNDS))
        size = rng.choice(list(SIZES))
        position = rng.choice(list(POSITIONS))
        # Small jitter so no two images of one attribute combination are pixel-identical.
        px, py = POSITIONS[position]
        cx = (px + rng.uniform(-0.04, 0.04)) * side
        cy = (py + rng.uniform(-0.04, 0.04)) * side
        r = SIZES[size] * side * rng.uniform(0.9, 1.1)
        image_id = f"{shape}_{k:05d}"
        path = f"images/synthetic/{image_id}.png"
        draw_shape(shape, COLOURS[colour], BACKGROUNDS[background], side, cx, cy, r).save(out_dir / path)
        images.append({"image_id": image_id, "path": path, "label": label, "class_name": shape})
        words = {
            "shape": shape,
            "colour": colour,
            "a_colour": ("an " if colour[0] in "aeiou" else "a ") + colour,
            "background": background,
            "size": size,
            "where": POSITION_PHRASES[position],
        }
        for n, template in enumerate(CAPTION_TEMPLATES):
            captions.append({"caption_id": f"{image_id}#{n}", "image_id": image_id, "caption": template.format(**words)})

    for label, shape in enumerate(shapes):
        for k in range(cfg.images_per_class):
            draw(label, shape, k)
    split = list(split_images([row["label"] for row in images], params))
    # The extra test images come after every other draw, so the train and val images (and their
    # splits) are those of the same params without them.
    test_classes = sorted({row["label"] for row, s in zip(images, split) if s == "test"})
    for label in test_classes:
        for k in range(cfg.images_per_class, cfg.images_per_class + cfg.extra_test_per_class):
            draw(label, shapes[label], k)
    split += ["test"] * (len(images) - len(split))

    images = pd.DataFrame(images)
    images["split"] = split
    captions = pd.DataFrame(captions).merge(images[["image_id", "split"]], on="image_id")
    return PreparedDataset(
        source="synthetic",
        images=images,
        captions=captions,
        classes=[class_entry(i, shape) for i, shape in enumerate(shapes)],
        templates=PROMPT_TEMPLATES,
        image_root=out_dir,
    )
