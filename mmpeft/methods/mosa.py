"""MoSA: Mixture of Sparse Adapters (Zhang et al., arXiv 2312.02923, v1 "Split & Merge"; code
Theia-4869/MoSA)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.anatomy import ForwardContext, TokenBackbone
from mmpeft.core.heads import VPT_HEAD
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import AdapterModule, make_activation

__all__ = ["MoSA", "MoSAAdapter", "random_partition_masks", "symmetric_kl"]

SHARES = ("down", "up", "none")


def random_partition_masks(shape: tuple[int, ...], n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` boolean masks that are pairwise disjoint and cover `shape` exactly once: every element
    gets a uniform score, and the score's rank picks its expert (equal-size quantile bins)."""
    scores = torch.rand(shape, generator=generator).flatten()
    ranks = torch.empty_like(scores, dtype=torch.long)
    ranks[scores.argsort()] = torch.arange(scores.numel())
    owner = (ranks * n // scores.numel()).view(shape)
    return torch.stack([owner == i for i in range(n)])


class _SplitLinear(nn.Module):
    """N expert copies of one Linear's weight (dense biases, as released), trained only inside
    disjoint masks; `weight(i)` is expert i, `mean_weight()` the merged dense weight."""

    def __init__(self, linear: nn.Linear, n: int, generator: torch.Generator):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(linear.weight.detach().clone()) for _ in range(n)])
        self.biases = nn.ParameterList([nn.Parameter(linear.bias.detach().clone()) for _ in range(n)])
        masks = random_partition_masks(tuple(linear.weight.shape), n, generator).to(linear.weight.device)
        self.register_buffer("masks", masks, persistent=False)  # rebuilt from the seed, not stored

    def expert_weight(self, i: int) -> torch.Tensor:
        """Expert i's full weight in the forward, with gradient only inside mask i."""
        w, keep = self.weights[i], self.masks[i].to(self.weights[i].dtype)
        return w * keep + (w * (1 - keep)).detach()

    def forward(self, x: torch.Tensor, expert: int | None) -> torch.Tensor:
        if expert is None:
            return F.linear(x, self.mean_weight(), torch.stack(list(self.biases)).mean(0))
        return F.linear(x, self.expert_weight(expert), self.biases[expert])

    def mean_weight(self) -> torch.Tensor:
        return torch.stack(list(self.weights)).mean(0)


class MoSAAdapter(AdapterModule):
    """AdaptFormer-style parallel adapter with its own LayerNorm, whose down or up projection (or
    both) is split into N sparse experts; one expert per block per training forward."""

    def __init__(self, dim: int, hidden: int, n: int, share: str, scale: float, dropout: float,
                 activation: str, generator: torch.Generator, block: int, device=None):  # fmt: skip
        super().__init__()
        self.n, self.share, self.scale, self.block = n, share, scale, block
        self.norm = nn.LayerNorm(dim, eps=1e-6, device=device)  # as released: `LayerNorm(hidden_size, eps=1e-6)`
        down, up = nn.Linear(dim, hidden, device=device), nn.Linear(hidden, dim, device=device)
        if down.weight.device.type != "meta":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.down = _SplitLinear(down, n, generator) if share in ("up", "none") else down
        self.up = _SplitLinear(up, n, generator) if share in ("down", "none") else up

    def _project(self, layer: nn.Module, x: torch.Tensor, expert: int | None) -> torch.Tensor:
        return layer(x, expert) if isinstance(layer, _SplitLinear) else layer(x)

    def _draw(self, ctx: ForwardContext, which: str) -> int:
        return ctx.draw(f"mosa.expert.{self.block}.{which}", lambda g: int(torch.randint(self.n, (1,), generator=g)))

    def forward(self, m: torch.Tensor, ctx: ForwardContext, x_in: torch.Tensor | None = None,
                expert: int | None = None) -> torch.Tensor:  # fmt: skip
        """`expert` forces one expert for every split projection (tests, analysis); in training each split
        projection draws its own, independently, as the released code does for `share="none"`."""
        down_expert = up_expert = expert
        if expert is None and self.training:
            down_expert = self._draw(ctx, "down") if isinstance(self.down, _SplitLinear) else None
            up_expert = self._draw(ctx, "up") if isinstance(self.up, _SplitLinear) else None
        h = self.act(self._project(self.down, self.norm(x_in), down_expert))
        return m + self._project(self.up, self.dropout(h), up_expert) * self.scale

    def dense_state(self) -> dict[str, torch.Tensor]:
        """The merged dense adapter (mean over experts): norm, down and up weights and biases."""
        state = {f"norm.{k}": v for k, v in self.norm.state_dict().items()}
        for name in ("down", "up"):
            layer = getattr(self, name)
            if isinstance(layer, _SplitLinear):
                state[f"{name}.weight"] = layer.mean_weight().detach()
                state[f"{name}.bias"] = torch.stack(list(layer.biases)).mean(0).detach()
            else:
                state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
        return state


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """½[KL(sg(p_b) ‖ p_a) + KL(sg(p_a) ‖ p_b)], batch mean; 0 when the passes coincide."""
    log_a, log_b = logits_a.log_softmax(-1), logits_b.log_softmax(-1)
    kl_ab = F.kl_div(log_a, log_b.detach(), log_target=True, reduction="batchmean")
    kl_ba = F.kl_div(log_b, log_a.detach(), log_target=True, reduction="batchmean")
    return 0.5 * (kl_ab + kl_ba)


