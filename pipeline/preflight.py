"""Checks of params.yaml that need more than each value's own type, run before any heavy work.

Every stage runs them first (`pipeline.stage.load_params`), whatever it was rerun for: a stage
that DVC reruns because its own params changed may meet a combination that a later stage cannot
use (`train.triplet.head_dim: 100` with `index.factory: PQ8`), and should fail in seconds rather
than after a full training run. They read the other sections without declaring them in dvc.yaml:
a check can only stop a stage, never change what it writes, so it is no reason to rerun one.

They read model configs as JSON and build an empty FAISS index, so they need neither torch nor
open_clip loaded, nor any weights.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pandas as pd

from pipeline.errors import ParamsError
from pipeline.params import Params

if TYPE_CHECKING:  # only for the annotation: prepare, which has no prepared tables yet, runs this module
    from pipeline.prepared import Prepared

PROJECT_CONFIGS = Path(__file__).parent / "models" / "configs"


def model_configs() -> dict[str, Path]:
    """Every model config open_clip knows by name (its own and the project's), without importing it."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(location) / "model_configs" for location in (spec.submodule_search_locations or [])] if spec else []
    return {path.stem: path for folder in [*folders, PROJECT_CONFIGS] for path in sorted(folder.glob("*.json"))}


def check_model_name(name: str) -> Optional[dict]:
    """The model's config, or None for an hf-hub: model (known only online); unknown names fail."""
    if name.startswith("hf-hub:"):
        return None
    configs = model_configs()
    if name not in configs:
        close = sorted(n for n in configs if n.lower().startswith(name.lower()[:4]))[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ParamsError(f"model.name: unknown model {name!r} (not an open_clip config nor the project's clipline-tiny{hint})")
    return json.loads(configs[name].read_text())


def index_dimension(params: Params, config: Optional[dict]) -> Optional[int]:
    """The dimension the index will hold: the projection head's for triplet, else the model's embedding."""
    if params.train.method == "triplet":
        return params.train.triplet.head_dim
    return None if config is None else int(config["embed_dim"])


def check(params: Params) -> None:
    """Raise ParamsError / IndexBuildError, naming the key, for params that cannot work."""
    config = check_model_name(params.model.name)
    dim = index_dimension(params, config)
    if dim is not None:
        from pipeline.retrieval import factory  # faiss only here, not for every params load

        if params.index.factory == factory.AUTO:  # the index is chosen by the gallery's size, known in `index`
            factory.check_auto_search_params(params.index.search_params, dim, params.index.metric)
        else:
            factory.check_factory_string(params.index.factory, dim, params.index.metric, params.index.search_params)


def check_processes(processes: int, device: str) -> None:
    """Under torchrun each process drives one GPU: there must be as many GPUs as processes."""
    import torch  # only when a launch is asked for: params checks stay free of torch otherwise

    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu and device.startswith("cuda:"):
        raise ParamsError(f"runtime.device {device!r}: with runtime.processes {processes}, each process takes its own GPU; use 'auto' or 'cuda'")
    if on_gpu and processes > torch.cuda.device_count():
        raise ParamsError(f"runtime.processes: {processes} processes, but this machine has {torch.cuda.device_count()} GPUs (one process per GPU)")


def check_probe_k(params: Params, images: pd.DataFrame) -> None:
    """probe.k neighbours must exist in the probe's gallery (labelled images of its gallery split)."""
    gallery = int(((images["split"] == params.probe.gallery_split) & images["label"].notna()).sum())
    if gallery and params.probe.k > gallery:
        raise ParamsError(
            f"probe.k: {params.probe.k} neighbours asked for, but the '{params.probe.gallery_split}' gallery has {gallery} labelled images"
        )


def check_against_data(params: Params, prepared: "Prepared") -> None:
    """The checks that need the prepared tables (every stage after `prepare` has them). The
    recall_k check needs the metrics' candidate counting and lives with it
    (`metrics.tasks.check_recall_k`), so stages that never score retrieval do not depend on it."""
    check_probe_k(params, prepared.images)
