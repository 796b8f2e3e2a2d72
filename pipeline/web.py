"""The web page of `clipline serve`: Gradio tabs over one Predictor, loaded once.

Tabs: text search, image search, zero-shot classification, verification (when evaluate chose a
threshold) and adding images to the gallery. The page binds to localhost unless told otherwise.

Requests run one at a time, so each is bounded (`PageLimits`): uploads in bytes (Gradio's
`max_file_size` while an upload streams in; `RequestGuard` for every other request body, so a file
inlined as a `data:` URL cannot pass the limit) and in pixels (read from the image header, before
anything is decoded), and the work a request asks for (labels, text length, results, files to add).
A file that is not an image is answered with a message that says so. `RequestGuard` also serves
only images from Gradio's cache (where every displayed result and upload is copied): the dataset's
tables, pixels, the gallery's index and whatever else sits beside the images answer 403.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports: set before gradio loads

import functools  # noqa: E402
import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.errors import DatasetError  # noqa: E402
from pipeline.images import load_rgb  # noqa: E402
from pipeline.params import PIL_MAX_IMAGE_PIXELS  # noqa: E402
from pipeline.predict import Predictor  # noqa: E402
from pipeline.stage import USER_ERRORS  # noqa: E402


@dataclass
class PageLimits:
    """What one request may send and ask for, and what the server keeps between requests. The work
    limits keep any one request to about a second on the default model (bench/serve_load.py), since
    every request waits for the one before."""

    max_upload_mb: float = 10.0
    max_pixels: int = PIL_MAX_IMAGE_PIXELS  # the one limit prepare and `clipline add` apply too
    max_labels: int = 100  # zero-shot labels: each is encoded with every prompt template
    max_label_chars: int = 100
    max_text_chars: int = 1000  # the tokenizer keeps 77 tokens; the rest is never read
    max_k: int = 50  # results (search) or top classes (classify)
    max_add_files: int = 64
    # Gradio keeps a copy of every component's config for each session (a browser tab, or one API
    # call), 10,000 sessions by default: ~60 KB each on this page, so memory grew with every API
    # call until 600 MB more. The page keeps no state in a session, so a dropped one loses nothing.
    sessions_kept: int = 100

    @property
    def max_body_bytes(self) -> int:
        """Largest request body besides uploads: the labels and text limits with room for the JSON,
        and never more than an upload may be (a file inlined in JSON is still a file)."""
        work = 4 * (self.max_labels * (self.max_label_chars + 1) + self.max_text_chars) + 64 * 1024
        return min(work, int(self.max_upload_mb * 1024 * 1024))


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


class RequestGuard:
    """ASGI middleware in front of Gradio's routes.

    - `.../file=<path>` is served only for an image file inside `servable` (Gradio's cache, where
      results are copied before they are shown and uploads land); anything else is 403, whatever
      Gradio's own allowed paths would let through.
    - A request body other than an upload (JSON calls, queue joins) larger than `max_body_bytes` is
      refused with 413 before Gradio parses it; uploads are limited by Gradio as they stream in.
    """

    def __init__(self, app, max_body_bytes: int, servable: list[str]):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.servable = [Path(os.path.realpath(folder)) for folder in servable]

    def may_serve(self, requested: str) -> bool:
        if "://" in requested:  # Gradio would fetch and relay a remote URL: the page shows none
            return False
        real = Path(os.path.realpath(requested))  # links and `..` resolved before the check
        return real.suffix.lower() in IMAGE_SUFFIXES and real.is_file() and any(real.is_relative_to(root) for root in self.servable)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if "/file=" in path:
            if not self.may_serve(path.split("/file=", 1)[1]):
                return await _answer(send, 403, "this page serves only the images it shows")
        elif scope["method"] in ("POST", "PUT", "PATCH") and not path.rstrip("/").endswith("/upload"):
            body, complete = await _read_body(receive, self.max_body_bytes)
            if not complete:
                return await _answer(send, 413, f"request body over {self.max_body_bytes:,} bytes, more than any request of this page needs (files are uploaded, not inlined)")
            receive = _replay(body)
        return await self.app(scope, receive, send)


async def _read_body(receive, limit: int) -> tuple[bytes, bool]:
    """The whole body, or (what was read, False) as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", False
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _answer(send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def check_image(path: str | Path, name: str, limits: PageLimits) -> None:
    """Raise gr.Error unless `path` is an image within the pixel limit that decodes completely."""
    try:
        with Image.open(path) as img:  # reads the header only
            width, height = img.size
    except Image.DecompressionBombError:
        raise gr.Error(f"{name} is too large an image; this page accepts at most {limits.max_pixels:,} pixels") from None
    except Exception as err:  # PIL raises many types for non-images
        raise gr.Error(f"{name} is not an image this page can read ({type(err).__name__})") from None
    if width * height > limits.max_pixels:
        raise gr.Error(f"{name} is {width}x{height} pixels; this page accepts at most {limits.max_pixels:,} pixels")
    try:
        load_rgb(path)  # decodes everything: a truncated file fails here
    except DatasetError as err:
        raise gr.Error(f"{name} is not a readable image: {str(err).split(': ', 1)[-1]}") from None


def image_upload(label: str, limits: PageLimits, **kwargs) -> gr.Image:
    """An image upload whose file is checked by `check_image` before any handler sees it."""
    component = gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"], **kwargs)
    plain_preprocess = component.preprocess

    # Wrapped on the instance: a gr.Image subclass would make Gradio write a .pyi beside this module.
    def checked_preprocess(payload):
        if payload is None:
            return None
        name = payload.orig_name or "the upload"
        if payload.url and payload.url.startswith("data:"):  # the page uploads files; an inlined one skips the byte limit
            raise gr.Error(f"{name}: send the image as an upload, not as a data: URL")
        try:
            path = plain_preprocess(payload)
        except Exception as err:  # gr.Image opens the file with PIL: a non-image fails here
            raise gr.Error(f"{name} is not an image this page can read ({type(err).__name__})") from None
        check_image(path, name, limits)
        return path

    component.preprocess = checked_preprocess
    return component


def _friendly(handler: Callable) -> Callable:
    """Show user errors (bad input, missing artifacts) as messages on the page, not tracebacks."""

    @functools.wraps(handler)
    def wrapper(*args):
        try:
            return handler(*args)
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from None

    return wrapper


def _gallery_items(hits: pd.DataFrame) -> list[tuple[str, str]]:
    items = []
    for rank, hit in enumerate(hits.itertuples(), start=1):
        label = "" if pd.isna(hit.class_name) else f" · {hit.class_name}"
        items.append((hit.full_path, f"#{rank} {hit.score:.3f}{label}"))
    return items


class Page:
    """The handlers, sharing one Predictor (requests run one at a time: see `serve`)."""

    def __init__(self, predictor: Predictor, limits: PageLimits):
        self.predictor = predictor
        self.limits = limits

    def _k(self, k: float) -> int:
        """The slider's value; a call through the API can send any number."""
        if not 1 <= k <= self.limits.max_k:
            raise gr.Error(f"results: {k} is not between 1 and {self.limits.max_k}")
        return int(k)

    def _text(self, text: Optional[str], what: str, most: int) -> str:
        text = text or ""
        if len(text) > most:
            raise gr.Error(f"{what} is {len(text):,} characters; this page accepts at most {most:,}")
        return text

    def search_text(self, text: str, k: float) -> list[tuple[str, str]]:
        return _gallery_items(self.predictor.search_text(self._text(text, "the description", self.limits.max_text_chars), self._k(k)))

    def search_image(self, path: Optional[str], k: float) -> list[tuple[str, str]]:
        if path is None:
            raise gr.Error("upload an image to search with")
        return _gallery_items(self.predictor.similar(path, self._k(k)))

    def classify(self, path: Optional[str], labels: str, k: float) -> dict[str, float]:
        if path is None:
            raise gr.Error("upload an image to classify")
        chosen = [part for part in (labels or "").split(",") if part.strip()] or None  # blank: the dataset's classes
        if chosen and len(chosen) > self.limits.max_labels:
            raise gr.Error(f"{len(chosen):,} labels; this page classifies among at most {self.limits.max_labels}")
        for label in chosen or []:
            self._text(label.strip(), f"the label {label.strip()[:20]!r}...", self.limits.max_label_chars)
        predictions = self.predictor.classify(path, chosen, self._k(k))
        return dict(zip(predictions["label"], predictions["probability"].astype(float)))

    def verify(self, first: Optional[str], second: Optional[str]) -> str:
        if first is None or second is None:
            raise gr.Error("upload two images to compare")
        verdict = self.predictor.verify(first, second)
        answer = "**Same class**" if verdict.same else "**Different classes**"
        calibration = self.predictor.verification.get("calibration")
        if verdict.p_same is None or calibration is None:
            probability = "no probability: the metrics file has no calibration"
        else:
            probability = (
                f"P(same) {verdict.p_same:.2f}, fitted on the `{calibration['fitted_on']}` pairs; "
                f"expected calibration error {calibration['ece']:.3f} on the test pairs"
            )
        return f"{answer}: distance {verdict.distance:.4f} against the threshold {verdict.threshold:.4f} that evaluate chose ({probability})."

    def add(self, files: Optional[list[str]]) -> str:
        if not files:
            raise gr.Error("choose one or more images to add")
        if len(files) > self.limits.max_add_files:
            raise gr.Error(f"{len(files)} files; add at most {self.limits.max_add_files} at a time")
        rejected = []
        acceptable = []
        for path in files:
            try:
                check_image(path, Path(path).name, self.limits)
                acceptable.append(path)
            except gr.Error as err:
                rejected.append(err.message)
        report = self.predictor.add(acceptable) if acceptable else None
        lines = [f"- added `{Path(source).name}` as `{image_id}`" for source, image_id in (report.added if report else [])]
        lines += [f"- `{Path(source).name}` is already in the gallery as `{image_id}`" for source, image_id in (report.duplicates if report else [])]
        lines += [f"- rejected: {why}" for why in rejected]
        total = report.total if report else self.predictor.index.index.ntotal
        return "\n".join(lines + [f"\nThe gallery now holds {total} images."]), self.header()

    def header(self) -> str:
        """The page's title line, with the gallery's size as it is now (it grows with each add)."""
        predictor = self.predictor
        gallery = (
            f" · gallery of {predictor.index.index.ntotal} images ({predictor.index.info.get('factory')})"
            if predictor.index is not None else " · no index: run `dvc repro`"
        )  # fmt: skip
        return f"# clipline\nModel `{predictor.loaded.name}`{gallery}"


def _listen(event: Callable, handler: Callable, inputs: list, output, concurrency_id: str) -> None:
    event(_friendly(handler), inputs, output, concurrency_id=concurrency_id, concurrency_limit=1)


def build(predictor: Predictor, limits: PageLimits = PageLimits()) -> gr.Blocks:
    page = Page(predictor, limits)
    has_index = predictor.index is not None
    shared_space = predictor.loaded.image_head is None  # a triplet head embeds images only
    k_slider = functools.partial(gr.Slider, 1, limits.max_k, value=8, step=1, label="results")
    # Uploads are copied into Gradio's cache; drop them after an hour so a long-running page does not fill the disk.
    with gr.Blocks(title="clipline", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        header = gr.Markdown(page.header(), elem_id="header")
        with gr.Tab("Text search", visible=has_index and shared_space):
            query = gr.Textbox(label="describe the image", placeholder="a small red circle on a white background", elem_id="text-query")
            k_text = k_slider()
            text_button = gr.Button("Search", variant="primary", elem_id="text-search")
            text_hits = gr.Gallery(label="results", columns=4, height="auto", elem_id="text-results")
        with gr.Tab("Image search", visible=has_index):
            image_query = image_upload("query image", limits, elem_id="image-query")
            k_image = k_slider()
            image_button = gr.Button("Search", variant="primary", elem_id="image-search")
            image_hits = gr.Gallery(label="results", columns=4, height="auto", elem_id="image-results")
        with gr.Tab("Classify", visible=shared_space):
            to_classify = image_upload("image", limits, elem_id="classify-image")
            labels = gr.Textbox(label="labels, comma-separated (blank: the dataset's classes)", placeholder="cat, dog, car", elem_id="classify-labels")
            k_classes = gr.Slider(1, min(20, limits.max_k), value=5, step=1, label="top classes")
            classify_button = gr.Button("Classify", variant="primary", elem_id="classify")
            probabilities = gr.Label(label="zero-shot probabilities", elem_id="classify-result")
        with gr.Tab("Same class?", visible="threshold" in predictor.verification):
            with gr.Row():
                first = image_upload("first image", limits)
                second = image_upload("second image", limits)
            verify_button = gr.Button("Compare", variant="primary")
            verdict = gr.Markdown()
        with gr.Tab("Add images", visible=has_index):
            new_files = gr.File(label="images to add to the gallery", file_count="multiple", file_types=["image"], type="filepath", elem_id="add-files")
            add_button = gr.Button("Add", variant="primary", elem_id="add")
            add_report = gr.Markdown(elem_id="add-report")

        # One model on one device: every request joins one queue and runs in turn, so an add never
        # races a search for the predictor's index.
        listen = functools.partial(_listen, concurrency_id="model")
        listen(text_button.click, page.search_text, [query, k_text], text_hits)
        listen(query.submit, page.search_text, [query, k_text], text_hits)
        listen(image_button.click, page.search_image, [image_query, k_image], image_hits)
        listen(classify_button.click, page.classify, [to_classify, labels, k_classes], probabilities)
        listen(verify_button.click, page.verify, [first, second], verdict)
        listen(add_button.click, page.add, [new_files], [add_report, header])
    return demo


def one_malloc_arena() -> None:
    """Linux (glibc): every thread allocates from one malloc arena. By default each thread that
    allocates gets an arena of its own and keeps what it frees there; Gradio runs handlers on a
    pool of worker threads, and the freed activations of each stayed resident: the server grew
    40-60 MB per maximal classify (`python bench/serve_load.py --rounds 5`). Requests run one at a
    time, so one arena costs no contention. Call it before threads allocate (arenas made before it
    stay); elsewhere than glibc it does nothing."""
    import ctypes

    m_arena_max = -8  # glibc's malloc.h
    try:
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, 1)
    except (OSError, AttributeError):
        pass


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 7860, limits: PageLimits = PageLimits(), block: bool = True):
    """Start the page; with block=False returns once it is listening (for tests)."""
    from starlette.middleware import Middleware

    demo = build(predictor, limits)
    # Gradio copies a result into its cache before showing it, and only from an allowed path: the
    # dataset root and the gallery's store. The guard then serves from the cache alone.
    allowed = [str(predictor.image_root.resolve())] + ([str((predictor.gallery.folder / "store").resolve())] if predictor.gallery else [])
    guard = Middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, servable=[demo.GRADIO_CACHE])
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=int(limits.max_upload_mb * 1024 * 1024),
        allowed_paths=allowed,
        app_kwargs={"middleware": [guard]},
        ssr_mode=False,
        show_error=True,
        state_session_capacity=limits.sessions_kept,
        prevent_thread_lock=True,  # returns once listening; blocks below when asked to
        quiet=True,  # Gradio would also print its `share=True` hint, for a page that stays local on purpose
    )
    print(f"clipline page on http://{host}:{port} (Ctrl+C to stop)", flush=True)
    if block:
        demo.block_thread()
    return demo
