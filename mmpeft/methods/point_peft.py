"""Point-PEFT (Tang et al., "Point-PEFT: Parameter-Efficient Fine-Tuning for 3D Pre-trained Models", AAAI 2024,
arXiv 2310.03059; code Ivan-Tang-3D/Point-PEFT, `MAE/models/Point_Mask_Rev_FT_scan_cp.py`).

Three parts on a frozen Point-MAE / Point-BERT transformer:

- **Point-prior prompts** in the first L blocks: per sample, the frozen pretrained encoder in its query form
  (`PointTransformer.query_features`, run through `disabled()`, so no second copy of the weights exists) gives a
  feature f; a parameter-free retrieval from a memory bank of training-set features (cosine top-K on normalised
  sides, softmax weights) gives [f, prior, the K retrieved] (K + 2 tokens); each prompted block adds its own
  residual bottleneck of that to its learnable tokens and inserts them after `[cls]` without a positional term,
  and drops them at the block's end. The bank is derived state (`mmpeft.methods.point_bank`), never in the
  adapter file, which names the bank file and its checksum.
- **The geometry-aware adapter** at the end of every block: FPS picks sub-centres among the token centres (the
  prompts' centres are the learnable `prompt_cor` points), kNN groups the tokens around them, a small local
  attention shared by all blocks runs inside each group, max-pool, a per-block BatchNorm and GELU, plus the
  sub-centre's own token; the result is propagated back to every patch token with inverse-squared-distance
  weights over all sub-centres, then a residual bottleneck runs on every token (cls and prompts included).
- **A parallel adapter on the FFN output** (x + h + (0.7 + gate)·A(h)), and BitFit-style backbone tensors: the
  biases of the attention projection, fc1 / fc2 and both LayerNorms, the cls token and position, the final norm.

Not copied from the official code:
- the grouping index bug of the prompted blocks (indices from FPS over the *input points* plus `prompt_cor`, read
  from a 138-token tensor with a 128-token batch offset, so groups read other samples' rows for B > 1): the token
  centres (patches and prompts) are grouped, the intent;
- the radius-1.28 attention mask, computed and never applied: not computed;
- the hard-coded 0.3 / 0.3 / 0.7 coefficients: options, the official values in the `paper` preset;
- the per-batch rotation of the "-aug" runs: a data option, not the method's;
- frozen BatchNorms drifting in train mode: the mini-PointNet's stay in eval (the core's frozen-mode policy);
- `ad_gate`, created and trained but never read by the official MAE model: here it offsets the FFN adapter's
  scale (0.7 + gate, zero at init), so it has a use and the official forward is unchanged at init;
- no zero-init anywhere: mmpeft's default zero-initialises every up projection (the adapters' and the local
  attention's output) and learns the propagation and centre coefficients from zero; `paper` keeps the official
  Xavier inits (bias N(0, 1e-6)) and fixed coefficients.

Deviations kept: the FFN adapter reads the MLP output before drop-path (the official code reads it after; the same
in evaluation), and the local attention has no drop-path. Identity at init: no. The inserted prompts change every
token's attention even when zero (softmax renormalises over them), and their content holds the retrieved features;
gating them faithfully would change the method, so Point-PEFT declares it is not the identity at init.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.anatomy import ForwardContext, TokenBackbone
from mmpeft.core.errors import MmpeftError, NotSupported
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import AdapterModule, Bottleneck, LocalAttention, context_dropout_mask
from mmpeft.methods.point_bank import BankMismatch

__all__ = ["PointPEFT", "BankMissing", "BankMismatch", "retrieve", "PROMPTS"]

PROMPTS = "point_prompts"  # the token group of the inserted prompts
INITS = ("zero", "official")
STAND_IN_BANK = 11_392  # the official bank of ScanObjectNN PB_T50_RS (356 batches of 32)


class BankMissing(MmpeftError):
    """Point-PEFT's prompts need the memory bank, and none is attached."""