@register_method
@dataclass
class MoSA(Method):
    """MoSA: an AdaptFormer adapter (own LayerNorm, GELU, dropout 0.1, scale 0.1, parallel to every
    block's MLP) whose up projection (`share="down"`), down projection (`"up"`) or both (`"none"`)
    is split into N experts with disjoint random masks that cover it exactly once. In training each
    block uses one expert per forward, drawn through the forward context; gradients are masked, so
    an expert changes only inside its mask. Every step runs two passes and adds the symmetric-KL
    consistency term (`consistency_weight`, on by default as in every released script; off is
    the ablation). Evaluation uses the experts' mean, one dense adapter, which for `share="down"`
    equals the expectation over the random expert choice.

    Memory: a step keeps both passes' activations (2x the backbone's, plus per block and pass the adapter
    LayerNorm's statistics and its [N, d] output for down's gradient), because each pass's consistency gradient
    needs the other pass's probabilities, so both graphs are alive at the one backward; running the passes one
    after the other would need a third forward (the first again, once the second's probabilities are known).

    Counts: the deployable (merged) adapter is AdaptFormer+LN: 322,752 on ViT-B/16 at r=16
    (`deployable_count`); the raw trainable tensors hold N copies of each split projection.
    Not mergeable into the backbone (GELU between the projections); `dense_adapters()` gives the
    merged experts for export. Masks are drawn from `mask_seed` (3407, the released seed) and
    rebuilt from it, so adapter files need not store them.

    As released (Theia-4869/MoSA `src/models/vit_adapter/vit_mosa.py`): the adapter's LayerNorm has
    eps 1e-6; each split projection draws its expert independently per block and forward (`share="none"`
    splits down and up, each with its own draw); the frozen ViT keeps its dropout 0.1 active in
    training (`vit_models.py` L28-34 leaves the encoder in train mode for MoSA runs; the shipped configs
    set the backbone's `dropout: 0.1`, and MoSA's frozen mode is "train").

    Presets (`scripts/mosa/vit/*`): `paper` is the VTAB recipe (r=16, N=4, share down); `paper_fgvc`
    r=64, N=4, share down; `paper_cars` r=64, N=2, share up (the Stanford Cars exception). Each
    initialises the head as the VPT codebase does (`src/models/mlp.py`: kaiming-normal fan_out, bias
    -log(99)).
    """

    name: ClassVar[str] = "mosa"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    needs_tokens: ClassVar[bool] = True
    presets: ClassVar[dict] = {
        "paper": {"bottleneck": 16, "experts": 4, "share": "down", "head_init": VPT_HEAD},
        "paper_fgvc": {"bottleneck": 64, "experts": 4, "share": "down", "head_init": VPT_HEAD},
        "paper_cars": {"bottleneck": 64, "experts": 2, "share": "up", "head_init": VPT_HEAD},
    }

    bottleneck: int = field(
        default=16,
        metadata={"help": "hidden width r of the adapter (16: VTAB; the paper_fgvc and paper_cars presets use 64)"},
    )
    experts: int = field(
        default=4,
        metadata={"help": "number N of sparse experts a split projection is divided into (disjoint random masks)"},
    )
    share: str = field(
        default="down",
        metadata={
            "help": 'the projection kept dense: "down" (up is split), "up" (down is split) or "none" (both split)'
        },
    )
    scale: float = field(
        default=0.1, metadata={"help": "multiplier on the adapter's output before it is added to the MLP output"}
    )
    dropout: float = field(
        default=0.1, metadata={"help": "dropout between the activation and the up projection (training only)"}
    )
    activation: str = field(
        default="gelu",
        metadata={"help": "nonlinearity between the projections: relu, gelu, silu, quick_gelu or identity"},
    )
    consistency_weight: float = field(
        default=1.0,
        metadata={
            "help": (
                "weight of the symmetric-KL term between two passes with different experts; 0: off, one pass per step"
            )
        },
    )
    mask_seed: int = field(
        default=3407,
        metadata={"help": "seed of the expert masks (3407: the released seed); masks are rebuilt from it, not saved"},
    )

    def __post_init__(self) -> None:
        if self.share not in SHARES:
            raise ValueError(f"MoSA share must be one of {SHARES}, got {self.share!r}")
        if self.experts < 1:
            raise ValueError(f"MoSA needs at least one expert, got {self.experts}")

    @property
    def forward_passes(self) -> int:  # type: ignore[override]
        return 2 if self.consistency_weight > 0 else 1

    def inject(self, backbone: nn.Module) -> None:
        assert isinstance(backbone, TokenBackbone)
        generator = torch.Generator().manual_seed(self.mask_seed)
        device = next(backbone.parameters()).device
        for i, site in backbone.sites("mlp.branch"):
            site.append(
                MoSAAdapter(
                    backbone.embed_dim,
                    self.bottleneck,
                    self.experts,
                    self.share,
                    self.scale,
                    self.dropout,
                    self.activation,
                    generator,
                    i,
                    device,
                )  # fmt: skip
            )

    def extra_loss(self, outputs: list[torch.Tensor]) -> torch.Tensor | None:
        if len(outputs) < 2 or self.consistency_weight == 0:
            return None
        return self.consistency_weight * symmetric_kl(outputs[0], outputs[1])

    def _why_not_mergeable(self) -> str:
        return "a GELU sits between its projections; dense_adapters() merges the experts into one adapter"

    @staticmethod
    def adapters(backbone: nn.Module) -> list[MoSAAdapter]:
        return [m for m in backbone.modules() if isinstance(m, MoSAAdapter)]

    def dense_adapters(self, backbone: nn.Module) -> list[dict[str, torch.Tensor]]:
        return [a.dense_state() for a in self.adapters(backbone)]

    def deployable_count(self, backbone: nn.Module) -> int:
        return sum(t.numel() for state in self.dense_adapters(backbone) for t in state.values())

    def inference_params(self, backbone: nn.Module) -> int:
        return self.deployable_count(backbone)
