"""FAISS factory strings and search parameters: checked without building or training anything.

Apart from `faiss_index` (which builds, saves and searches) because every stage runs these
checks before its heavy work (`pipeline.preflight`): a factory string that cannot work for the
embedding size fails `train` in seconds, not `index` after a full training run.
"""

from __future__ import annotations

import re

import faiss
import numpy as np

from pipeline.errors import IndexBuildError

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def check_lists_fit(factory: str, n: int) -> None:
    """An IVF needs at least as many vectors as lists to train."""
    for match in re.finditer(r"IVF(\d+)", factory):
        nlist = int(match.group(1))
        if nlist > n:
            raise IndexBuildError(
                f"index.factory {factory!r}: IVF{nlist} needs at least {nlist} vectors to train, "
                f"the gallery has {n}; use IVF{max(1, int(np.sqrt(n)))} or fewer lists"
            )


def check_factory_string(factory: str, dim: int, metric: str = "ip", search_params: str = "") -> None:
    """Fail now, naming the param, if `factory` or `search_params` cannot work for vectors of `dim`.

    Builds the empty (untrained) index, which costs nothing; whether an IVF has enough vectors to
    train is known only when the gallery is, and `build` checks it.
    """
    try:
        index = faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as err:
        raise IndexBuildError(f"index.factory {factory!r} is not a valid FAISS factory string for dim {dim}: {err}") from None
    apply_search_params(index, search_params)


def apply_search_params(index: faiss.Index, search_params: str) -> None:
    """Set e.g. "efSearch=64" or "nprobe=8" (FAISS ParameterSpace syntax)."""
    if search_params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        except RuntimeError as err:
            raise IndexBuildError(f"index.search_params {search_params!r} do not apply to this index: {err}") from None


