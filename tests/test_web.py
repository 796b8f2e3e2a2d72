"""The web page: upload checks, the handlers, and the real page driven in headless Chromium."""

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest
from conftest import load_predictor, where
from PIL import Image

from pipeline import web
from pipeline.datasets.synthetic import draw_shape

CHROMIUM = Path(os.environ.get("CLIPLINE_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps trying to reach Google's hosts.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
LIMITS = web.PageLimits(max_upload_mb=1, max_pixels=200 * 200)


@pytest.fixture
def predictor(artifacts, tmp_path):
    return load_predictor(artifacts, tmp_path / "gallery")


def test_check_image_names_the_problem(artifacts, tmp_path):
    web.check_image(artifacts["images"][0], "ok.png", LIMITS)
    (tmp_path / "text.png").write_text("hello")
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    (tmp_path / "cut.png").write_bytes(artifacts["images"][0].read_bytes()[:80])
    for name, message in [("text.png", "not an image this page can read"), ("big.png", "300x300 pixels; this page accepts at most 40,000"), ("cut.png", "not a readable image")]:
        with pytest.raises(gr.Error, match=message):
            web.check_image(tmp_path / name, name, LIMITS)


def test_handlers_search_classify_and_add(predictor, artifacts, tmp_path):
    page = web.Page(predictor, LIMITS)
    items = page.search_text("a red circle", 3)
    assert len(items) == 3 and all(Path(path).is_file() for path, _ in items) and items[0][1].startswith("#1 ")
    # verify says P(same) from evaluate's fit, where it was fitted and how calibrated it is.
    first, second = artifacts["images"][0], artifacts["images"][-1]
    verdict, calibration = predictor.verify(first, second), predictor.verification["calibration"]
    assert f"P(same) {verdict.p_same:.2f}, fitted on the `{calibration['fitted_on']}` pairs; expected calibration error {calibration['ece']:.3f}" in page.verify(str(first), str(second))
    probabilities = page.classify(str(artifacts["images"][0]), "", 3)
    assert list(probabilities) == list(predictor.classify(artifacts["images"][0], k=3)["label"])
    assert page.classify(str(artifacts["images"][0]), "circle, square", 5).keys() == {"circle", "square"}
    (tmp_path / "text.png").write_text("hello")
    new = tmp_path / "new.png"
    draw_shape("star", (10, 10, 200), (250, 250, 250), 64, 30, 30, 20).save(new)
    before = page.header()
    report, header = page.add([str(new), str(tmp_path / "text.png")])
    assert "added `new.png`" in report and "rejected: text.png is not an image" in report
    n = predictor.index.index.ntotal
    assert f"gallery of {n} images" in header and f"gallery of {n - 1} images" in before  # the title follows the gallery
    assert page.search_image(str(new), 1)[0][0].startswith(str(tmp_path / "gallery" / "store"))
    with pytest.raises(gr.Error, match="at least two different labels"):
        web._friendly(page.classify)(str(artifacts["images"][0]), "only-one", 3)


def test_handlers_bound_the_work_one_request_asks_for(predictor, artifacts, tmp_path):
    """Requests run one at a time: a request over a limit is answered at once, naming the limit."""
    page, image = web.Page(predictor, LIMITS), str(artifacts["images"][0])
    many = ", ".join(f"label {n}" for n in range(LIMITS.max_labels + 1))
    cases = [
        (lambda: page.classify(image, many, 3), f"{LIMITS.max_labels + 1} labels; this page classifies among at most {LIMITS.max_labels}"),
        (lambda: page.classify(image, "cat, " + "d" * (LIMITS.max_label_chars + 1), 3), f"at most {LIMITS.max_label_chars}"),
        (lambda: page.search_text("a" * (LIMITS.max_text_chars + 1), 3), f"the description is 1,001 characters; this page accepts at most {LIMITS.max_text_chars:,}"),
        (lambda: page.search_text("a red circle", LIMITS.max_k + 1), f"results: 51 is not between 1 and {LIMITS.max_k}"),
        (lambda: page.search_image(image, 0), "results: 0 is not between 1"),
        (lambda: page.add([image] * (LIMITS.max_add_files + 1)), f"add at most {LIMITS.max_add_files} at a time"),
    ]
    for call, message in cases:
        with pytest.raises(gr.Error, match=message):
            call()
    assert len(page.classify(image, ", ".join(f"label {n}" for n in range(LIMITS.max_labels)), LIMITS.max_k)) == LIMITS.max_k


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Page:
    """One `clipline serve` for the module: its URL, what it printed until the page was up, and
    its gallery, which holds one image added with the CLI before the server started."""

    url: str
    startup: str
    gallery: Path
    added: Path


@pytest.fixture(scope="module")
def served(artifacts, tmp_path_factory):
    """`clipline serve` in a subprocess on a free local port, started once: it is the slowest part
    of these tests, and none of them changes what another one checks."""
    folder = tmp_path_factory.mktemp("page")
    gallery, added = folder / "gallery", folder / "mine.png"
    draw_shape("ring", (200, 30, 30), (240, 240, 240), 64, 32, 32, 18).save(added)
    load_predictor(artifacts, gallery).add([added])  # added.parquet holds this file's absolute path
    port = _free_port()
    artifact_args = [str(a) for a in where(artifacts)]
    artifact_args[artifact_args.index("--gallery") + 1] = str(gallery)
    command = [sys.executable, "-m", "pipeline.cli", *artifact_args, "serve", "--port", str(port), "--max-upload-mb", "1", "--max-pixels", str(LIMITS.max_pixels)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    lines: list[str] = []
    try:
        # The page answers a moment before launch() returns and its line is printed: wait for both.
        deadline = time.monotonic() + 120
        while not any("clipline page on" in line for line in lines):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"clipline serve did not come up:\n{''.join(lines)}{server.stdout.read() if server.poll() is not None else ''}")
            if select.select([server.stdout], [], [], 0.5)[0]:
                lines.append(server.stdout.readline())
        urllib.request.urlopen(url, timeout=30)
        yield Page(url=url, startup="".join(lines), gallery=gallery, added=added)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_says_where_the_page_is_and_nothing_about_sharing_it(served):
    assert f"clipline page on {served.url.rstrip('/')}" in served.startup
    assert "share=True" not in served.startup and "public link" not in served.startup


def _call(url: str, api_name: str, data: list) -> tuple[str, object]:
    """One call through the page's HTTP API (POST, then read the event stream): (event, data)."""
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", json.dumps({"data": data}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=60) as response:
        lines = response.read().decode().splitlines()
    event = next(line.split(": ", 1)[1] for line in lines if line.startswith("event: ") and "heartbeat" not in line)
    return event, json.loads(next(line.split(": ", 1)[1] for line in reversed(lines) if line.startswith("data: ")))


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_served_page_serves_only_what_it_shows_and_no_inlined_upload(served, artifacts):
    url, gallery, new = served.url, served.gallery, served.added
    event, hits = _call(url, "search_text", ["a red ring", 3])
    assert event == "complete"
    shown = [item["image"]["url"] for item in hits[0]]
    assert len(shown) == 3 and all(_status(u) == 200 for u in shown)
    data, model = artifacts["data"], artifacts["model"]
    never = [
        data / "images.parquet", data / "pixels.npy", data / "classes.json", artifacts["images"][0],  # the image itself, not its shown copy
        gallery / "current" / "added.parquet", gallery / "current" / "index.json", gallery / ".lock",
        next((gallery / "store").iterdir()), model / "last.pt", model / "model.json", artifacts["data"].parent.parent / "params.yaml", Path("/etc/passwd"), data / ".." / ".." / "params.yaml",
    ]
    assert all(path.exists() for path in never)
    for path in never:
        assert _status(f"{url}gradio_api/file={path}") == 403, path

    png = base64.b64encode(new.read_bytes()).decode()
    inlined = {"path": None, "url": f"data:image/png;base64,{png}", "orig_name": "inline.png", "meta": {"_type": "gradio.FileData"}}
    event, message = _call(url, "search_image", [inlined, 3])
    assert event == "error" and "send the image as an upload, not as a data: URL" in json.dumps(message)
    padded = {**inlined, "url": inlined["url"] + "A" * LIMITS.max_body_bytes}
    with pytest.raises(urllib.error.HTTPError) as refused:
        _call(url, "search_image", [padded, 3])
    assert refused.value.code == 413


def test_the_server_keeps_a_bounded_number_of_sessions(predictor):
    """Every API call is a session to Gradio, and each held ~60 KB until 10,000 were kept: memory
    grew with every search. In process, to see what the server holds."""
    demo = web.serve(predictor, port=_free_port(), limits=web.PageLimits(sessions_kept=3), block=False)
    try:
        for n in range(8):
            assert _call(demo.local_url, "search_text", [f"a red circle {n}", 2])[0] == "complete"
        assert 1 <= len(demo.state_holder.session_data) <= 3
    finally:
        demo.close()


def test_the_page_in_a_real_browser(served, artifacts, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)")
    query_image = artifacts["images"][0]
    (tmp_path / "notes.png").write_text("not an image")
    new = tmp_path / "fresh.png"
    draw_shape("circle", (250, 200, 0), (0, 0, 90), 64, 20, 20, 12).save(new)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(served.url)

        page.locator("#text-query textarea").fill("a large red circle")
        page.locator("#text-search").click()
        page.locator("#text-results img").first.wait_for(timeout=60_000)
        assert page.locator("#text-results img").count() == 8
        page.screenshot(path=str(tmp_path / "text_search.png"))

        page.get_by_role("tab", name="Classify").click()
        page.locator("#classify-image input[type=file]").set_input_files(str(query_image))
        page.locator("#classify-image img").first.wait_for(timeout=30_000)
        page.locator("#classify").click()
        expected = load_predictor(artifacts).classify(query_image, k=1).at[0, "label"]
        page.locator("#classify-result h2, #classify-result .output-class").filter(has_text=expected).first.wait_for(timeout=60_000)

        page.reload()
        page.get_by_role("tab", name="Classify").click()
        page.locator("#classify-image input[type=file]").set_input_files(str(tmp_path / "notes.png"))
        page.wait_for_timeout(500)
        page.locator("#classify").click()
        page.get_by_text("notes.png is not an image this page can read").wait_for(timeout=30_000)

        page.reload()
        page.get_by_role("tab", name="Add images").click()
        page.locator("#add-files input[type=file]").set_input_files(str(new))
        page.locator("#add-files").get_by_text("fresh.png").first.wait_for(timeout=30_000)
        page.locator("#add").click()
        page.locator("#add-report").get_by_text("added").first.wait_for(timeout=60_000)
        # The pipeline's images, the one the CLI added before the server started, and this one.
        assert f"now holds {len(artifacts['images']) + 2} images" in page.locator("#add-report").inner_text()
        browser.close()
    assert len(pd.read_parquet(served.gallery / "current" / "added.parquet", columns=["image_id"])) == 2
    if "CLIPLINE_SCREENSHOT" in os.environ:  # keep the page after a text search, to look at
        shutil.copy(tmp_path / "text_search.png", os.environ["CLIPLINE_SCREENSHOT"])
