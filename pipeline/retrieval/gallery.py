"""The searchable gallery: the pipeline's FAISS index plus the images people add with `clipline add`.

    artifacts/gallery/              not a DVC output: `dvc repro` never touches it
        store/<sha256>.<ext>        added image files, named by their content, never changed
        current/                    replaced as a whole by every add, so it is always consistent:
            index.faiss             the pipeline's index with the added images appended
            ids.parquet             FAISS row -> image_id, path, split, label, class_name, sha256
            added.parquet           the added images' embeddings, in the order of the last rows
            index.json              the pipeline's index.json, plus the base fingerprint and counts
        retired/<time>/             a current/ set aside when the pipeline's images changed
        .lock                       one writer at a time

An add is atomic: new images land in store/ first (each by temp file + rename), then `current/`
is swapped in by renames. Interrupted before the swap, the previous `current/` stands; the store
may hold a file nothing refers to, which the next add of the same image reuses.

Added embeddings belong to the model that made them. When `dvc repro` builds a new model or index,
the gallery sees a new base fingerprint and re-embeds its stored images onto the new index. Added
images belong to the pipeline images they were added to: when those change (`dvc repro` on another
dataset), the gallery starts again from the new index and moves the old `current/` to
`retired/<time>/`, with a warning; the added files stay in store/.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline import io
from pipeline.errors import ArtifactError, DatasetError
from pipeline.errors import GalleryError  # noqa: F401 (callers import it from here too)
from pipeline.images import IMAGE_EXTENSIONS, check_image, file_sha256
from pipeline.params import PIL_MAX_IMAGE_PIXELS
from pipeline.retrieval import faiss_index

ADDED_SPLIT = "added"
GALLERY_FILES = ("index.faiss", "ids.parquet", "index.json", "added.parquet")  # current/, written together

# The added images' rows of added.parquet and their embeddings, as read once per command.
Added = tuple[pd.DataFrame, np.ndarray]
log = logging.getLogger(__name__)
Embed = Callable[[Sequence[Path]], np.ndarray]



@dataclass
class Artifacts:
    """The pipeline outputs a gallery is built on."""

    index_dir: Path
    model_dir: Path
    image_root: Path  # where the pipeline index's `path` column is relative to


@dataclass
class AddReport:
    added: list[tuple[Path, str]] = field(default_factory=list)  # (source file, new image_id)
    duplicates: list[tuple[Path, str]] = field(default_factory=list)  # (source file, image_id already there)
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # (source file, why)
    ignored: list[Path] = field(default_factory=list)  # files in given folders without an image extension
    total: int = 0  # gallery size afterwards


def base_fingerprint(base: Artifacts) -> str:
    """Changes whenever `dvc repro` rebuilds the model or the index."""
    digest = hashlib.sha256()
    for path in (base.index_dir / "index.faiss", base.index_dir / "ids.parquet", base.model_dir / "model.json"):
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found; run `dvc repro`")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def collect_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """Files as given, and image files found under folders (sorted); returns (images, ignored)."""
    images, ignored = [], []
    for path in map(Path, paths):
        if path.is_dir():
            for found in sorted(p for p in path.rglob("*") if p.is_file()):
                (images if found.suffix.lower() in IMAGE_EXTENSIONS else ignored).append(found)
        elif path.is_file():
            images.append(path)  # named explicitly: decoding decides whether it is an image
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return images, ignored


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def with_full_paths(loaded: faiss_index.LoadedIndex, folder: Path, base: Artifacts) -> faiss_index.LoadedIndex:
    """Add `full_path`: pipeline images live under the dataset root, added ones in the store."""
    ids = loaded.ids.copy()
    added = (ids["split"] == ADDED_SPLIT).to_numpy()
    ids["full_path"] = [str((folder if is_added else base.image_root) / p) for p, is_added in zip(ids["path"], added)]
    return faiss_index.LoadedIndex(index=loaded.index, ids=ids, info=loaded.info)


class Gallery:
    def __init__(self, folder: str | Path, base: Artifacts, embed: Embed):
        self.folder = Path(folder)
        self.base = base
        self.embed = embed

    @property
    def current(self) -> Path:
        return self.folder / "current"

    def load(self) -> faiss_index.LoadedIndex:
        """What to search: the gallery once images were added, otherwise the pipeline's index."""
        if not (self.current / "index.faiss").exists():
            return with_full_paths(faiss_index.load(self.base.index_dir), self.folder, self.base)
        with _locked(self.folder):
            return with_full_paths(self._fresh_state()[0], self.folder, self.base)

    def add(self, paths: Sequence[str | Path], skip_bad: bool = False) -> tuple[AddReport, faiss_index.LoadedIndex]:
        """Embed new images into the gallery; returns what happened and the updated index.

        A file whose content is already in the gallery (pipeline or added image) is not added
        again. An unreadable file stops the add, naming it, unless `skip_bad`, which records it.
        """
        images, ignored = collect_images(paths)
        report = AddReport(ignored=ignored)
        with _locked(self.folder):
            state, previous = self._fresh_state() if (self.current / "index.faiss").exists() else (self._from_base(), None)
            known = dict(zip(state.ids["sha256"].dropna(), state.ids.loc[state.ids["sha256"].notna(), "image_id"]))
            new_rows = []
            for source in images:
                digest = file_sha256(source)
                if digest in known:
                    report.duplicates.append((source, known[digest]))
                    continue
                # From the header first (PIL alone would decode up to twice its limit, 179 M pixels), then
                # the whole file: a truncated image fails here, not later.
                problem = check_image(source, PIL_MAX_IMAGE_PIXELS, "the gallery's limit, as data.max_image_pixels' default")
                if problem is not None:
                    if not skip_bad:
                        raise DatasetError(f"{source}: {problem}")
                    report.rejected.append((source, problem))
                    continue
                image_id = f"{ADDED_SPLIT}/{digest[:16]}"
                known[digest] = image_id
                new_rows.append({"source": source, "sha256": digest, "image_id": image_id, "path": f"store/{digest}{source.suffix.lower()}"})
                report.added.append((source, image_id))
            if new_rows:
                rows = pd.DataFrame(new_rows)
                vectors = self.embed(list(rows["source"]))
                for row in rows.itertuples():
                    self._store(row.source, self.folder / row.path)
                state, _ = self._save(state, previous, rows, vectors)
            report.total = int(state.index.ntotal)
        return report, with_full_paths(state, self.folder, self.base)

    # -- internals ---------------------------------------------------------------------------

    def _store(self, source: Path, target: Path) -> None:
        if not target.exists():  # content-addressed: an existing file is this very image
            with io.atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)

    def _from_base(self) -> faiss_index.LoadedIndex:
        """The pipeline's index with a content hash per image, for duplicate detection."""
        base = faiss_index.load(self.base.index_dir)
        ids = base.ids.copy()
        paths = [self.base.image_root / p for p in ids["path"]]
        ids["sha256"] = [file_sha256(p) if p.is_file() else None for p in paths]
        info = {
            **base.info,
            "base_index": str(self.base.index_dir.resolve()),
            "base_fingerprint": base_fingerprint(self.base),
            "n_base": int(base.index.ntotal),
            "n_added": 0,
        }
        return faiss_index.LoadedIndex(index=base.index, ids=ids, info=info)

    def _fresh_state(self) -> tuple[faiss_index.LoadedIndex, Added]:
        """The saved gallery, re-embedded onto the pipeline's new index if `dvc repro` replaced it."""
        # `dvc repro` cannot rebuild a gallery (its added images exist only in its store), so the
        # remedy for a damaged one is the gallery's own, not the stage's the readers would name.
        remedy = f"the gallery is damaged: restore {self.current}, or delete {self.folder} to start the gallery again"
        missing = [self.current / name for name in GALLERY_FILES if not (self.current / name).is_file()]
        if missing:
            raise GalleryError(f"{missing[0]}: not found; {remedy}")
        try:
            state = faiss_index.load(self.current)
            added, vectors = io.read_embeddings(self.current / "added.parquet")
        except ArtifactError as err:
            raise GalleryError(f"{err.problem}; {remedy}") from None
        self._check_consistent(state, added, vectors)
        built_on = state.info.get("base_index")
        if built_on != str(self.base.index_dir.resolve()):
            raise GalleryError(
                f"{self.folder} extends the index in {built_on}, not {self.base.index_dir}; "
                "give this index its own gallery folder (--gallery)"
            )
        if state.info.get("base_fingerprint") == base_fingerprint(self.base):
            return state, (added, vectors)
        extended = state.ids.iloc[: state.info["n_base"]][["image_id", "path"]].astype(str).to_numpy()
        now = io.read_parquet_named(self.base.index_dir / "ids.parquet", columns=["image_id", "path"]).astype(str).to_numpy()
        if extended.shape != now.shape or (extended != now).any():
            return self._retire(len(added)), None
        missing = [p for p in added["path"] if not (self.folder / p).is_file()]
        if missing:
            raise GalleryError(
                f"{self.folder / missing[0]}: added image missing from the gallery store ({len(missing)} missing); "
                f"restore it, or delete {self.folder} to start the gallery again"
            )
        log.warning("the pipeline's index or model changed since the last add: re-embedding %d added images", len(added))
        return self._save(self._from_base(), None, added, self.embed([self.folder / p for p in added["path"]]))

    def _retire(self, n_added: int) -> faiss_index.LoadedIndex:
        """The pipeline's images are others now (`dvc repro` on another dataset): the added images
        belonged to the old ones, so the gallery starts again from the new index. The old `current/`
        moves to `retired/<time>/`; its images stay in store/."""
        retired = self.folder / "retired" / time.strftime("%Y%m%d-%H%M%S")
        retired.parent.mkdir(exist_ok=True)
        self.current.rename(retired)
        log.warning(
            "the pipeline's images are not the ones the %d added images were added to (dvc repro on other data): "
            "starting a new gallery; the old one is in %s",
            n_added, retired,
        )  # fmt: skip
        return self._from_base()

    def _check_consistent(self, state: faiss_index.LoadedIndex, added: pd.DataFrame, vectors: np.ndarray) -> None:
        n_base = state.info.get("n_base", -1)
        if not (state.index.ntotal == len(state.ids) == n_base + len(added) and len(vectors) == len(added)):
            raise GalleryError(
                f"{self.current}: index ({state.index.ntotal} rows), ids ({len(state.ids)}) and added images "
                f"({len(added)} + {n_base} from the pipeline) disagree; delete {self.folder} and add the images again"
            )

    def _save(
        self, state: faiss_index.LoadedIndex, previous: Optional[Added], new_rows: pd.DataFrame, vectors: np.ndarray
    ) -> tuple[faiss_index.LoadedIndex, Added]:
        """Append `new_rows` (with their vectors) to `state`, whose added images are `previous`
        (None: none yet), and swap the result in as `current/`."""
        meta = pd.DataFrame(
            {
                "image_id": new_rows["image_id"].to_numpy(),
                "path": new_rows["path"].to_numpy(),
                "split": ADDED_SPLIT,
                "label": pd.array([pd.NA] * len(new_rows), dtype="Int64"),
                "class_name": pd.array([None] * len(new_rows), dtype=object),
                "sha256": new_rows["sha256"].to_numpy(),
                "source": new_rows["source"].astype(str).to_numpy(),
            }
        )
        previous_meta, previous_vectors = previous or (meta.iloc[:0], np.zeros((0, vectors.shape[1]), dtype=np.float32))
        added_meta = pd.concat([previous_meta, meta], ignore_index=True)
        added_vectors = np.concatenate([previous_vectors, vectors])
        try:
            state.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        except RuntimeError as err:
            raise GalleryError(f"the pipeline's index ({state.info.get('factory')}) does not accept new vectors: {err}") from None
        ids = pd.concat([state.ids, meta.drop(columns=["source"])], ignore_index=True)
        info = {**state.info, "n": int(state.index.ntotal), "n_added": len(added_meta), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with io.atomic_dir(self.current) as tmp:
            faiss_index.save(tmp, state.index, ids, info)
            io.write_embedding_shard(tmp / "added.parquet", added_meta, added_vectors)
        return faiss_index.LoadedIndex(index=state.index, ids=ids, info=info), (added_meta, added_vectors)
