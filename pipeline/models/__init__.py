"""open_clip model loading: hub tag, local checkpoint or no weights, plus the project's tiny config.

`create_model` is the single entry point (it wraps `open_clip.create_model_and_transforms`).
`save_trained` / `load_trained` write and read the `artifacts/model/` folder that `train` leaves
for `embed` and the user commands.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet

from pipeline import io
from pipeline.errors import ModelError  # noqa: F401 (callers import it from here too)
from pipeline.pixels import Normalise, SampleTransform, split_transform

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_MODEL = "clipline-tiny"
MODEL_JSON = "model.json"

_registered = False



def register_configs() -> None:
    """Make the project's model configs (clipline-tiny) known to open_clip by name."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(device)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess: Callable
    tokenizer: Callable
    name: str
    pretrained: str
    device: torch.device
    # Metric learning (triplet) maps image features through a head into its own space.
    image_head: Optional[torch.nn.Module] = None

    @functools.cached_property
    def eval_pixels(self) -> tuple[SampleTransform, Normalise]:
        """`preprocess` split into its per-sample part (-> uint8) and its per-batch normalisation."""
        return split_transform(self.preprocess)

    @functools.cached_property
    def train_pixels(self) -> tuple[SampleTransform, Normalise]:
        return split_transform(self.preprocess_train)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def embed_dim(self) -> int:
        """Dimension of the image embeddings this model produces (the head's, when it has one)."""
        if self.image_head is not None:
            return int(self.image_head.proj.out_features)
        return self.tower_dim

    @property
    def tower_dim(self) -> int:
        return int(open_clip.get_model_config(self.name)["embed_dim"])


def _hub_weights_cached(name: str, tag: str) -> bool:
    """True when the weights for (name, tag) are already in the local Hugging Face / open_clip cache."""
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            candidates.insert(0, filename.replace(".bin", ".safetensors"))
        return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in candidates)
    url = cfg.get("url", "")
    return bool(url) and (Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)).exists()


def _network_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_pretrained(name: str, pretrained: str) -> Optional[str]:
    """Turn `model.pretrained` into what open_clip takes: None, a file path, or a hub tag.

    Fails fast, before any download attempt, when hub weights are neither cached nor reachable.
    """
    register_configs()
    if name not in open_clip.list_models():
        raise ModelError(
            f"model.name: unknown model {name!r}; choose one of open_clip.list_models() "
            f"(e.g. ViT-B-32) or {TINY_MODEL!r}"
        )
    if pretrained in ("", "none", None):
        return None
    path = Path(pretrained).expanduser()
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors") or path.exists():
        if not path.is_file():
            raise ModelError(f"model.pretrained: checkpoint file {path} not found")
        return str(path)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ModelError(
            f"model.pretrained: {pretrained!r} is not a hub tag for {name}; known tags: {', '.join(tags) or 'none'} "
            "(or give a local checkpoint path, or 'none')"
        )
    if not _hub_weights_cached(name, pretrained) and not _network_reachable():
        raise ModelError(
            f"model.pretrained: weights {name}/{pretrained} are not in the local cache and there is no network.\n"
            "Fetch them ahead on a machine with a network, then copy the cache over:\n"
            f"  python -c \"import open_clip; open_clip.create_model_and_transforms('{name}', pretrained='{pretrained}')\"\n"
            "  # copies to ~/.cache/huggingface/hub; copy that folder (or set HF_HOME to where you put it)\n"
            "or point model.pretrained at a downloaded checkpoint file (open_clip_pytorch_model.bin / .safetensors)."
        )
    return pretrained


def create_model(name: str, pretrained: str = "none", device: str | torch.device = "cpu") -> LoadedModel:
    """Build an open_clip model with its transforms and tokenizer; weights per `pretrained`."""
    weights = resolve_pretrained(name, pretrained)
    device = resolve_device(device) if isinstance(device, str) else device
    try:
        model, preprocess_train, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
    except pickle.UnpicklingError as err:  # open_clip loads with weights_only=True
        raise ModelError(f"model.pretrained: {pretrained} holds more than weights; refusing to unpickle it ({_first_line(err)})") from None
    except RuntimeError as err:  # a local checkpoint that does not fit the architecture
        raise ModelError(f"model.pretrained: cannot load {pretrained!r} into {name}: {err}") from None
    if isinstance(model.visual, ModifiedResNet):
        # oneDNN's (CPU) and cuDNN's (GPU, with AMP) convolutions are faster on NHWC tensors: a
        # CLIP training step of clipline-tiny took 0.73x the time. Inputs need no conversion.
        model.visual.to(memory_format=torch.channels_last)
    return LoadedModel(
        model=model,
        preprocess_train=preprocess_train,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        pretrained=pretrained,
        device=device,
    )


