"""FAISS factory strings and search parameters: chosen (`index.factory: auto`) and checked
without building or training anything.

Apart from `faiss_index` (which builds, saves and searches) because every stage runs these
checks before its heavy work (`pipeline.preflight`): a factory string that cannot work for the
embedding size fails `train` in seconds, not `index` after a full training run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import faiss
import numpy as np

from pipeline.errors import IndexBuildError

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
MAX_TRAIN_POINTS = 200_000  # IVF/PQ quantisers train on a sample; more adds time, not quality

# `index.factory: auto`, after the FAISS wiki's "Guidelines to choose an index"; the settings are
# those that kept recall@10 >= 0.95 on embedding-like vectors in bench/index_scale.py.
AUTO = "auto"
FLAT_BELOW = 50_000  # exact search over fewer vectors is fast enough, needs no training and has recall 1
FLOAT_BYTES_MAX = 8 << 30  # HNSW keeps every float32 vector; above 8 GiB of them, PQ codes and a refine
HNSW_M = 32  # links per vector
HNSW_EF_AT_100K = 96  # candidates kept while searching 100k vectors; see hnsw_ef_search
MIN_POINTS_PER_LIST = 39  # FAISS's k-means asks for at least 39 training points per centroid
NPROBE_FRACTION = 4  # IVF: probe a quarter of the lists (few lists: the training sample caps them)
K_FACTOR_RF = 8  # IVF-PQ: re-rank k * 8 candidates with the SQ8 codes


@dataclass(frozen=True)
class AutoChoice:
    factory: str
    search_params: str
    reason: str


def choose_factory(n: int, dim: int, metric: str = "ip") -> AutoChoice:
    """What `index.factory: auto` builds for `n` vectors of `dim`: a pure function of its arguments.

    Flat below FLAT_BELOW vectors; HNSW while the float32 vectors fit in FLOAT_BYTES_MAX; above,
    IVF with 4-bit PQ codes (fast-scan) whose top candidates are re-ranked with 8-bit codes, trained
    on a sample. The metric changes no choice (each supports both); the choice records it.
    """
    if metric not in METRICS:
        raise IndexBuildError(f"index.metric {metric!r}: expected one of {sorted(METRICS)}")
    if n < FLAT_BELOW:
        return AutoChoice("Flat", "", f"{n:,} vectors < {FLAT_BELOW:,}: exact search (Flat) is fast enough, needs no training and finds the true neighbours")
    float_mib = n * dim * 4 / 2**20
    if n * dim * 4 <= FLOAT_BYTES_MAX:
        ef = hnsw_ef_search(n)
        return AutoChoice(
            f"HNSW{HNSW_M}",
            f"efSearch={ef}",
            f"{n:,} vectors >= {FLAT_BELOW:,} whose float32 copies ({float_mib:,.0f} MiB) fit in {FLOAT_BYTES_MAX >> 30} GiB: "
            f"an HNSW graph ({HNSW_M} links per vector), no training and the best recall per query time when memory "
            f"allows; efSearch={ef} ({HNSW_EF_AT_100K} at 100k vectors, doubled per 10x more)",
        )
    m, nlist = pq_codes(dim), ivf_lists(n)
    return AutoChoice(
        *ivf_factory(n, dim, "PQ"),
        f"{n:,} vectors whose float32 copies ({float_mib:,.0f} MiB) exceed {FLOAT_BYTES_MAX >> 30} GiB: IVF with "
        f"{m} 4-bit PQ codes per vector ({(m + 1) // 2} bytes, fast-scan), the top k*{K_FACTOR_RF} re-ranked with "
        f"8-bit scalar codes ({dim} bytes); {nlist} lists (4*sqrt(n) as a power of two, with at least "
        f"{MIN_POINTS_PER_LIST} points per list in the {min(n, MAX_TRAIN_POINTS):,}-vector training sample), "
        f"{max(1, nlist // NPROBE_FRACTION)} probed (1/{NPROBE_FRACTION})",
    )


def hnsw_ef_search(n: int) -> int:
    """efSearch doubled per 10x more vectors (80 at 50k, 96 at 100k, 192 at 1M), in steps of 16:
    at a fixed efSearch recall falls as the graph grows; this growth kept recall@10 near 0.97 on
    the bench's embedding-like vectors from 100k to 1M."""
    return 16 * math.ceil(HNSW_EF_AT_100K * 2 ** math.log10(n / 100_000) / 16)


