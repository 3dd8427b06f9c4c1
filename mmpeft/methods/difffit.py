"""DiffFit (Xie et al., "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple
Parameter-Efficient Fine-Tuning", ICCV 2023, arXiv 2304.06648)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from mmpeft.core.anatomy import TokenBackbone
from mmpeft.core.errors import NotMergeable, NotSupported
from mmpeft.core.inject import attach, find_modules, placements
from mmpeft.core.method import Method, register_method, task_owned
from mmpeft.core.modules import AdapterModule, adapter_modules, linear_then_scale

__all__ = ["DiffFit", "BranchScale", "NormAffine", "POSITIONS"]

POSITIONS = ("branch", "qkv", "proj")
BLOCK_RANGES = ("first_half", "all")
NORMS = (nn.LayerNorm, nn.GroupNorm)  # by type: in diffusers' DiT the name "norm" also matches `norm1.linear`
CLASS_TABLE = "class_embedder.embedding_table.weight"  # a diffusers DiT's class table (the original's `y_embedder`)


class BranchScale(AdapterModule):
    """Per-channel scales γ (init 1) on a layer's output: `y * prod(gamma_<position>)`.

    One piece per layer, with one γ vector per DiffFit position that scales this layer (the attention output
    projection carries both the branch γ and the out-projection γ; only their product acts). Merges into the
    layer: W' = diag(γ) W, b' = γ b (no bias needed: a pure scale)."""

    def __init__(self, width: int, positions: tuple[str, ...], channel_dim: int = -1, device=None, dtype=None):
        super().__init__()
        self.positions = tuple(positions)
        self.channel_dim = channel_dim
        for position in self.positions:
            self.register_parameter(f"gamma_{position}", nn.Parameter(torch.ones(width, device=device, dtype=dtype)))

    def scale(self) -> torch.Tensor:
        gammas = [getattr(self, f"gamma_{p}") for p in self.positions]
        out = gammas[0]
        for gamma in gammas[1:]:
            out = out * gamma
        return out

    def forward(self, y: torch.Tensor | nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(y, nn.Module):  # attached with where="replace" on an nn.Linear: keep no input of its own
            return linear_then_scale(y, x, self.scale())
        shape = (-1,) if self.channel_dim == -1 else (-1,) + (1,) * (y.dim() - 2)
        return y * self.scale().view(shape)

    def can_merge_into(self, host: nn.Module) -> bool:
        return getattr(host, "weight", None) is not None

    def merge_updates(self, host: nn.Module) -> dict[str, torch.Tensor]:
        if not self.can_merge_into(host):
            raise NotMergeable(f"{type(host).__name__} has no weight to fold a scale into")
        g = self.scale().float()
        weight = host.weight.float() * g.view((-1,) + (1,) * (host.weight.dim() - 1))
        updates = {"weight": weight.to(host.weight.dtype)}
        if getattr(host, "bias", None) is not None:
            updates["bias"] = (host.bias.float() * g).to(host.bias.dtype)
        return updates


class Fold(NamedTuple):
    """Where an added LayerNorm affine folds: the adaLN modulation Linear that makes the (shift, scale) this
    LayerNorm's output is modulated with, as chunk indices of its output (`norm(x) * (1 + scale) + shift`)."""

    linear: nn.Linear
    shift: int
    scale: int
    chunks: int