def retrieve(query: torch.Tensor, bank: torch.Tensor, k: int, bank_unit: torch.Tensor | None = None) -> torch.Tensor:
    """Point-PEFT's parameter-free retrieval: the cache prompt [B, k + 2, D] = [query, prior, the k retrieved],
    where the k bank rows [M, D] nearest the query [B, D] in cosine similarity (both sides normalised) are
    weighted by the softmax of their similarities (temperature 1) into the prior. `bank_unit`: the bank's rows
    already normalised (kept with the bank, so a training step does not normalise 11,392 rows again)."""
    if k > bank.shape[0]:
        raise ValueError(f"top_k={k} but the memory bank holds {bank.shape[0]} features")
    unit = bank_unit if bank_unit is not None else F.normalize(bank, dim=-1)
    scores = F.normalize(query, dim=-1) @ unit.T
    top, index = scores.topk(k, dim=-1)
    retrieved = bank[index]  # [B, k, D]
    prior = (top.softmax(-1).unsqueeze(1) @ retrieved).squeeze(1)
    return torch.cat([query.unsqueeze(1), prior.unsqueeze(1), retrieved], dim=1)


def _bottleneck(dim: int, hidden: int, dropout: float, init: str, device) -> Bottleneck:
    return Bottleneck(dim, hidden, activation="quick_gelu", dropout=dropout,
                      init="xavier" if init == "official" else "zero_up", device=device)  # fmt: skip


