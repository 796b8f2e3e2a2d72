"""Atomic writes and the Parquet/JSON helpers every stage uses.

Every output goes to a temporary name beside its target and is renamed into place, so an
interrupted stage never leaves a half-written file that DVC or the next stage would trust.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ArtifactError


def _temp_prefix(target: Path) -> str:
    # The writer's pid is in the name, so a later writer can tell a dead writer's leftovers.
    return f".{target.name}.{os.getpid()}."


def _remove_dead_writers_leftovers(target: Path) -> None:
    """Delete temporaries of `target` left by writers that were killed (their pid is gone)."""
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = leftover.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


# Read once, at import: setting it to read it is a race with any thread creating files meanwhile.
UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; on success rename it onto `target`, on failure delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_leftovers(target)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~UMASK)  # mkstemp makes it 0600; the output gets a normal file's mode
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `target` as a whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        os.replace(old, target)  # a writer died between the two renames below: put the old one back
    _remove_dead_writers_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes it 0700
    try:
        yield tmp
        if target.exists():
            # Renaming a folder over a non-empty one is not possible, so the old one moves aside
            # first; a writer killed between the two renames is repaired by the next atomic_dir.
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; run the stage that writes it (dvc repro)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_parquet(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def embeddings_table(meta: pd.DataFrame, embeddings: np.ndarray) -> pa.Table:
    """Metadata columns plus `embedding` as a fixed-size list of float32."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    if len(meta) != n:
        raise ValueError(f"{len(meta)} metadata rows but {n} embeddings")
    table = pa.Table.from_pandas(meta.reset_index(drop=True), preserve_index=False)
    values = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim)
    return table.append_column("embedding", values)


def write_embedding_shard(path: str | os.PathLike, meta: pd.DataFrame, embeddings: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(embeddings_table(meta, embeddings), tmp)


def embedding_files(path: str | os.PathLike) -> list[Path]:
    """One Parquet file, or a folder's part-*.parquet shards in rank order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("part-*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path}: no part-*.parquet shards; run `dvc repro embed`")
        return files
    if path.exists():
        return [path]
    raise FileNotFoundError(f"{path}: not found; run `dvc repro embed`")


@contextlib.contextmanager
def _named(file: Path) -> Iterator[None]:
    """Arrow's errors for a damaged file ("Parquet magic bytes not found") do not say which file."""
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ArtifactError(f"{file}: not a readable Parquet file ({err})") from None


def _read_shard(file: Path) -> pa.Table:
    with _named(file):
        return pq.read_table(file)


def read_parquet_named(path: str | os.PathLike, **kwargs) -> pd.DataFrame:
    """pd.read_parquet, with the file named when it is damaged."""
    with _named(Path(path)):
        return pd.read_parquet(path, **kwargs)


def read_embeddings(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """Read one Parquet file or a folder of shards; returns (metadata, float32 matrix)."""
    files = embedding_files(path)
    table = pa.concat_tables(_read_shard(f) for f in files)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    meta = table.drop_columns(["embedding"]).to_pandas()
    return meta, matrix


def check_embedded_rows(meta: pd.DataFrame, key: str, embeddings_dir: str | os.PathLike, part: str) -> None:
    """The shards of `part` (images, texts) hold each id once, and as many rows as embed.json says
    embed wrote: a shard that lost rows still reads as valid Parquet."""
    info_path = Path(embeddings_dir) / "embed.json"
    expected = read_json(info_path)[f"n_{part}"]
    repeated = int(meta[key].duplicated().sum())
    if len(meta) != expected or repeated:
        also = f" ({repeated} repeated {key}s)" if repeated else ""
        raise ArtifactError(
            f"{Path(embeddings_dir) / part}: {len(meta)} rows{also} where {info_path} says embed wrote {expected}: "
            "the shards are damaged or mixed with another run's",
            "rerun `dvc repro embed`",
        )


def iter_embeddings(
    path: str | os.PathLike, batch_rows: int = 2048, with_vectors: bool = True
) -> Iterator[tuple[pd.DataFrame, np.ndarray | None]]:
    """`read_embeddings` chunk by chunk, in its row order: (metadata, float32 matrix) of at most
    `batch_rows` rows, one Parquet record batch at a time, so a folder larger than memory can be read.

    `with_vectors=False` reads the metadata columns only (the matrix is None), a whole shard at a
    time: they are small, and come out as `read_embeddings` gives them (Arrow-backed columns in one
    piece per row group, which decides the bytes of a Parquet file written from them).
    """
    files = embedding_files(path)
    for file in files:
        # Stream each column chunk through a small buffer; by default (pre-buffered) a shard's whole
        # row group, up to 1Mi rows as `pq.write_table` writes them, is read at once whatever `batch_rows`.
        with _named(file):
            shard = pq.ParquetFile(file, buffer_size=1 << 20, pre_buffer=False)
        meta_columns = [name for name in shard.schema_arrow.names if name != "embedding"]
        if not with_vectors:
            yield shard.read(columns=meta_columns).to_pandas(), None
            continue
        for batch in shard.iter_batches(batch_size=batch_rows):
            column = batch.column("embedding")
            vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, column.type.list_size)
            yield batch.select(meta_columns).to_pandas(), vectors
