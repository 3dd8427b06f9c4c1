"""The `Method` base class and the method registry.

A method is a config dataclass with a few class-level declarations (what trains, whether it is
the identity at init, whether and how it merges, how the frozen backbone behaves in training)
and `apply` / `merge` / `unmerge`. Methods register themselves under a short name usable in YAML
and on the command line; third-party methods register the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmpeft.core.conv_bias import bias_apart, restore_conv_forwards
from mmpeft.core.errors import NotMergeable, NotSupported, UnknownName
from mmpeft.core.inject import freeze, placements, set_trainable
from mmpeft.core.modules import adapter_modules

__all__ = [
    "Method",
    "register_method",
    "get_method",
    "create_method",
    "list_methods",
    "method_from_config",
    "method_from_spec",
    "apply_frozen_mode",
    "task_owned",
    "FROZEN_MODES",
]

FROZEN_MODES = ("train", "eval")
DENOISER_FAMILIES = ("unet", "dit")
METHODS: dict[str, type[Method]] = {}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Method:
    """Base of every PEFT method. Subclasses are dataclasses whose fields are the method's config.

    Class-level declarations (tests assert each of them, whichever way it is declared):
      name: short registry name ("lora").
      identity_at_init: the adapted backbone computes exactly the frozen backbone's function at step 0.
      mergeable: `merge` folds the method into the backbone (else it raises `NotMergeable`).
      needs_tokens: attaches to the token anatomy (sites, layout), so only runs on a `TokenBackbone`.
      needs_points: reads point geometry (token centres, the point encoder's own query form), so only runs on a
          point transformer (Point-PEFT); it raises `NotSupported` on any other backbone.
      needs_denoiser: works on a diffusion denoiser's schedule and layers (EfficientDM's per-step quantizers), so only
          runs on a UNet or a DiT (backbone family "unet" / "dit"); `apply` refuses any other backbone.
      frozen_mode: "train" (frozen modules follow train/eval, e.g. dropout and drop-path stay
          active) or "eval" (the frozen backbone always runs in eval mode, as VPT does).
      trains_backbone: every backbone tensor trains in place (full fine-tuning): no step-0 copy is
          kept, so `disabled()` and `unload()` refuse.
      no_pristine: why the adapted model holds no frozen backbone to switch back to ("" when it does): `disabled()`
          refuses with it (a loaded integer export, whose float weights were released).
      presets: named config overrides; "paper" reproduces the official recipe.

    Each field carries one line of help in its metadata (`field(default=..., metadata={"help": ...})`, as Hugging
    Face peft's configs do); `options()` reads it (`mmpeft methods NAME` prints it).

    `param_dtype` (a field every method has): the dtype of the method's own tensors. "float32" keeps
    them fp32 on fp16 / bf16 backbones (inputs are cast at the piece's boundary and outputs cast
    back); "backbone" keeps the host's dtype. Merging always writes in the host's dtype.
    """

    name: ClassVar[str] = ""
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    needs_tokens: ClassVar[bool] = False
    needs_points: ClassVar[bool] = False
    needs_denoiser: ClassVar[bool] = False
    frozen_mode: ClassVar[str] = "train"
    trains_backbone: ClassVar[bool] = False
    forward_passes: ClassVar[int] = 1
    no_pristine: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    param_dtype: str = field(
        default="float32",
        metadata={
            "help": (
                'dtype of the method\'s own tensors: "float32" (fp32 even on fp16/bf16 backbones), '
                '"bfloat16", "float16", or "backbone" (the host\'s dtype); merging writes the host\'s dtype'
            )
        },
    )
    head_init: str | None = field(
        default=None,
        metadata={
            "help": (
                "init of the task head's Linears unless the head spec sets one: trunc_normal:<std>, "
                "kaiming_normal_fan_out, zeros, normal:<std>, with ;bias=<value>; unset: PyTorch's default"
            )
        },
    )

    # -- what subclasses implement ------------------------------------------------------------
    def inject(self, backbone: nn.Module) -> None:
        """Attach the method's modules (already frozen backbone; modules train by default)."""

    def unfrozen(self, backbone: nn.Module) -> list[str]:
        """Names of backbone tensors the method trains in place (BitFit's biases, LN-tuning)."""
        return []

    def prepare(self, backbone: nn.Module, data: Any, may_build: bool = True, log: Any = print) -> None:
        """Derived state the method builds from the training data before a run uses it (Point-PEFT's memory bank):
        loaded when it exists, built when `may_build` (one process of a multi-process run builds, the others load
        after a barrier). `data` is the run's datamodule (None outside a run). Nothing by default."""

    def use_schedule(self, backbone: nn.Module, timesteps: Any) -> None:
        """A sampler is about to run with these timesteps (None: back to the training schedule): a method that
        keeps per-denoising-step state (EfficientDM's activation tables) reads it through them. Nothing by
        default."""

    def stand_in_state(self, backbone: nn.Module) -> None:
        """Derived state of its real size with random values (a benchmark measures its cost, not its values);
        nothing by default."""

    def extra_loss(self, outputs: list[torch.Tensor]) -> torch.Tensor | None:
        """A loss term added to the task loss; `outputs` holds one entry per forward pass
        (`forward_passes` of them, e.g. MoSA's two passes and their consistency term)."""
        return None

    def initial_head(self) -> str | None:
        """How the task head is initialised when its spec does not say (`head_init`: "trunc_normal:0.02",
        "kaiming_normal_fan_out;bias=-4.59511985013459", ...; None: PyTorch's default)."""
        return self.head_init

    def param_groups(self, named: dict[str, nn.Parameter]) -> list[dict[str, Any]]:
        """Optimizer groups of its own among the trainable parameters `named` (name -> parameter):
        `{"name": ..., "params": [names], "lr_scale": x}` (a multiple of the run's lr) or `"lr": x`
        (absolute), and optionally `"weight_decay"`. Parameters in no group get the run's lr and weight
        decay (1-D tensors and prompts exempt). EfficientDM's per-layer rates and LoRA+ use this."""
        return []

    def weight_decay_exempt(self, name: str, param: torch.Tensor) -> bool:
        """No weight decay on 1-D tensors (biases, norms, scales, shifts) and prompts.

        A method whose `paper` recipe decays them (VPT's SGD decays prompts) overrides this.
        """
        return param.ndim <= 1 or "prompt" in name

    # -- the contract ------------------------------------------------------------------------------
    def apply(self, backbone: nn.Module) -> nn.Module:
        """Freeze the backbone, attach the method, and make exactly the declared set trainable.

        Also binds every piece to the backbone's forward context, keeps the method's own tensors in
        `param_dtype`, and records the step-0 values of tensors trained in place (for `disabled()`).
        """
        from mmpeft.core.anatomy import TokenBackbone  # local: anatomy imports modules only
        from mmpeft.core.pristine import record_originals

        if self.needs_tokens and not isinstance(backbone, TokenBackbone):
            why = f" ({backbone.token_anatomy})" if hasattr(backbone, "token_anatomy") else ""
            raise NotSupported(
                f"method {self.name!r} attaches to the token anatomy, but {type(backbone).__name__} "
                f"{getattr(backbone, 'name', '')!r} is not a TokenBackbone{why}; methods that work on any "
                f"backbone: {', '.join(list_methods(needs_tokens=False))}"
            )
        if self.needs_denoiser and getattr(backbone, "family", None) not in DENOISER_FAMILIES:
            raise NotSupported(
                f"method {self.name!r} works on a diffusion denoiser (a UNet or a DiT: backbone family "
                f"{' or '.join(map(repr, DENOISER_FAMILIES))}); {type(backbone).__name__} "
                f"{getattr(backbone, 'name', '')!r} is not one"
            )
        if self.param_dtype not in (*DTYPES, "backbone"):
            raise ValueError(f"param_dtype must be one of {[*DTYPES, 'backbone']}, got {self.param_dtype!r}")
        if getattr(backbone, "_mmpeft_method", None) is not None:
            raise RuntimeError(f"{type(backbone).__name__} already has method {backbone._mmpeft_method.name!r} applied")
        flags = [(p, p.requires_grad) for p in backbone.parameters()]
        freeze(backbone)
        try:
            self.inject(backbone)
            self._bind_pieces(backbone)
            set_trainable(backbone, self.declared_trainable(backbone))
            if not self.trains_backbone:
                record_originals(backbone, self.trained_in_place(backbone))
                bias_apart(backbone)  # a trained bias of a frozen conv: no weight gradient computed for it
        except BaseException:  # a refused method leaves the backbone as it found it
            for p in reversed(placements(backbone)):
                p.remove()
            restore_conv_forwards(backbone)
            for param, flag in flags:
                param.requires_grad_(flag)
            raise
        backbone._mmpeft_method = self
        return backbone

    def _bind_pieces(self, backbone: nn.Module) -> None:
        slot = getattr(backbone, "context_slot", None)
        host_dtype = next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32)
        dtype = host_dtype if self.param_dtype == "backbone" else DTYPES[self.param_dtype]
        for _, piece in adapter_modules(backbone):
            piece.context_slot = slot
            piece.to(dtype=dtype)
            piece.compute_dtype = dtype if dtype != host_dtype else None

    def declared_trainable(self, backbone: nn.Module) -> list[str]:
        """The declared trainable set inside the backbone: method modules + backbone tensors trained in place."""
        own = {
            f"{prefix}.{n}" if prefix else n
            for prefix, module in adapter_modules(backbone)
            for n, _ in module.named_parameters()
        }
        return sorted(own | set(self.trained_in_place(backbone)))

    def trained_in_place(self, backbone: nn.Module) -> list[str]:
        """Backbone tensors that train in place: the method's `unfrozen` ones plus those the task owns whatever
        the method (`Backbone.task_owned`: a DiT's fresh class table), one mechanism for every method."""
        return sorted(set(self.unfrozen(backbone)) | set(task_owned(backbone)))

    def can_merge(self, backbone: nn.Module) -> bool:
        """Mergeable in general, and on this backbone (e.g. SSF needs a bias on every layer it follows)."""
        return self.mergeable and not self._unmergeable_hosts(backbone)

    def _unmergeable_hosts(self, backbone: nn.Module) -> list[str]:
        return [p.host_name for p in placements(backbone) if not p.child.can_merge_into(p.host)]

    def merge(self, backbone: nn.Module) -> None:
        """Fold the method into the backbone's own tensors; its pieces become no-ops.

        One path for pieces on layers and on block sites. Everything is checked first — mergeable
        here, and every merged value finite (peft's `safe_merge`) — so a refused merge leaves the
        model untouched.
        """
        if not self.mergeable:
            raise NotMergeable(f"method {self.name!r} is not mergeable: {self._why_not_mergeable()}")
        blocked = self._unmergeable_hosts(backbone)
        if blocked:
            raise NotMergeable(f"method {self.name!r} cannot fold into {blocked[:3]} on this backbone (no bias there)")
        todo = [p for p in placements(backbone) if not p.child.merged]
        with torch.no_grad():
            for p in todo:
                for key, value in p.child.merge_updates(p.host).items():
                    if not bool(torch.isfinite(value).all()):
                        raise NotMergeable(
                            f"merging {self.name!r} would write non-finite values into {p.host_name}.{key}; nothing "
                            "was merged (the trained tensors hold inf or nan: check the learning rate or the dtype)"
                        )
            for p in todo:
                updates = p.child.merge_updates(p.host)
                # a piece that can subtract its update unmerges by subtraction, unless the host is stored in low
                # precision (bf16 frozen weights), where W + d - d is not W: there the host's values are kept
                low = any(_tensor_at(p.host, k).dtype in (torch.bfloat16, torch.float16) for k in updates)
                if low or not hasattr(p.child, "unmerge_updates"):
                    p.child._premerge = {k: _tensor_at(p.host, k).detach().clone() for k in updates}
                _write(p.host, updates)
                p.child.merged = True

    def unmerge(self, backbone: nn.Module) -> None:
        if not self.mergeable:
            raise NotMergeable(f"method {self.name!r} is not mergeable: {self._why_not_mergeable()}")
        with torch.no_grad():
            for p in placements(backbone):
                if not p.child.merged:
                    continue
                if "_premerge" in p.child.__dict__:
                    _write(p.host, p.child.__dict__.pop("_premerge"))
                else:
                    _write(p.host, p.child.unmerge_updates(p.host))
                p.child.merged = False

    def merge_and_unload(self, backbone: nn.Module) -> nn.Module:
        """Merge, then remove every piece: the result has exactly the backbone's keys (peft's name)."""
        self.merge(backbone)
        self._remove_pieces(backbone)
        return backbone

    def unload(self, backbone: nn.Module) -> nn.Module:
        """Remove every piece without merging and put tensors trained in place back to their step-0
        values: the pristine backbone again (peft's name). Full fine-tuning refuses (nothing was kept)."""
        from mmpeft.core.pristine import restore_originals

        if self.trains_backbone:
            raise NotMergeable(
                f"method {self.name!r} trains the backbone in place and keeps no copy of it; nothing to unload "
                "(use merge_and_unload() to keep the trained backbone)"
            )
        if any(p.child.merged for p in placements(backbone)):
            self.unmerge(backbone)
        restore_originals(backbone)
        self._remove_pieces(backbone)
        return backbone

    def _remove_pieces(self, backbone: nn.Module) -> None:
        from mmpeft.core.pristine import ORIGINALS

        for p in reversed(placements(backbone)):
            p.remove()
        restore_conv_forwards(backbone)
        if hasattr(backbone, ORIGINALS):
            delattr(backbone, ORIGINALS)
        leftovers = [n for n, _ in adapter_modules(backbone)]
        if leftovers:
            raise NotMergeable(f"method {self.name!r} left modules behind after unloading: {leftovers[:3]}")
        backbone._mmpeft_method = None

    def inference_params(self, backbone: nn.Module) -> int:
        """Parameters the deployed model carries beyond the backbone: 0 once merged, else the method's
        modules (MoSA overrides this with its merged dense adapter)."""
        if self.can_merge(backbone):
            return 0
        unique = {id(p): p for _, m in adapter_modules(backbone) for p in m.parameters()}
        return sum(p.numel() for p in unique.values())

    def _why_not_mergeable(self) -> str:
        return "it adds non-linear modules or tokens; it runs at inference as trained"

    def config(self) -> dict[str, Any]:
        """The method's options, its own first and the shared `param_dtype` last."""
        options = dataclasses.asdict(self)
        for shared in ("param_dtype", "head_init"):
            options[shared] = options.pop(shared)
        return options

    @classmethod
    def options(cls) -> list[dict[str, Any]]:
        """Per field, its own first and `param_dtype` last: name, type (as annotated), default (`MISSING` if
        required) and one-line help, from the field's `metadata["help"]` ("" if none)."""
        rows = []
        for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in ("param_dtype", "head_init")):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kind = f.type if isinstance(f.type, str) else f.type.__name__ if type(f.type) is type else str(f.type)
            rows.append({"name": f.name, "type": kind, "default": default, "help": f.metadata.get("help", "")})
        return rows

    @classmethod
    def preset(cls, preset: str, **overrides: Any) -> Method:
        if preset not in cls.presets and preset != "default":
            raise UnknownName(f"method {cls.name!r} has no preset {preset!r}; presets: {['default', *cls.presets]}")
        return cls(**{**cls.presets.get(preset, {}), **overrides})