def save_trained(model_dir: Path, loaded: LoadedModel, info: dict[str, Any], checkpoints: dict[str, dict]) -> None:
    """Write checkpoints (state dicts) and model.json into `model_dir` (already a temp folder)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for filename, state in checkpoints.items():
        # Saved through a file object: given a path, torch names the archive inside the zip after
        # the (temporary, random) file name, and the same weights would hash differently each run.
        with io.atomic_path(model_dir / filename) as tmp, open(tmp, "wb") as file:
            torch.save(state, file)
    io.write_json(model_dir / MODEL_JSON, {"name": loaded.name, "pretrained": loaded.pretrained, **info})


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_weights(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint of tensors and plain containers. weights_only=True: a pickle that would build
    other objects (and could run code while doing so) is refused, never executed."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if "global" in reason.lower():  # the pickle names a function or class to call
            raise ModelError(f"{path}: holds more than weights; refusing to unpickle it ({reason})") from None
        raise ModelError(f"{path}: not a checkpoint ({reason})") from None
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ModelError(f"{path}: not a readable checkpoint, truncated or damaged ({_first_line(err)[:160]})") from None


def _unpickler_reason(err: Exception) -> str:
    """torch's refusal without its advice: it suggests `weights_only=False`, the unsafe load that
    weights_only exists to avoid, and allow-listing the global."""
    advice = ("weights_only", "Weights only load failed", "Check the documentation", "Please file an issue", "allowlist")
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not any(a in line for a in advice)]
    reason = lines[0].replace("WeightsUnpickler error:", "").strip() if lines else ""
    return reason.split(". Please use", 1)[0] or "an unreadable pickle"


def _state_dict_of(state, path: Path, part: str) -> dict:
    if not isinstance(state, dict) or not isinstance(state.get(part), dict):
        raise ModelError(f"{path}: not a checkpoint of this pipeline (expected a dict with a '{part}' state dict, found {type(state).__name__}); rerun `dvc repro train`")
    return state[part]


def _load_into(module: torch.nn.Module, weights: dict, path: Path, part: str) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:  # missing / unexpected keys, shapes of another model
        detail = " ".join(_first_line(err).split())[:200]
        raise ModelError(f"{path}: its '{part}' weights do not fit the model in model.json ({detail}); rerun `dvc repro train`") from None


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init_warning():
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)  # open_clip logs it through the root logger
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_trained(model_dir: str | Path = "artifacts/model", device: str = "auto") -> tuple[LoadedModel, dict]:
    """Rebuild the model that `train` left behind; returns it in eval mode with its model.json."""
    model_dir = Path(model_dir)
    info = io.read_json(model_dir / MODEL_JSON)
    checkpoint = info.get("checkpoint")
    # A trained checkpoint holds every weight, so the base weights need not be fetched again, and
    # open_clip's "initialized randomly" warning would be wrong: the checkpoint loads right after.
    with _quiet_random_init_warning() if checkpoint else contextlib.nullcontext():
        loaded = create_model(info["name"], "none" if checkpoint else info["pretrained"], device)
    loaded.pretrained = info["pretrained"]
    if checkpoint:
        path = model_dir / checkpoint
        state = load_weights(path, loaded.device)
        _load_into(loaded.model, _state_dict_of(state, path, "model"), path, "model")
        if "head" in state:
            from pipeline.models.heads import ProjectionHead

            loaded.image_head = ProjectionHead(loaded.tower_dim, info["head_dim"]).to(loaded.device)
            _load_into(loaded.image_head, _state_dict_of(state, path, "head"), path, "head")
            loaded.image_head.eval()
    loaded.model.eval()
    return loaded, info
