"""Checks of params.yaml that need more than each value's own type, run before any heavy work.

`prepare` is the first stage, so it runs them all: a misspelt model name or a FAISS factory
string that cannot work stops `dvc repro` in seconds, not after the dataset was decoded and a
model trained. They read model configs as JSON and build an empty FAISS index, so they need
neither torch nor open_clip loaded, nor any weights.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

from pipeline.errors import ParamsError
from pipeline.params import Params

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
        from pipeline.retrieval import faiss_index  # faiss only here, not for every params load

        faiss_index.check_factory_string(params.index.factory, dim, params.index.metric, params.index.search_params)