class NormAffine(AdapterModule):
    """`y * weight + bias` (init 1 and 0: the identity) after a LayerNorm without an affine of its own (the
    DiT's `elementwise_affine=False` norms), on the last dimension.

    It cannot fold into its LayerNorm (which has no tensors to write); on a DiT it folds exactly into the
    adaLN modulation that follows (`DiffFit.merge`, see `fold_rows`). `fold` is None where no such
    modulation is known, and merging then refuses."""

    def __init__(self, width: int, fold: Fold | None = None, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(width, device=device, dtype=dtype))
        self.fold = fold  # a tuple, so the modulation Linear is not registered as a child (one name per tensor)

    def forward(self, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return y * self.weight + self.bias

    def can_merge_into(self, host: nn.Module) -> bool:
        return self.fold is not None and self.fold.linear.bias is not None

    def merge_updates(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """Nothing in the LayerNorm itself: `DiffFit.merge` writes `fold_rows()` into the modulation Linear."""
        if not self.can_merge_into(host):
            raise NotMergeable(_no_fold(host))
        return {}

    def fold_rows(self) -> list[tuple[str, slice, torch.Tensor]]:
        """New (tensor, rows, values) of the modulation Linear.

        With the affine (w, b) after the LayerNorm, the modulated output is
            (LN(x) w + b)(1 + s) + h = LN(x) (1 + s') + h',   s' = w (1 + s) - 1,   h' = h + b (1 + s),
        and s = W_s e + c_s, h = W_h e + c_h are affine in the same conditioning e (per sample, but the map
        is shared), so s' and h' are too:
            W_s' = diag(w) W_s,          c_s' = w (1 + c_s) - 1,
            W_h' = W_h + diag(b) W_s,    c_h' = c_h + b (1 + c_s).
        Exact (in real arithmetic) for every sample, timestep and class; it needs the Linear's bias."""
        lin, shift, scale, chunks = self.fold
        d = lin.out_features // chunks
        rows_s, rows_h = slice(scale * d, (scale + 1) * d), slice(shift * d, (shift + 1) * d)
        w, b = self.weight.float(), self.bias.float()
        ws, cs = lin.weight[rows_s].float(), lin.bias[rows_s].float()
        wh, ch = lin.weight[rows_h].float(), lin.bias[rows_h].float()
        wdt, bdt = lin.weight.dtype, lin.bias.dtype
        return [
            ("weight", rows_s, (w[:, None] * ws).to(wdt)),
            ("bias", rows_s, (w * (1 + cs) - 1).to(bdt)),
            ("weight", rows_h, (wh + b[:, None] * ws).to(wdt)),
            ("bias", rows_h, (ch + b * (1 + cs)).to(bdt)),
        ]


def _no_fold(host: nn.Module) -> str:
    return (
        f"the affine DiffFit adds after a {type(host).__name__} without one folds only into a following adaLN "
        "modulation (a diffusers DiT's norm1.norm, norm3, norm_out); none is known here, and the LayerNorm has no "
        "tensors to write it into; use ln_affine=False for a mergeable DiffFit on this backbone"
    )


def _dit_folds(backbone: nn.Module) -> dict[int, Fold]:
    """id(LayerNorm) -> its modulation, for every non-affine LayerNorm of a diffusers DiT (adaLN-Zero)."""
    model = getattr(backbone, "model", backbone)
    if type(model).__name__ != "DiTTransformer2DModel":
        return {}
    folds = {}
    for block in model.transformer_blocks:
        norm1 = block.norm1
        if type(norm1).__name__ != "AdaLayerNormZero" or getattr(block, "norm_type", None) != "ada_norm_zero":
            continue
        # AdaLayerNormZero's 6 chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        folds[id(norm1.norm)] = Fold(norm1.linear, 0, 1, 6)
        if isinstance(getattr(block, "norm3", None), nn.LayerNorm):
            folds[id(block.norm3)] = Fold(norm1.linear, 3, 4, 6)
    folds[id(model.norm_out)] = Fold(model.proj_out_1, 0, 1, 2)  # final layer: shift, scale = chunk(2)
    return folds


def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformer blocks, in order: a token backbone's blocks, else diffusers' `BasicTransformerBlock`s
    (a DiT's 28; a UNet's 16, down / up / mid in module order)."""
    if isinstance(backbone, TokenBackbone):
        return list(backbone.blocks)
    return [m for _, m in backbone.named_modules() if type(m).__name__ == "BasicTransformerBlock"]


def _block_layers(block: nn.Module, position: str) -> list[nn.Module]:
    """The layers whose output a position scales in one block."""
    if hasattr(block, "site"):  # token anatomy: fused qkv, proj, mlp.fc1 / fc2
        return {
            "qkv": [block.attn.qkv],
            "branch": [block.attn.proj, block.mlp.fc2],  # = the attn.branch / mlp.branch sites, before LayerScale
            "proj": [block.attn.proj],
        }[position]
    attns = [a for a in (getattr(block, "attn1", None), getattr(block, "attn2", None)) if a is not None]
    if position == "qkv":
        return [layer for a in attns for layer in (a.to_q, a.to_k, a.to_v)]
    if position == "proj":
        return [a.to_out[0] for a in attns]
    ff = [m for m in block.ff.net if isinstance(m, nn.Linear)] if getattr(block, "ff", None) is not None else []
    return [a.to_out[0] for a in attns] + ff[-1:]


def _width(layer: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.out_features, -1
    if isinstance(layer, _ConvNd):
        return layer.out_channels, 1
    raise NotSupported(f"DiffFit scales linear and convolution outputs; {name!r} is a {type(layer).__name__}")


@register_method
@dataclass
class DiffFit(Method):
    """DiffFit (Xie et al., ICCV 2023, arXiv 2304.06648): biases, norms, the class table and per-channel scales γ
    (init 1) on the residual branches of the shallow blocks.

    What trains (the official name filter `bias` / `norm` / `gamma` / `y_embed`, by type here):
      - every bias (timestep-MLP, adaLN-modulation, patch-embedding and final-layer biases included);
      - the weight and bias of every LayerNorm / GroupNorm (selected by type: in diffusers' DiT the name "norm"
        also matches `norm1.linear`, the adaLN modulation, which the paper does not train);
      - `ln_affine`: DiT's LayerNorms have no affine (`elementwise_affine=False`), so DiffFit adds one (weight 1,
        bias 0: identity at init) after each of the 57 of DiT-XL/2; only with it does mmpeft's reconstruction
        of the paper's "0.83M" (835,232, below) come near it;
      - the pretrained class table (diffusers' `class_embedder.embedding_table`, the original `y_embedder`),
        as the paper tunes it; a table re-created for a new dataset (`DiffusersDiT(num_classes=K)`: K+1 rows with
        the CFG null row) is the task's and trains under every method (`Backbone.task_owned`, added by the core),
        so `class_table` only decides the pretrained one;
      - γ, one per output channel, init 1, in the blocks `blocks` (default: the first half, the paper's
        blocks 1-14 of 28; every block on a UNet), at `positions`:
          branch: the attention output projection and the MLP's last Linear (γ1, γ2: DiT's gated residual
            branches, x + γ ⊙ gate ⊙ Attn(·); gate and γ are both per channel, so γ on the branch's last
            Linear is the same thing); on a UNet block, after attn1.to_out.0, attn2.to_out.0 and ff.net.2;
          qkv: the q, k and v projections (3·d: the fused qkv of the thuml reproduction; diffusers has
            separate to_q / to_k / to_v, one γ on each output);
          proj: the attention output projection again (thuml's out-projection γ). It acts on the same
            channels as γ1, so only the product γ1·γ_proj matters: redundant, kept for the parameter count
            (6·d per block = 6,912 on DiT-XL: γ1 + γ2 + qkv + out-proj).
        `resnets` adds γ on each UNet ResNet's conv2 output (its residual branch, before the skip add).
        `targets` (module-name patterns) replaces the block layout with γ after exactly those layers.

    Counts (tests assert them, meta device): DiT-XL/2 with tied embeddings (`DiffusersDiT`'s default), a
    Food-101 table (102 rows) and the `paper` preset: bias 489,632 + table 117,504 + LN affine 131,328 +
    γ 96,768 = 835,232. That is mmpeft's reconstruction of the paper's "0.83M (0.12%)", not the paper's own
    breakdown (which has not been read): 835,232 rounds to 0.84M, not 0.83M; the released code's layout, whose
    LayerNorms have no affine (`ln_affine=False`), gives 703,904 (0.70M). SD1.5 with `sd`: bias 343,684 + norm
    weights 100,160 + γ 37,440 + ResNet γ 20,160 = 501,444 (481,284 with resnets=False). On an untied diffusers
    DiT every block's class table and timestep biases train separately (28 copies), and a warning says so.

    On token backbones DiffFit is BitFit plus the LayerNorm affines plus γ on the same layers (attn.qkv,
    attn.proj, mlp.fc2; the branch γ is the `attn.branch` / `mlp.branch` site scaled before LayerScale). On
    backbones without transformer blocks (timm convnets) there is no γ position unless `targets` names layers:
    DiffFit is then biases + LayerNorm / GroupNorm affines. BatchNorm affines are not trained (their
    statistics would start updating).

    Recipe: lr 1e-3, ten times DiT's pretraining lr (the paper's rule; mkshing's SD default is the same,
    constant, 500 steps), AdamW without weight decay, the DiT loss unchanged; set it in the run config. γ is
    a hook on the Linear, so it survives attention-backend switches; it does not see diffusers' fused qkv
    (`fuse_qkv_projections`), which would bypass to_q / to_k / to_v.

    Identity at init (γ = 1, added affine = (1, 0)). Merge: every γ folds into the layer it follows
    (W' = diag(γ) W, b' = γ b), and every added LayerNorm affine into the adaLN shift / scale rows of the
    modulation Linear that follows it (`NormAffine.fold_rows`: exact, since shift and scale are affine in the
    conditioning embedding); the merged model is the backbone's own architecture. Where an added affine has
    no known modulation to fold into (a non-affine LayerNorm outside a DiT), merge refuses and says so.
    Memory (`lean_memory`, default on; recipe unchanged): γ after an `nn.Linear` runs the linear itself, scales
    its fresh output in place and keeps that output for γ's gradient (`core.modules.linear_then_scale`), which
    attention keeps anyway after q, k, v; γ after a convolution keeps its input, as a plain hook would.
    Necessary cost: γ's gradient is sum_n g_n ⊙ y_n, so a step keeps y [N, out] per γ'd layer (free after q, k,
    v; one [N, d] on the out-projection and the MLP's last linear of each γ'd block); biases' gradients are sums
    of g (nothing kept; a frozen convolution's bias is added after it, `core.conv_bias`, so no weight gradient
    is computed for it) and the norm affines' use the normalised input their norm keeps anyway.
    `disabled()` runs the pristine denoiser (biases, norms and the class table are trained in place; their
    step-0 values are kept).
    """

    name: ClassVar[str] = "difffit"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    presets: ClassVar[dict] = {
        # DiT-XL/2 + Food-101 table: 835,232, mmpeft's reconstruction of the paper's "0.83M" (see the docstring)
        "paper": {"blocks": "first_half", "positions": POSITIONS, "ln_affine": True},
        "sd": {"blocks": "all", "positions": ("branch",), "resnets": True},  # SD1.5 UNet: 501,444
    }

    blocks: tuple[int, int] | str | None = field(
        default=None,
        metadata={
            "help": (
                'transformer blocks with γ: "first_half", "all", or [start, stop) 0-based (the paper\'s blocks '
                "1-14 of 28 = [0, 14]); unset: the first half, every block on a UNet"
            )
        },
    )
    positions: tuple[str, ...] = field(
        default=POSITIONS,
        metadata={
            "help": (
                "where γ goes in a block, a subset of [branch, qkv, proj]: branch = attention output and MLP "
                "output (γ1, γ2), qkv = q, k, v projections, proj = attention output again (redundant with γ1)"
            )
        },
    )
    resnets: bool = field(
        default=False, metadata={"help": "UNet: also a γ on every ResNet's conv2 output (its residual branch)"}
    )
    ln_affine: bool = field(
        default=True,
        metadata={
            "help": (
                "add weight 1 / bias 0 after every LayerNorm that has no affine (DiT), trained; folds into "
                "the adaLN modulation when merging"
            )
        },
    )
    norms: bool = field(
        default=True, metadata={"help": "train the weight and bias of every LayerNorm / GroupNorm (by type)"}
    )
    biases: bool = field(default=True, metadata={"help": "train every bias of the backbone"})
    class_table: bool = field(
        default=True,
        metadata={
            "help": (
                "train the DiT's pretrained class embedding table (y_embed); a fresh table for a new dataset "
                "(the backbone's num_classes) trains under every method anyway"
            )
        },
    )
    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": (
                "module-name patterns (globs) of the layers γ follows, each must match; replaces blocks / "
                "positions / resnets; unset: the block layout"
            )
        },
    )
    lean_memory: bool = field(
        default=True,
        metadata={
            "help": (
                "γ on a linear scales the linear's output in place and keeps that output for its gradient "
                "(no activation of its own; same function and gradients up to rounding); false: keep the pre-scale "
                "input"
            )
        },
    )

    def __post_init__(self) -> None:
        unknown = set(self.positions) - set(POSITIONS)
        if unknown:
            raise ValueError(f"DiffFit positions must be a subset of {list(POSITIONS)}, got {sorted(unknown)}")
        if isinstance(self.blocks, str) and self.blocks not in BLOCK_RANGES:
            raise ValueError(f'DiffFit blocks: "first_half", "all" or [start, stop), got {self.blocks!r}')
        if self.blocks is not None and not isinstance(self.blocks, str):
            if len(self.blocks) != 2 or not 0 <= self.blocks[0] < self.blocks[1]:
                raise ValueError(f"DiffFit blocks [start, stop) needs 0 <= start < stop, got {list(self.blocks)}")
        if self.targets is not None and not self.targets:
            raise ValueError("DiffFit targets is empty; leave it unset for the block layout")

    # -- what trains -------------------------------------------------------------------------------------
    def block_range(self, backbone: nn.Module, n: int) -> range:
        spec = self.blocks
        if spec is None:
            spec = "all" if getattr(backbone, "family", None) == "unet" else "first_half"
        if spec == "all":
            return range(n)
        if spec == "first_half":
            return range(max(1, n // 2) if n else 0)
        start, stop = spec
        if stop > n:
            raise ValueError(f"DiffFit blocks [{start}, {stop}) but {type(backbone).__name__} has {n} blocks")
        return range(start, stop)

    def gamma_layers(self, backbone: nn.Module) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
        """(name, layer, positions) for every layer γ follows, in module order."""
        names = {id(m): n for n, m in backbone.named_modules()}
        wanted: dict[int, list[str]] = {}
        layers: dict[int, nn.Module] = {}

        def add(layer: nn.Module, position: str) -> None:
            layers[id(layer)] = layer
            wanted.setdefault(id(layer), [])
            if position not in wanted[id(layer)]:
                wanted[id(layer)].append(position)

        if self.targets is not None:
            for _, layer in find_modules(backbone, self.targets):
                add(layer, "target")
        else:
            blocks = _blocks(backbone)
            for i in self.block_range(backbone, len(blocks)):
                for position in POSITIONS:  # fixed order: gamma_branch before gamma_proj on a shared layer
                    if position in self.positions:
                        for layer in _block_layers(blocks[i], position):
                            add(layer, position)
            if self.resnets:
                resnets = [m for m in backbone.modules() if type(m).__name__ == "ResnetBlock2D"]
                if not resnets:
                    raise NotSupported(
                        f"DiffFit resnets=True, but {type(backbone).__name__} {getattr(backbone, 'name', '')!r} "
                        "has no diffusers ResnetBlock2D (a UNet's); use resnets=False"
                    )
                for block in resnets:
                    add(block.conv2, "resnet")
        order = {id(m): i for i, (_, m) in enumerate(backbone.named_modules())}
        return [(names[k], layers[k], tuple(wanted[k])) for k in sorted(wanted, key=order.__getitem__)]

    def inject(self, backbone: nn.Module) -> None:
        for name, layer, positions in self.gamma_layers(backbone):
            width, channel_dim = _width(layer, name)
            piece = BranchScale(width, positions, channel_dim, device=layer.weight.device)
            lean = self.lean_memory and type(layer) is nn.Linear
            attach(layer, "difffit", piece, where="replace" if lean else "output")
        if self.ln_affine:
            folds = _dit_folds(backbone)
            for module in list(backbone.modules()):
                if isinstance(module, nn.LayerNorm) and module.weight is None and module.bias is None:
                    fold = folds.get(id(module))
                    device = fold.linear.weight.device if fold is not None else _device(backbone)
                    attach(module, "difffit", NormAffine(module.normalized_shape[-1], fold, device=device))
        tables = [n for n, _ in backbone.named_parameters() if n.endswith(CLASS_TABLE)]
        if self.class_table and len(tables) > 1:
            warnings.warn(
                f"DiffFit trains {len(tables)} separate class tables (and timestep-MLP biases) on this untied "
                "diffusers DiT, one per block, where the paper trains one. DiffusersDiT ties the copies by default "
                "when they are equal (a converted checkpoint, or a model built from a config); this one was built "
                "with tie_embeddings=False or its copies differ, and tying would then change the model",
                stacklevel=3,
            )

    def unfrozen(self, backbone: nn.Module) -> list[str]:
        own = tuple(f"{prefix}." for prefix, _ in adapter_modules(backbone))
        params = [n for n, _ in backbone.named_parameters() if not n.startswith(own)]
        names = set()
        if self.biases:
            names |= {n for n in params if "bias" in n.rsplit(".", 1)[-1]}
        if self.norms:
            for mod_name, module in backbone.named_modules():
                if isinstance(module, NORMS) and not f"{mod_name}.".startswith(own):
                    names |= {f"{mod_name}.{n}" for n, _ in module.named_parameters(recurse=False)}
        if self.class_table:  # a fresh table is the task's: the core adds it (Method.trained_in_place)
            names |= {n for n in params if n.endswith(CLASS_TABLE)} - set(task_owned(backbone))
        return sorted(names)

    # -- merge: γ through the core's path, added LayerNorm affines into the modulation that follows ---------
    def merge(self, backbone: nn.Module) -> None:
        pending = [p for p in placements(backbone) if isinstance(p.child, NormAffine) and not p.child.merged]
        blocked = [p.host_name for p in pending if not p.child.can_merge_into(p.host)]
        if blocked:
            raise NotMergeable(f"DiffFit cannot merge at {blocked[:3]}: {_no_fold(pending[0].host)}")
        if not all(bool(torch.isfinite(t).all()) for p in pending for t in (p.child.weight, p.child.bias)):
            raise NotMergeable(
                "merging 'difffit' would write non-finite values into the adaLN modulation; nothing was merged (an "
                "added LayerNorm affine holds inf or nan: check the learning rate or the dtype)"
            )
        super().merge(backbone)  # γ into its layers; NormAffine pieces write nothing into their LayerNorms
        folds = [(p.child, p.child.fold_rows()) for p in pending]  # after γ: a `targets` γ may sit on the Linear
        if not all(bool(torch.isfinite(value).all()) for _, rows in folds for _, _, value in rows):
            super().unmerge(backbone)
            raise NotMergeable(
                "merging 'difffit' would write non-finite values into the adaLN modulation rows; nothing was merged"
            )
        with torch.no_grad():
            for piece, rows in folds:  # the pieces of one Linear touch disjoint rows
                linear = piece.fold.linear
                piece._rows_before = [(attr, sl, getattr(linear, attr)[sl].detach().clone()) for attr, sl, _ in rows]
                for attr, sl, value in rows:
                    getattr(linear, attr)[sl].copy_(value)

    def unmerge(self, backbone: nn.Module) -> None:
        with torch.no_grad():
            for p in placements(backbone):
                if isinstance(p.child, NormAffine) and p.child.merged:
                    for attr, sl, value in p.child.__dict__.pop("_rows_before"):
                        getattr(p.child.fold.linear, attr)[sl].copy_(value)
        super().unmerge(backbone)


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
