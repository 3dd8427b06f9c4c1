"""Load pretrained weights safely from a local file, or from a hub with a fast, clear offline error."""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import torch
from filelock import FileLock
from torch import nn

from mmpeft.core.errors import WeightsUnavailable
from mmpeft.core.files import cache_dir
from mmpeft.core.identity import record_weights

__all__ = [
    "optional_path",
    "read_state_dict",
    "load_weights",
    "hub_reachable",
    "from_hub",
    "register_weights_builder",
    "build_weights",
    "cache_dir",
    "pretrained_weights",
    "load_quickstart_weights",
    "weights_source",
]

# backbone name -> "package.module:function" that trains its weights into a file (mmpeft's own quickstart
# backbones): registered as strings, so backbones import no training loop and no dataset
WEIGHTS_BUILDERS: dict[str, str] = {}

T = TypeVar("T")
_NESTED = ("state_dict", "model", "module", "model_state", "base_model")  # base_model: Point-MAE / Point-BERT


def optional_path(value: str | os.PathLike | None) -> str | None:
    """A weights argument as given on the command line: `--...weights null` after a YAML config reaches the
    constructor as the string 'None' (jsonargparse's nested class arguments), which means no file."""
    if value is None or str(value).strip() in ("", "None", "null", "none"):
        return None
    return str(value)


def weights_source(weights: str | os.PathLike | None, pretrained: bool | str | None, name: str) -> str | None:
    """What the frozen weights came from, for their recorded identity: the file, the hub, or None (random)."""
    weights = optional_path(weights)
    if weights is not None:
        return weights
    return f"hub:{name}" + (f":{pretrained}" if isinstance(pretrained, str) else "") if pretrained else None


def _numpy_scalar_globals() -> list:
    """What a pickled numpy scalar needs under `weights_only=True`, and nothing more: numpy's scalar
    reconstructor (under numpy 1's and numpy 2's module names), `numpy.dtype`, and the dtype classes of bool,
    integer, float and complex scalars (the unpickler sets a dtype's state only on an allowed class). Point-BERT's
    checkpoints keep numpy scalars in their `metrics`; arrays (`_reconstruct`, `ndarray`) and everything else
    stay refused."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    dtypes = sorted({type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"}, key=lambda t: t.__qualname__)
    scalar = multiarray.scalar
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat `{name: tensor}` from .safetensors, .pt/.pth/.bin (weights_only) or .npz files."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"weights file {str(path)!r} does not exist; pass the path of a local checkpoint")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix == ".npz":
            raise WeightsUnavailable(f"{str(path)!r}: .npz (JAX) checkpoints load through the backbone, not here")
        else:
            with torch.serialization.safe_globals(_numpy_scalar_globals()):
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except WeightsUnavailable:
        raise
    except Exception as err:
        raise WeightsUnavailable(
            f"could not read weights file {str(path)!r} ({type(err).__name__}: {err}); mmpeft reads safetensors and "
            "tensor-only torch checkpoints (torch.load with weights_only=True)"
        ) from err
    while isinstance(state, dict):
        nested = [k for k in _NESTED if isinstance(state.get(k), dict)]
        if not nested or any(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = state[nested[0]]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailable(f"{str(path)!r} does not hold a state dict of tensors")
    return state


def _strip_prefix(state: dict[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    wanted = set(keys)
    for prefix in ("module.", "model.", "backbone.", "visual.", "encoder."):
        if not (state.keys() & wanted) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    ignore: Callable[[str], bool] = lambda k: False,
) -> None:
    """Strict load that explains a mismatch (another architecture's checkpoint, a head left over)."""
    state = _strip_prefix(state, module.state_dict().keys())
    state = {k: v for k, v in state.items() if not ignore(k)}
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:3]]
        raise WeightsUnavailable(
            f"weights from {source} do not fit {getattr(module, 'name', type(module).__name__)}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} with another shape {shapes}. Is the file for this architecture?"
        )
    module.load_state_dict(state, strict=True)


def hub_reachable(timeout: float = 2.0) -> bool:
    """False at once when offline (HF_HUB_OFFLINE set, or the hub's host does not resolve)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def from_hub(name: str, build: Callable[[], T]) -> T:
    """Run `build()` (which downloads `name`) with a clear error instead of minutes of retries offline."""
    advice = (
        f"download the weights of {name!r} on a machine with network access (e.g. its model.safetensors) and "
        "pass them as a local file: weights=path/to/model.safetensors"
    )
    if not hub_reachable():
        raise WeightsUnavailable(f"cannot fetch {name!r}: the model hub is not reachable (offline). Instead, {advice}")
    try:
        return build()
    except Exception as err:
        raise WeightsUnavailable(f"fetching {name!r} from the model hub failed ({err}). Instead, {advice}") from err


def register_weights_builder(name: str, builder: str) -> None:
    """`builder(path, **options) -> info` trains the weights of backbone `name` and writes them to `path`."""
    WEIGHTS_BUILDERS[name] = builder


def build_weights(name: str, path: Path, **options: object) -> dict:
    """Run the registered builder of `name` (e.g. the digits ViT's upstream pretraining)."""
    if name not in WEIGHTS_BUILDERS:
        raise WeightsUnavailable(f"no pretraining is registered for {name!r}; pass a weights file instead")
    import importlib

    module, _, function = WEIGHTS_BUILDERS[name].partition(":")
    return getattr(importlib.import_module(module), function)(path, **options)


def pretrained_weights(name: str, arch: dict, recipe: dict) -> Path:
    """The cached weights of one of mmpeft's quickstart backbones, pretrained on first use by the builder
    registered for `name`. The file name holds a hash of the architecture and the recipe, so changing either
    builds anew; the torch RNG is forked, so a fresh and a cached run draw the same numbers afterwards."""
    key = hashlib.sha1(json.dumps({"arch": arch, "recipe": recipe}, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir() / f"{name}-{key}.safetensors"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # runs started together (a sweep's cells, parallel test workers) pretrain once: the others wait for the file
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            _pretrain(name, path, arch, recipe)
    return path


def _pretrain(name: str, path: Path, arch: dict, recipe: dict) -> None:
    with torch.random.fork_rng():  # a fresh context: the pretraining's Lightning objects must not see the
        # hyper-parameters LightningCLI sets for the task whose __init__ builds this backbone by name
        info = contextvars.Context().run(build_weights, name, path, recipe=recipe, arch=arch)
    scores = ", ".join(f"upstream {k.removeprefix('upstream_').replace('_', ' ')} {v:.3f}"
                       for k, v in info.items() if k.startswith("upstream_"))  # fmt: skip
    print(f"pretrained {name} in {info['seconds']} s, {scores}; cached at {path}")


def load_quickstart_weights(module: nn.Module, name: str, arch: dict, recipe: dict, pretrained: bool,
                            weights: str | os.PathLike | None, epochs: int | None = None) -> None:  # fmt: skip
    """A quickstart backbone's weights: `weights` (a file) if given, else with `pretrained` mmpeft's own upstream
    pretraining of `name` (built on first use and cached; `epochs` overrides the recipe's), else none (random
    init). The loaded weights' identity is recorded either way."""
    weights = optional_path(weights)
    if weights is None and pretrained:
        weights = str(pretrained_weights(name, arch, {**recipe, **({"epochs": epochs} if epochs else {})}))
    if weights is not None:
        load_weights(module, read_state_dict(weights), weights)
    record_weights(module, weights)
