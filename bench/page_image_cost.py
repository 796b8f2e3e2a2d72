"""What one image search costs the web page, by image size: the page's upload check (header,
then a full decode) and the search itself, in process over the project's artifacts (run
`dvc repro` first). Requests run one at a time on the page, so this is how long an upload of each
size holds up every request behind it; it is what `clipline serve --max-pixels` bounds.

    python bench/page_image_cost.py                      # 640, 5000 and 9459 pixels square (PIL's limit)
    python bench/page_image_cost.py --side 3000 --repeats 5

Images are generated solid-colour PNGs (small files, so the upload limit never decides).
Prints the min and median seconds per size.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import typer
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import web  # noqa: E402
from pipeline.predict import Predictor  # noqa: E402


def main(
    side: list[int] = typer.Option([640, 5000, 9459], help="square image sides to time (9459x9459 is just under PIL's limit)"),
    repeats: int = typer.Option(3, min=1),
) -> None:
    page = web.Page(Predictor.from_artifacts(), web.PageLimits())
    with tempfile.TemporaryDirectory() as tmp:
        for n in side:
            path = Path(tmp) / f"{n}.png"
            Image.new("RGB", (n, n), (120, 30, 200)).save(path)
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                web.check_image(path, path.name, page.limits)
                page.search_image(str(path), 5)
                seconds.append(time.perf_counter() - start)
            print(f"{n}x{n} ({n * n:,} pixels): min {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s")


if __name__ == "__main__":
    typer.run(main)