def task_owned(backbone: nn.Module) -> list[str]:
    """`backbone.task_owned()` for a `Backbone`; nothing for any other module (a component's text encoder)."""
    owned = getattr(backbone, "task_owned", None)
    return list(owned()) if callable(owned) else []


def _tensor_at(host: nn.Module, key: str) -> torch.Tensor:
    owner, _, attr = key.rpartition(".")
    return getattr(host.get_submodule(owner) if owner else host, attr)


def _write(host: nn.Module, updates: dict[str, torch.Tensor]) -> None:
    for key, value in updates.items():
        target = _tensor_at(host, key)
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def apply_frozen_mode(backbone: nn.Module, training: bool, frozen_mode: str) -> None:
    """Re-apply the frozen-mode policy after a train/eval switch.

    Frozen BatchNorm layers always run in eval mode so their statistics stay bit-identical; with
    `frozen_mode="eval"` the whole frozen backbone does, and only method modules and the layers that train whole
    (the tensors a backbone owns for its task, e.g. Any2Point's tokenizer) follow `training`.
    """
    if frozen_mode not in FROZEN_MODES:
        raise ValueError(f"frozen_mode must be one of {FROZEN_MODES}, got {frozen_mode!r}")
    if not training:
        backbone.eval()
        return
    if frozen_mode == "eval":
        backbone.eval()
        for _, module in adapter_modules(backbone):
            module.train(True)
        for module in backbone.modules():  # layers that train whole (a backbone's own tokenizer) are not frozen
            own = list(module.parameters(recurse=False))
            if own and all(p.requires_grad for p in own):
                module.training = True
        return
    backbone.train(True)
    for module in backbone.modules():
        if isinstance(module, _BatchNorm) and not all(p.requires_grad for p in module.parameters(recurse=False)):
            module.eval()
            for _, piece in adapter_modules(module):  # a piece attached to a frozen BatchNorm still trains
                piece.train(True)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is taken by {METHODS[cls.name].__qualname__}")
    if cls.frozen_mode not in FROZEN_MODES:
        raise ValueError(f"{cls.__name__}.frozen_mode must be one of {FROZEN_MODES}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    key = name.lower()
    if key not in METHODS:
        close = difflib.get_close_matches(key, METHODS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownName(f"unknown method {name!r}{hint} Registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def create_method(name: str, preset: str = "default", **overrides: Any) -> Method:
    """`create_method("lora", r=16)`, or `create_method("lora", preset="paper")`."""
    cls = get_method(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise UnknownName(f"method {name!r} has no option(s) {sorted(unknown)}; options: {sorted(fields)}")
    return cls.preset(preset, **overrides)


def method_from_spec(spec: Method | str | dict[str, Any] | None) -> Method:
    """A method from its YAML / command-line spelling.

    `"lora"`, `{"name": "lora", "r": 16}` or `{"name": "ssf", "preset": "paper"}`; None is the linear probe.
    """
    if isinstance(spec, Method):
        return spec
    if spec is None:
        return create_method("linear")
    if isinstance(spec, str):
        return create_method(spec)
    if not isinstance(spec, dict) or "name" not in spec:
        raise UnknownName(
            f"a method is a name or a mapping with a 'name' key (e.g. {{name: lora, r: 8}}), got {spec!r}"
        )
    options = dict(spec)
    name, preset = options.pop("name"), options.pop("preset", "default")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return create_method(name, preset=preset, **options)


def list_methods(needs_tokens: bool | None = None) -> list[str]:
    """Every registered method; `needs_tokens=True`: those on the token anatomy; `needs_tokens=False`: those that
    run on any backbone (neither the token anatomy, point geometry nor a denoiser's schedule)."""
    if needs_tokens is None:
        return sorted(METHODS)
    if needs_tokens:
        return sorted(n for n, c in METHODS.items() if c.needs_tokens)
    return sorted(n for n, c in METHODS.items() if not (c.needs_tokens or c.needs_points or c.needs_denoiser))


def method_from_config(config: dict[str, Any]) -> Method:
    """Inverse of `{"name": m.name, "config": m.config()}` as stored in adapter files."""
    cls = get_method(config["name"])
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.get("config", {}).items()}
    return cls(**kwargs)
