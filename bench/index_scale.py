"""Index build time, peak memory, queries/s and recall@10 against exact search, for Flat,
`index.factory: auto` and the alternatives it did not choose (HNSW32, IVF-Flat, IVF with 4-bit
PQ and an SQ8 refine), on 100k and 1M seeded unit vectors and on the pipeline's own embeddings.

    nice -n 10 python bench/index_scale.py                     # 100k and 1M random, dim 512 (most of an hour on 2 cores)
    python bench/index_scale.py --sizes 60000 --dim 32 --queries 100   # a smoke run, seconds
    python bench/index_scale.py --data random --data lowdim     # also vectors near a 32-dim subspace

Data (`--data`): `random` is Gaussian vectors normalised to unit length, i.e. uniform on the
sphere: the worst case for every approximate index, since in 512 dimensions a point's nearest
neighbours are barely nearer than any other point. `lowdim` puts them near a random 32-dim
subspace (plus 10% noise), closer to real embeddings, whose intrinsic dimension is low. Both are
written as Parquet shards, as `embed` writes them; queries are drawn apart (never in the gallery).
The pipeline's embeddings (`--embeddings`, skipped with a message when absent) are searched with
their test split, as the index stage does.

Every configuration is built and searched in a fresh process with the index stage's own code
(`io.iter_embeddings` -> `faiss_index.build_from_chunks`, vectors streamed shard by shard), which
reports its own peak resident memory (VmHWM): what that index costs, with nothing left over
from another; `baseline_mib` is the same process before building (Python, FAISS, the queries).
Exact neighbours are found once per data set, chunk by chunk. Queries/s is one batched search of
every query with FAISS's threads; on a shared machine it varies from run to run.

Writes reports/bench/index_scale.{json,md} (not a DVC output).
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import faiss
import numpy as np
import pandas as pd
import typer

from pipeline import io
from pipeline.retrieval import factory as factory_lib
from pipeline.index import rows_reader
from pipeline.retrieval import faiss_index

K = 10
LOWDIM_LATENT, LOWDIM_NOISE = 32, 0.1
BASIS_PART, QUERY_PART = 1 << 30, 1 << 31  # seeds of the lowdim subspace and of the queries, apart from the shards'
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def unit_vectors(kind: str, n: int, dim: int, seed: int, part: int) -> np.ndarray:
    """Seeded by (seed, part): the same shard whatever else is generated."""
    rng = np.random.default_rng([seed, part])
    if kind == "random":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:  # lowdim: a fixed random 32-dim subspace (seeded by `seed` alone), plus noise
        basis = np.random.default_rng([seed, BASIS_PART]).standard_normal((LOWDIM_LATENT, dim), dtype=np.float32)
        x = rng.standard_normal((n, LOWDIM_LATENT), dtype=np.float32) @ basis / np.sqrt(LOWDIM_LATENT)
        x += LOWDIM_NOISE * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_dataset(folder: Path, kind: str, n: int, dim: int, n_queries: int, seed: int, shard_rows: int) -> Path:
    """Gallery shards (images/part-*.parquet) unless a previous run left them complete, and the
    queries; returns the queries' file."""
    if not (folder / "complete").exists():
        for part, start in enumerate(range(0, n, shard_rows)):
            rows = min(shard_rows, n - start)
            meta = pd.DataFrame({"image_id": [f"{kind}/{i}" for i in range(start, start + rows)], "split": "train"})
            io.write_embedding_shard(folder / "images" / f"part-{part:05d}.parquet", meta, unit_vectors(kind, rows, dim, seed, part))
        (folder / "complete").write_text("")
    queries = folder / f"queries-{n_queries}.npy"
    np.save(queries, unit_vectors(kind, n_queries, dim, seed, QUERY_PART))
    return queries


def gallery_reader(images: Path) -> faiss_index.Chunks:
    return lambda: (vectors for _, vectors in io.iter_embeddings(images))