class PointPriorPrompts(AdapterModule):
    """Hook on `before_block[i]` of a prompted block: its learnable tokens (plus, with the bank, its residual
    bottleneck of the cache prompt) inserted after `[cls]`. Block 0's hook also owns `prompt_cor`, the bank and the
    query: it computes the cache prompt once per forward and leaves it in the context's draws."""

    def __init__(self, length: int, dim: int, hidden: int, dropout: float, init: str, root: PointPriorPrompts | None,
                 device=None):  # fmt: skip
        super().__init__()
        self.dropout = dropout
        self.prompts = nn.Parameter(torch.zeros(length, dim, device=device))
        self.cache_adapter = _bottleneck(dim, hidden, dropout, init, device)
        if root is None:  # block 0's: the shared state
            self.prompt_cor = nn.Parameter(torch.zeros(length, 3, device=device))
            self.register_derived("bank", torch.zeros(0, dim, device=device))
            self.register_derived("bank_unit", torch.zeros(0, dim, device=device))  # its rows normalised
        else:
            object.__setattr__(self, "_root", root)
        if self.prompts.device.type != "meta":
            nn.init.trunc_normal_(self.prompts, std=0.02)
            if root is None:
                nn.init.trunc_normal_(self.prompt_cor, std=0.02)

    @property
    def root(self) -> PointPriorPrompts:
        return getattr(self, "_root", self)

    def cache_prompt(self, ctx: ForwardContext) -> torch.Tensor:
        """[f, prior, retrieved] of this forward's clouds (computed by block 0's hook, then shared)."""
        if "point_peft.cache" not in ctx.draws:
            root = self.root
            if root.bank.shape[0] == 0:
                raise BankMissing(
                    "Point-PEFT retrieves its prompts from a memory bank of training-set features, and none is "
                    "attached: `mmpeft fit` builds it before training (cached), `mmpeft bank -c CONFIG` builds it "
                    "alone; in Python, PointPEFT.attach_bank(backbone, bank)"
                )
            ctx.draws["point_peft.cache"] = retrieve(root.query(ctx), root.bank, self.prompts.shape[0] - 2,
                                                     root.bank_unit)  # fmt: skip
        return ctx.draws["point_peft.cache"]

    def query(self, ctx: ForwardContext) -> torch.Tensor:
        """f: the pristine pretrained encoder's feature of each cloud (`query_features` runs through `disabled()`)."""
        return self._backbone.query_features(ctx.xyz, *self._query_grouping).to(self.bank.dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        b = x.shape[0]
        prompts = self.prompts.expand(b, -1, -1)
        if self.training and self.dropout > 0:
            prompts = prompts * context_dropout_mask(ctx, f"point_peft.prompts.{index}", prompts.shape, self.dropout,
                                                     prompts)  # fmt: skip
        cache = self.cache_prompt(ctx).to(prompts.dtype)
        prompts = prompts + cache + self.cache_adapter(cache)
        centres = self.root.prompt_cor.to(x.dtype).expand(b, -1, -1)
        return ctx.insert(x, prompts, PROMPTS, ctx.span("cls").stop, meta={"centres": centres})


class PromptRemoval(AdapterModule):
    """Hook on `block.out` of a prompted block, after its geometric adapter: the prompts' outputs are dropped."""

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return ctx.remove(x, PROMPTS) if PROMPTS in ctx.layout else x


def grouping_key(ctx: ForwardContext) -> str:
    return f"point_peft.grouping.{ctx.token_meta['centres'].shape[1]}"


class Grouping(AdapterModule):
    """Hook on `before_block[i]`, after any prompt insertion: the geometric adapter's (sub-centre indices, kNN
    groups, propagation weights) of this forward's token centres. The centres do not change between blocks (the
    patches keep theirs, the prompts have `prompt_cor`), so all blocks with the same tokens share one FPS + kNN (the
    official code groups again in every block); made here, outside a checkpointed block, so a recompute sees it."""

    def __init__(self, sub_centres: int, group_size: int):
        super().__init__()
        self.sub_centres, self.group_size = sub_centres, group_size

    def forward(self, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        from mmpeft.ops.point import farthest_point_sample, gather_points, inverse_distance_weights, knn

        key = grouping_key(ctx)
        if key not in ctx.draws:
            centres = ctx.token_meta["centres"]
            points = centres[:, ctx.span("cls").stop :]
            n = points.shape[1]
            sub = farthest_point_sample(points, min(self.sub_centres, n))
            sub_xyz = gather_points(points, sub)
            weights = inverse_distance_weights(centres[:, ctx.span("patches")], sub_xyz)
            ctx.draws[key] = (sub, knn(sub_xyz, points, min(self.group_size, n)), weights)
        return x


class GeometricAdapter(AdapterModule):
    """Hook on `block.out` of every block (see the module docstring); its groups come from `Grouping`. Block 0's owns
    the shared local attention."""

    def __init__(self, dim: int, hidden: int, dropout: float, centre_coef: float, propagate_coef: float, init: str,
                 shared: LocalAttention | None, inner: int, heads: int, device=None):  # fmt: skip
        super().__init__()
        if shared is None:
            self.local = LocalAttention(dim, inner, heads, zero_out=init == "zero", device=device)
        else:
            object.__setattr__(self, "_local", shared)
        self.pool_norm = nn.BatchNorm1d(dim, device=device)
        self.adapter = _bottleneck(dim, hidden, dropout, init, device)
        if init == "zero":  # learnt from zero, so the geometric path starts switched off yet receives gradients
            self.centre_coef = nn.Parameter(torch.zeros((), device=device))
            self.propagate_coef = nn.Parameter(torch.zeros((), device=device))
        else:
            self.centre_coef, self.propagate_coef = centre_coef, propagate_coef

    @property
    def shared(self) -> LocalAttention:
        return getattr(self, "_local", None) or self.local

    def forward(self, z: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        from mmpeft.ops.point import gather_points

        cls = ctx.span("cls")
        tokens = z[:, cls.stop :]  # prompts (centres: prompt_cor) and patches, after [cls]
        b, n, d = tokens.shape
        sub, neighbours, weights = ctx.draws[grouping_key(ctx)]  # made before the block by `Grouping`
        groups = gather_points(tokens, neighbours)  # [B, S, k, D]
        s, k = groups.shape[1:3]
        pooled = self.shared(groups.reshape(b * s, k, d)).max(dim=1).values  # [B*S, D]
        pooled = F.gelu(self.pool_norm(pooled)).reshape(b, s, d) + self.centre_coef * gather_points(tokens, sub)
        patches = ctx.span("patches")
        update = torch.zeros_like(z)
        update[:, patches] = self.propagate_coef * (weights.to(pooled.dtype) @ pooled)
        z = z + update
        return z + self.adapter(z)


class FFNAdapter(AdapterModule):
    """Hook on `mlp.branch`: m + (scale + gate)·A(m), A a bottleneck without its own residual."""

    def __init__(self, dim: int, hidden: int, dropout: float, scale: float, init: str, device=None):
        super().__init__()
        self.scale = scale
        self.gate = nn.Parameter(torch.zeros(1, device=device))
        self.adapter = _bottleneck(dim, hidden, dropout, init, device)

    def forward(self, m: torch.Tensor, ctx: ForwardContext, x_in: torch.Tensor | None = None) -> torch.Tensor:
        return m + (self.scale + self.gate) * self.adapter(m)


# backbone tensors Point-PEFT trains in place (the official runner's name filter), per block and overall
TRAINED_IN_BLOCKS = ("attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias", "norm1.bias", "norm2.bias")
TRAINED_OVERALL = ("cls_token", "cls_pos", "norm.weight", "norm.bias")


@register_method
@dataclass
class PointPEFT(Method):
    """Point-PEFT on a point transformer (Point-MAE / Point-BERT): see the module docstring for the parts, the
    official bugs not copied and the deviations. Trainable on Point-MAE with a 15-class head, `paper` preset:
    710,761 (773,017 with `official_unused`, the prompts and prompt adapters of blocks 6-11 the official code
    creates and never uses)."""

    name: ClassVar[str] = "point_peft"
    identity_at_init: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    needs_tokens: ClassVar[bool] = True
    needs_points: ClassVar[bool] = True
    presets: ClassVar[dict] = {
        "paper": {"init": "official", "query_grouping": (64, 32), "prompt_blocks": 6},
    }

    prompt_blocks: int = field(
        default=6, metadata={"help": "L: the first L blocks get point-prior prompts (MAE: 6; all of a shallower model)"}
    )
    top_k: int = field(default=8, metadata={"help": "bank features retrieved per sample; the prompts are top_k + 2"})
    cache_hidden: int = field(default=8, metadata={"help": "bottleneck of each prompted block's cache adapter"})
    adapter_hidden: int = field(default=16, metadata={"help": "bottleneck of the FFN and geometric adapters"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the prompts and inside every adapter"})
    ffn_scale: float = field(default=0.7, metadata={"help": "the FFN adapter's scale (plus its learnable gate)"})
    centre_coef: float = field(default=0.3, metadata={"help": "weight of a sub-centre's own token (init official)"})
    propagate_coef: float = field(default=0.3, metadata={"help": "weight of the propagated features (init official)"})
    local_width: int = field(default=18, metadata={"help": "the shared local attention's inner width (6 x 3)"})
    local_heads: int = field(default=6, metadata={"help": "the shared local attention's heads"})
    sub_centres: int | None = field(
        default=None, metadata={"help": "FPS sub-centres of the geometric adapter; unset: half the backbone's groups"}
    )
    sub_group_size: int | None = field(
        default=None, metadata={"help": "tokens per kNN group of the geometric adapter; unset: half the group size"}
    )
    query_grouping: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "(groups, size) of the query pass; unset: the backbone's; paper: (64, 32)"},
    )
    init: str = field(
        default="zero",
        metadata={
            "help": (
                '"zero": zero up projections, coefficients learnt from 0 (mmpeft); "official": Xavier adapters, '
                "fixed coefficients (the paper preset)"
            )
        },
    )
    official_unused: bool = field(
        default=False,
        metadata={"help": "also create the unused prompts and cache adapters of blocks >= L, as the official code"},
    )
    bank: str | None = field(default=None, metadata={"help": "the memory bank file (set when one is attached)"})
    bank_sha256: str | None = field(default=None, metadata={"help": "its checksum (set when one is attached)"})

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.top_k < 1 or self.prompt_blocks < 0:
            raise ValueError("top_k must be positive and prompt_blocks non-negative")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def inject(self, backbone: nn.Module) -> None:
        if not (isinstance(backbone, TokenBackbone) and hasattr(backbone, "query_features")):
            raise NotSupported(
                f"Point-PEFT groups tokens by their 3-D centres and queries the encoder in its pretraining form: it "
                f"needs a point transformer (point_mae, point_bert), not {type(backbone).__name__}"
            )
        dim, device = backbone.embed_dim, backbone.cls_token.device
        length = self.top_k + 2
        root, shared = None, None
        blocks = min(self.prompt_blocks, backbone.depth)  # every block of a backbone shallower than L
        for i in range(backbone.depth if self.official_unused else blocks):
            piece = PointPriorPrompts(length, dim, self.cache_hidden, self.dropout, self.init, root, device)
            if root is None:
                root = piece
                object.__setattr__(piece, "_backbone", backbone)
                piece._query_grouping = self.query_grouping_of(backbone)
            if i < blocks:
                backbone.before_block[i].append(piece)
            else:  # created, never used (the official code's blocks 6-11): counted, saved, trained by nothing
                backbone.blocks[i].add_module("unused_point_prompts", piece)
        sub = self.sub_centres or max(backbone.num_group // 2, 1)
        size = self.sub_group_size or max(backbone.group_size // 2, 1)
        for i, block in enumerate(backbone.blocks):
            backbone.before_block[i].append(Grouping(sub, size))  # after block i's prompt insertion
            block.site("mlp.branch").append(
                FFNAdapter(dim, self.adapter_hidden, self.dropout, self.ffn_scale, self.init, device)
            )
            geometric = GeometricAdapter(dim, self.adapter_hidden, self.dropout, self.centre_coef, self.propagate_coef,
                                         self.init, shared, self.local_width, self.local_heads, device)  # fmt: skip
            shared = shared or geometric.local
            block.site("block.out").append(geometric)
            if i < blocks:
                block.site("block.out").append(PromptRemoval())

    def unfrozen(self, backbone: nn.Module) -> list[str]:
        names = {n for n, _ in backbone.named_parameters()}
        wanted = [f"blocks.{i}.{t}" for i in range(len(backbone.blocks)) for t in TRAINED_IN_BLOCKS]
        return [n for n in [*wanted, *TRAINED_OVERALL] if n in names]

    def query_grouping_of(self, backbone: nn.Module) -> tuple[int, int]:
        return tuple(self.query_grouping or (backbone.num_group, backbone.group_size))

    def prepare(self, backbone: nn.Module, data: Any, may_build: bool = True, log: Any = print) -> None:
        """The memory bank of the run's training split: the `bank` file when given (built there when missing), else
        the cache's file for this backbone and data (built on first use, then reused); refused when it was made
        for another backbone or other data, or, for a trained adapter, when it is not the bank it trained with."""
        from mmpeft.methods.point_bank import bank_provenance, build_bank, default_bank_path, load_bank, save_bank

        if data is None or not hasattr(data, "training_clouds"):
            if self.bank:  # outside a run (an adapter loaded for inference): the file it names, unchecked data
                features, digest = load_bank(self.bank)
                self._attach(backbone, features, self.bank, digest)
            return
        grouping = self.query_grouping_of(backbone)
        data.setup("fit")
        loader = data.training_clouds(batch_size=32)
        provenance = bank_provenance(backbone, grouping, data.data_identity(), "train", len(loader.dataset),
                                     data.num_points)  # fmt: skip
        path = Path(self.bank) if self.bank else default_bank_path(provenance)
        if not path.is_file():
            if not may_build:
                raise BankMissing(f"no memory bank at {path} (the building process did not write it)")
            log(f"Point-PEFT: no memory bank at {path}; building it from the training split "
                f"({provenance['count']} clouds, query grouping {grouping[0]} x {grouping[1]})")  # fmt: skip
            features = build_bank(backbone, (clouds for clouds, _ in loader), grouping, total=len(loader))
            digest = save_bank(path, features, provenance)
            log(f"Point-PEFT: wrote the memory bank {path} ({features.shape[0]} x {features.shape[1]}, sha256 "
                f"{digest[:12]})")  # fmt: skip
        features, digest = load_bank(path, provenance)
        self._attach(backbone, features, str(path), digest)

    def stand_in_state(self, backbone: nn.Module) -> None:
        """A random bank of ScanObjectNN PB_T50_RS's size (11,392 features), for benchmarks."""
        g = torch.Generator().manual_seed(0)
        PointPEFT.attach_bank(backbone, torch.randn(STAND_IN_BANK, backbone.embed_dim, generator=g))

    def _attach(self, backbone: nn.Module, features: torch.Tensor, path: str, digest: str) -> None:
        if self.bank_sha256 and self.bank_sha256 != digest:
            raise BankMismatch(
                f"this adapter was trained with the memory bank sha256 {self.bank_sha256[:12]}..., and {path} is "
                f"{digest[:12]}...: give the bank it trained with (the method's `bank` option)"
            )
        PointPEFT.attach_bank(backbone, features, path, digest)

    @staticmethod
    def attach_bank(backbone: nn.Module, bank: torch.Tensor, path: str | None = None, sha256: str | None = None):
        """Put the memory bank [M, D] (derived state: never in the adapter file) where the prompts read it, and
        record its file and checksum in the method's config (which the adapter file's header holds)."""
        method = getattr(backbone, "_mmpeft_method", None)
        roots = [m for m in backbone.modules() if isinstance(m, PointPriorPrompts) and m.root is m]
        if not isinstance(method, PointPEFT) or not roots:
            raise NotSupported("attach_bank needs a backbone with Point-PEFT applied")
        root = roots[0]
        if bank.dim() != 2 or bank.shape[1] != root.prompts.shape[1]:
            raise ValueError(f"a memory bank is [M, {root.prompts.shape[1]}], got {list(bank.shape)}")
        root.bank = bank.detach().to(device=root.prompts.device, dtype=root.prompts.dtype)
        root.bank_unit = F.normalize(root.bank, dim=-1)
        method.bank, method.bank_sha256 = path, sha256
