"""Load on the web page: concurrent text searches through its HTTP API, with and without the
heaviest request the page accepts running among them.

Starts `clipline serve` on a free port of 127.0.0.1 over the project's artifacts (run `dvc repro`
first), then runs two rounds of `--clients` threads x `--searches` text searches each: a plain
round, and one where a maximal classify (the page's most labels, each at the longest length, plus
an uploaded image) is sent `--heavy-after` seconds in. Requests run one at a time on the server, so
whatever the heavy request costs, every search queued behind it waits for. Also sends the request
the page must refuse (20,000 labels in one call) and says how it was answered and how fast.

    python bench/serve_load.py                          # 8 clients x 25 searches, two rounds
    python bench/serve_load.py --clients 4 --searches 10
    python bench/serve_load.py --rounds 5               # does the server's memory settle?

Prints p50 / p95 / max latency and errors per round, the heavy request's own latency, the p95
ratio (heavy round / plain round) and the server's resident memory at start and after each round.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.web import PageLimits  # noqa: E402

QUERIES = ["a red circle", "a small blue square on a white background", "a large green star", "a purple ring at the top", "a yellow cross"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def call(url: str, api_name: str, data: list, timeout: float = 600) -> tuple[str, object]:
    """POST a call, then read its event stream: (event, data); an HTTP refusal is ('http <code>', body)."""
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            event_id = json.load(response)["event_id"]
    except urllib.error.HTTPError as err:
        return f"http {err.code}", err.read().decode()
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=timeout) as response:
        lines = response.read().decode().splitlines()
    events = [line.split(": ", 1)[1] for line in lines if line.startswith("event: ") and "heartbeat" not in line]
    payload = [line.split(": ", 1)[1] for line in lines if line.startswith("data: ")]
    return (events[-1] if events else "none"), (json.loads(payload[-1]) if payload else None)


def upload(url: str, path: Path) -> dict:
    """The page's upload route (multipart), as the browser uses it; returns the FileData to send."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        server_path = json.load(response)[0]
    return {"path": server_path, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def start(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                sys.exit(f"clipline serve did not come up:\n{server.stdout.read() if server.poll() is not None else ''}")
            time.sleep(0.5)


def search_round(url: str, clients: int, searches: int, heavy=None, heavy_after: float = 2.0) -> dict:
    latencies, errors, lock = [], [], threading.Lock()

    def client(n: int) -> None:
        for i in range(searches):
            began = time.perf_counter()
            event, data = call(url, "search_text", [QUERIES[(n + i) % len(QUERIES)], 8])
            with lock:
                latencies.append(time.perf_counter() - began)
                if event != "complete":
                    errors.append(f"{event}: {str(data)[:200]}")

    heavy_result = {}

    def heavy_client() -> None:
        time.sleep(heavy_after)
        began = time.perf_counter()
        event, data = call(url, "classify", heavy)
        heavy_result.update(event=event, seconds=time.perf_counter() - began, answer=str(data)[:120])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    if heavy is not None:
        threads.append(threading.Thread(target=heavy_client))
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = np.array(latencies)
    return {
        "searches": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
        "p50_s": float(np.percentile(seconds, 50)), "p95_s": float(np.percentile(seconds, 95)), "max_s": float(seconds.max()),
        "wall_s": time.perf_counter() - began, "heavy": heavy_result or None,
    }  # fmt: skip


def main(
    clients: int = typer.Option(8, help="concurrent clients"),
    searches: int = typer.Option(25, help="text searches per client per round"),
    heavy_after: float = typer.Option(2.0, help="seconds into the heavy round that the maximal classify is sent"),
    image: Path = typer.Option(None, help="image to classify (default: the first prepared image)"),
    rounds: int = typer.Option(1, min=1, help="times to run the plain and the heavy round (memory is read after each)"),
) -> None:
    import pandas as pd

    limits = PageLimits()
    if image is None:
        prepared = ROOT / "data" / "prepared"
        image = prepared / pd.read_parquet(prepared / "images.parquet", columns=["path"])["path"].iloc[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = start(port)
    try:
        memory_before = rss_mb(server.pid)
        uploaded = upload(url, image)
        labels = ", ".join(f"{n:04d}".ljust(limits.max_label_chars, "x") for n in range(limits.max_labels))
        heavy = [uploaded, labels, 5]
        call(url, "search_text", ["warm up", 8])
        memory = {"started": memory_before, "after one search": rss_mb(server.pid)}
        results = []
        for n in range(1, rounds + 1):
            plain = search_round(url, clients, searches)
            memory[f"after plain round {n}"] = rss_mb(server.pid)
            loaded = search_round(url, clients, searches, heavy, heavy_after)
            memory[f"after heavy round {n}"] = rss_mb(server.pid)
            results += [(f"plain {n}", plain), (f"with a maximal classify {n}", loaded)]
        began = time.perf_counter()
        event, answer = call(url, "classify", [uploaded, ", ".join(f"label {n}" for n in range(20_000)), 5])
        refused = {"event": event, "seconds": time.perf_counter() - began, "answer": str(answer)[:160]}
        memory["at the end"] = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)

    typer.echo(f"{clients} clients x {searches} text searches per round, on 127.0.0.1:{port}")
    for name, result in results:
        typer.echo(
            f"{name:>24}: {result['searches']} searches, {result['errors']} errors, p50 {result['p50_s']:.2f} s, "
            f"p95 {result['p95_s']:.2f} s, max {result['max_s']:.2f} s, wall {result['wall_s']:.1f} s"
        )
        if result["first_error"]:
            typer.echo(f"{'':>26}first error: {result['first_error']}")
    heavy_rounds = [result for name, result in results if result["heavy"]]
    typer.echo(
        f"maximal classify ({limits.max_labels} labels of {limits.max_label_chars} characters): "
        + ", ".join(f"{r['heavy']['event']} in {r['heavy']['seconds']:.2f} s" for r in heavy_rounds)
    )
    ratios = [loaded["p95_s"] / plain["p95_s"] for (_, plain), (_, loaded) in zip(results[::2], results[1::2])]
    typer.echo(f"text-search p95 ratio (with / plain): {', '.join(f'{r:.2f}' for r in ratios)}")
    typer.echo(f"20,000 labels in one call: {refused['event']} in {refused['seconds']:.2f} s ({refused['answer']})")
    # Growth that stops after the first round is warm-up (allocator pools, caches); growth that
    # goes on round after round would be a leak.
    typer.echo("server resident memory: " + ", ".join(f"{mb:.0f} MB {when}" for when, mb in memory.items()))


if __name__ == "__main__":
    typer.run(main)