def configurations(n: int, dim: int) -> list[tuple[str, str, list[str]]]:
    """(label, factory, search params to measure): Flat, auto (its own setting first, then others
    to show the trade-off) and the alternatives auto did not choose: HNSW32, IVF-Flat and IVF-PQ
    with an SQ8 refine (IVFs sized as auto sizes them)."""
    auto = factory_lib.choose_factory(n, dim, "ip")
    configs = [("Flat = auto" if auto.factory == "Flat" else "Flat", "Flat", [""])]
    if auto.factory != "Flat":  # auto's setting, then half and twice as many candidates (HNSW) or probes (IVF)
        (name, value), *rest = factory_lib.parse_search_params(auto.search_params).items()
        limit = factory_lib.ivf_lists(n) if name == "nprobe" else float("inf")
        more = [",".join([f"{name}={v}", *(f"{k}={x}" for k, x in rest)]) for v in (int(value) // 2, int(value) * 2) if 1 <= v <= limit]
        configs.append(("auto", auto.factory, [auto.search_params, *more]))
    alternatives = [("HNSW32", "HNSW32", ["efSearch=64", "efSearch=256"]), ("IVF-Flat", *factory_lib.ivf_factory(n, dim, "Flat")),
                    ("IVF-PQ + SQ8 refine", *factory_lib.ivf_factory(n, dim, "PQ"))]  # fmt: skip
    for label, factory, settings in alternatives:
        if factory != auto.factory:
            configs.append((label, factory, settings if isinstance(settings, list) else [settings]))
    return configs


def peak_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM, not ru_maxrss: a spawned process's
    ru_maxrss starts at its parent's peak (kept across fork and exec), VmHWM at its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def one(images: Path, n: int, dim: int, factory: str, settings: list[str], queries: Path, truth: Path) -> dict:
    """Build one index and search it with each setting; run in a fresh process by `measure`."""
    xq, gt = np.load(queries), np.load(truth)
    baseline = peak_mib()
    index, build_s = faiss_index.build_from_chunks(gallery_reader(images), n, dim, factory, "ip")
    rows = []
    for search_params in settings:
        faiss_index.apply_search_params(index, search_params)
        start = time.perf_counter()
        _, found = faiss_index.search(index, xq, K)
        seconds = time.perf_counter() - start
        rows.append({"search_params": search_params, "qps": len(xq) / seconds, "recall@10": faiss_index.recall(found, gt)})
    return {"build_s": build_s, "baseline_mib": baseline, "peak_mib": peak_mib(), "rows": rows}


def measure(label: str, data: str, images: Path, n: int, dim: int, queries: Path, truth: Path, factory: str, settings: list[str]) -> list[dict]:
    typer.echo(f"  {label}: {factory} {settings} ...", err=True)
    # A fresh process per index ("spawn": nothing inherited), so its peak memory is this index's alone.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        out = pool.submit(one, images, n, dim, factory, settings, queries, truth).result()
    for row in out["rows"]:
        typer.echo(f"    {row['search_params'] or '-'}: built in {out['build_s']:.0f}s, peak {out['peak_mib']:.0f} MiB, "
                   f"{row['qps']:.0f} queries/s, recall@10 {row['recall@10']:.3f}", err=True)  # fmt: skip
    return [
        {"data": data, "n": n, "dim": dim, "config": f"{label} (other setting)" if label == "auto" and i else label,
         "factory": factory, "search_params": row["search_params"], "build_s": round(out["build_s"], 1),
         "baseline_mib": round(out["baseline_mib"]), "peak_mib": round(out["peak_mib"]), "vectors_mib": round(n * dim * 4 / 2**20),
         "qps": round(row["qps"], 1), "recall@10": round(row["recall@10"], 4)}
        for i, row in enumerate(out["rows"])
    ]  # fmt: skip


def bench_dataset(data: str, images: Path, queries_file: Path, n: int, dim: int, work: Path) -> list[dict]:
    typer.echo(f"{data}: {n:,} x {dim}", err=True)
    start = time.perf_counter()
    truth = faiss_index.exact_neighbours(gallery_reader(images)(), np.load(queries_file), "ip", min(K, n))
    typer.echo(f"  exact neighbours of {len(truth)} queries: {time.perf_counter() - start:.0f}s", err=True)
    np.save(work / "truth.npy", truth)
    rows = []
    for label, factory, settings in configurations(n, dim):
        rows += measure(label, data, images, n, dim, queries_file, work / "truth.npy", factory, settings)
    flat_qps = rows[0]["qps"]
    for row in rows:
        row["x_flat"] = round(row["qps"] / flat_qps, 1)
    return rows


def markdown(rows: list[dict], command: str, threads: int) -> str:
    columns = ["data", "n", "dim", "config", "factory", "search_params", "build_s", "baseline_mib", "peak_mib", "vectors_mib", "qps", "x_flat", "recall@10"]
    lines = [
        f"`{command}` ({threads} FAISS threads)",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns) + " |")
    goal = [r for r in rows if r["config"] == "auto" and r["n"] >= 1_000_000]
    for row in goal:
        met = row["recall@10"] >= 0.95 and row["x_flat"] >= 10
        lines.append(
            f"\nGoal at {row['n']:,} ({row['data']}): auto's recall@10 >= 0.95 at >= 10x Flat's queries/s: "
            f"{'met' if met else 'NOT met'} (recall@10 {row['recall@10']}, {row['x_flat']}x)"
        )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    sizes: list[int] = typer.Option([100_000, 1_000_000], "--sizes", help="gallery sizes of the synthetic data sets"),
    dim: int = typer.Option(512, help="dimension of the synthetic vectors"),
    queries: int = typer.Option(1000, help="queries per data set (the pipeline's embeddings: at most this many of its test split)"),
    data: list[str] = typer.Option(["random"], "--data", help="synthetic data: random (uniform on the sphere) and/or lowdim"),
    embeddings: Path = typer.Option(Path("artifacts/embeddings"), help="the pipeline's embeddings, also measured when present"),
    workdir: Optional[Path] = typer.Option(None, help="where the synthetic shards go (kept, and reused by a later run); default a temporary folder"),
    shard_rows: int = typer.Option(100_000, help="rows per synthetic Parquet shard"),
    seed: int = 0,
    out: Path = typer.Option(Path("reports/bench/index_scale"), help="writes OUT.json and OUT.md"),
) -> None:
    for kind in data:
        if kind not in ("random", "lowdim"):
            raise typer.BadParameter(f"{kind!r}: expected random or lowdim", param_hint="--data")
    rows = []
    with tempfile.TemporaryDirectory(prefix="index_scale.") as scratch:
        base = workdir or Path(scratch)
        for kind in data:
            for n in sizes:
                folder = base / f"{kind}-{n}-{dim}-seed{seed}-{shard_rows}rows"  # what the shards' contents depend on
                queries_file = write_dataset(folder, kind, n, dim, queries, seed, shard_rows)
                rows += bench_dataset(kind, folder / "images", queries_file, n, dim, folder)
                write_report(out, rows)  # so far: a long run that stops keeps what it measured
        images = embeddings / "images"
        if images.exists():
            meta = pd.concat([m for m, _ in io.iter_embeddings(images, with_vectors=False)], ignore_index=True)
            is_query = (meta["split"] == "test").to_numpy(copy=True)
            is_query[np.flatnonzero(is_query)[queries:]] = False
            query_vectors = np.concatenate(list(rows_reader(images, is_query)()))
            work = Path(scratch) / "embeddings"
            work.mkdir()
            np.save(work / "queries.npy", query_vectors)
            rows += bench_dataset(f"embeddings ({embeddings})", images, work / "queries.npy", len(meta), query_vectors.shape[1], work)
        else:
            typer.echo(f"{images}: not found, so the pipeline's embeddings are not measured (run `dvc repro embed`)", err=True)
    typer.echo(write_report(out, rows))


def write_report(out: Path, rows: list[dict]) -> str:
    command = " ".join(["python bench/index_scale.py", *sys.argv[1:]])
    table = markdown(rows, command, faiss.omp_get_max_threads())
    io.write_json(out.with_suffix(".json"), {"command": command, "threads": faiss.omp_get_max_threads(), "rows": rows})
    io.write_text(out.with_suffix(".md"), table)
    return table


if __name__ == "__main__":
    app()
