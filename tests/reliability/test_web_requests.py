"""The page's request guard: which files it serves and how large a request body may be, on a bare
ASGI app (no Gradio), so each case is exact and fast. The served page itself is checked in
tests/test_web.py."""

import os

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from pipeline.web import PageLimits, RequestGuard


async def echo(request):
    return PlainTextResponse(f"{request.url.path} {len(await request.body())}")


@pytest.fixture
def cache(tmp_path):
    """A Gradio-like cache holding a shown image, a table and a link out, and a folder beside it."""
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    (cache / "abc123").mkdir(parents=True)
    outside.mkdir()
    (cache / "abc123" / "hit.png").write_bytes(b"png")
    (cache / "abc123" / "images.parquet").write_bytes(b"PAR1")
    (outside / "secret.png").write_bytes(b"png")
    (outside / "notes.txt").write_text("secret")
    os.symlink(outside / "secret.png", cache / "abc123" / "link.png")
    return cache


def client(cache, max_body_bytes=1000) -> TestClient:
    app = Starlette(routes=[Route("/{rest:path}", echo, methods=["GET", "HEAD", "POST"])])
    return TestClient(RequestGuard(app, max_body_bytes=max_body_bytes, servable=[str(cache)]))


def test_only_images_inside_the_cache_are_served(cache):
    c = client(cache)
    assert c.get(f"/gradio_api/file={cache}/abc123/hit.png").status_code == 200
    assert c.head(f"/gradio_api/file={cache}/abc123/hit.png").status_code == 200
    refused = [
        f"{cache}/abc123/images.parquet",  # not an image, though in the cache
        f"{cache.parent}/outside/secret.png",  # an image outside it
        f"{cache}/abc123/link.png",  # a link from the cache to outside
        f"{cache}/abc123/../../outside/secret.png",
        f"{cache}/abc123/missing.png",
        f"{cache.parent}/outside/notes.txt",
        "/etc/passwd",
        "https://example.com/x.png",  # Gradio would fetch and relay it
    ]
    for path in refused:
        response = c.get(f"/gradio_api/file={path}")
        assert response.status_code == 403, path
        assert response.json() == {"detail": "this page serves only the images it shows"}
    assert c.get("/gradio_api/info").status_code == 200  # other routes pass untouched


def test_a_request_body_over_the_limit_is_refused_before_the_app_reads_it(cache):
    c = client(cache, max_body_bytes=1000)
    assert c.post("/gradio_api/call/search_image", content=b"x" * 1000).text == "/gradio_api/call/search_image 1000"
    refused = c.post("/gradio_api/call/search_image", content=b"x" * 1001)
    assert refused.status_code == 413 and "over 1,000 bytes" in refused.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(5):
            yield b"y" * 400

    assert c.post("/gradio_api/queue/join", content=chunks()).status_code == 413
    # Uploads stream to Gradio, which holds them to max_file_size itself.
    assert c.post("/gradio_api/upload", content=b"z" * 5000).text == "/gradio_api/upload 5000"


def test_the_body_limit_never_exceeds_the_upload_limit():
    assert PageLimits(max_upload_mb=0.01).max_body_bytes == int(0.01 * 1024 * 1024)
    default = PageLimits()
    # A maximal classify (every label at its longest) fits; a file inlined as JSON could not pass the upload limit.
    assert default.max_labels * (default.max_label_chars + 1) < default.max_body_bytes < default.max_upload_mb * 1024 * 1024