def ivf_lists(n: int) -> int:
    """The wiki's 4*sqrt(n) lists as a power of two, capped so that the training sample has at
    least MIN_POINTS_PER_LIST points per list."""
    cap = max(1, min(n, MAX_TRAIN_POINTS) // MIN_POINTS_PER_LIST)
    return min(2 ** round(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(cap)))


def ivf_factory(n: int, dim: int, codes: str) -> tuple[str, str]:
    """(factory, search params) of an IVF sized as auto sizes it for `n` vectors: codes "PQ" (auto's
    choice for the largest galleries: 4-bit PQ codes re-ranked with SQ8 codes) or "Flat" (float32)."""
    nlist = ivf_lists(n)
    nprobe = max(1, nlist // NPROBE_FRACTION)
    if codes == "Flat":
        return f"IVF{nlist},Flat", f"nprobe={nprobe}"
    return f"IVF{nlist},PQ{pq_codes(dim)}x4fs,Refine(SQ8)", f"nprobe={nprobe},k_factor_rf={K_FACTOR_RF}"


def pq_codes(dim: int) -> int:
    """4-bit PQ codes per vector: one per 4 dimensions (half a byte per 4 floats), per 2 or 1 where `dim` does not divide."""
    return dim // next(step for step in (4, 2, 1) if dim % step == 0)


def parse_search_params(search_params: str) -> dict[str, str]:
    """"nprobe=8,k_factor_rf=4" -> {"nprobe": "8", "k_factor_rf": "4"}; whether a name applies is FAISS's to say."""
    items = {}
    for item in filter(None, (part.strip() for part in search_params.split(","))):
        name, equals, value = item.partition("=")
        if not equals or not name.strip() or not value.strip():
            raise IndexBuildError(f"index.search_params {search_params!r}: expected name=value items separated by commas, got {item!r}")
        try:
            float(value)
        except ValueError:
            raise IndexBuildError(f"index.search_params {search_params!r}: {name.strip()} needs a number, got {value.strip()!r}") from None
        items[name.strip()] = value.strip()
    return items


def auto_search_params(choice: AutoChoice, given: str, n: int, dim: int, metric: str) -> str:
    """Auto's search params, with those set in `index.search_params` replacing the same names or
    added; each must apply to the chosen index. An empty `index.search_params` keeps auto's own."""
    merged = {**parse_search_params(choice.search_params), **parse_search_params(given)}
    combined = ",".join(f"{name}={value}" for name, value in merged.items())
    problem = _search_params_problem(choice.factory, dim, metric, combined)
    if problem:
        raise IndexBuildError(
            f"index.search_params {given!r} does not apply to {choice.factory}, the index that index.factory auto chose "
            f"for {n:,} vectors of dim {dim} ({problem}); auto's own are {choice.search_params!r}: set "
            f'index.search_params to "" to use them, or to settings of this index'
        )
    return combined


def check_auto_search_params(search_params: str, dim: int, metric: str = "ip") -> None:
    """Before the gallery's size is known: `search_params` must apply to one of the indexes auto
    may choose (Flat takes none, HNSW efSearch, IVF-PQ nprobe and k_factor_rf)."""
    normalised = ",".join(f"{name}={value}" for name, value in parse_search_params(search_params).items())
    sizes = [0, FLAT_BELOW, FLOAT_BYTES_MAX // (4 * dim) + 1]  # one of each choice
    problems = [_search_params_problem(choose_factory(n, dim, metric).factory, dim, metric, normalised) for n in sizes]
    if all(problems):
        raise IndexBuildError(
            f"index.search_params {search_params!r} cannot apply to any index that index.factory auto chooses "
            f"(Flat: none; HNSW: efSearch; IVF-PQ with a refine: nprobe, k_factor_rf) ({problems[-1]}); "
            f'set it to "" for auto\'s own'
        )


def _search_params_problem(factory: str, dim: int, metric: str, search_params: str) -> str | None:
    """FAISS's complaint when `search_params` do not apply to an empty `factory` index, else None."""
    index = faiss.index_factory(dim, factory, METRICS[metric])
    try:
        faiss.ParameterSpace().set_index_parameters(index, search_params)
    except RuntimeError as err:
        found = re.search(r"could not [^\n]*", str(err))  # "could not set parameter efSearch", without the C++ location
        return found.group(0) if found else str(err)
    return None


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


