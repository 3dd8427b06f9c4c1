"""VL-PET: Vision-and-Language Parameter-Efficient Tuning via Granularity Control (Hu et al., ICCV 2023,
arXiv 2308.09804; code HenryHZY/VL-PET)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mmpeft.core.anatomy import ForwardContext, TokenBackbone
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import AdapterModule

__all__ = ["VLPET", "VLPETModule", "VARIANTS"]

VARIANTS = ("large", "middle_x", "middle_y", "small", "none")


class VLPETModule(AdapterModule):
    """On a block branch: H_new = s * G ⊙ (H + ΔH), with ΔH = up(GELU(down(H))) computed from the frozen
    output H (sequential) and G the granularity-controlled gate from the branch input X.

    `identity=True` (mmpeft's default) zero-initialises up and the gates' last layers and uses 2σ(·)
    (middle-Y: 1 + z with z = 0), so the module is the identity at step 0. `identity=False` is the
    released code's init: new Linears N(0, 0.02) with zero bias (HF BART), σ gates (≈ 0.5) and
    middle-Y 1 + N(0, 0.02).
    """

    def __init__(self, dim: int, rank: int, variant: str, gate_rank: int, scale: float, identity: bool, device=None):
        super().__init__()
        self.variant, self.scale, self.identity = variant, scale, identity
        kw = {"device": device}
        self.down, self.act, self.up = (
            nn.Linear(dim, rank, **kw),
            nn.GELU(approximate="tanh"),
            nn.Linear(rank, dim, **kw),
        )
        if variant == "large":
            self.gate = nn.Sequential(nn.Linear(dim, gate_rank, **kw), nn.GELU(approximate="tanh"),
                                      nn.Linear(gate_rank, dim, **kw))  # fmt: skip
        elif variant == "middle_x":
            self.gate = nn.Linear(dim, 1, **kw)
        elif variant == "small":
            self.gate = nn.Linear(2 * dim, 1, **kw)
        elif variant == "middle_y":
            self.gate_z = nn.Parameter(torch.zeros(dim, **kw))
        if self.down.weight.device.type != "meta":
            self._init()

    def _init(self) -> None:
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        for lin in linears:
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        if self.identity:
            nn.init.zeros_(self.up.weight)
            if self.variant in ("large", "middle_x", "small"):  # the gate's last Linear: 2σ(0) = 1
                nn.init.zeros_((self.gate[-1] if self.variant == "large" else self.gate).weight)
        elif self.variant == "middle_y":
            nn.init.normal_(self.gate_z, std=0.02)

    def _squash(self, logits: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(logits) if self.identity else torch.sigmoid(logits)

    def gate_values(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        """G for branch input X and updated output H + ΔH: large (B,N,d), middle-X (B,N,1), middle-Y (d,),
        small (B,1,1) — the small gate averages over all tokens, padding included, as released."""
        if self.variant == "middle_y":
            return 1 + self.gate_z
        if self.variant == "none":
            return None
        gate = self._squash(self._gate_logits(x, h))
        return gate.mean(dim=1, keepdim=True) if self.variant == "small" else gate

    def _gate_logits(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.variant == "large":
            return self.gate(x)
        if self.variant == "middle_x":
            return self.gate(x + h)
        return self.gate(torch.cat([x, h], dim=-1))

    def forward(self, h: torch.Tensor, ctx: ForwardContext, x_in: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.up(self.act(self.down(h)))
        if self.variant in ("none", "middle_y"):
            gate = self.gate_values(x_in, h)
            return self.scale * (h if gate is None else gate * h)
        # s · 2σ(z) ⊙ H as (σ(z) ⊙ H) · 2s: the product keeps σ's own output (which sigmoid's backward keeps
        # anyway) and H, where s · (2σ(z)) ⊙ H would also keep the doubled copy of σ: one [B, N, d] tensor less
        # per branch, the same function up to rounding
        sigma = torch.sigmoid(self._gate_logits(x_in, h))
        if self.variant == "small":
            sigma = sigma.mean(dim=1, keepdim=True)
        return (sigma * h) * (2 * self.scale if self.identity else self.scale)


@register_method
@dataclass
class VLPET(Method):
    """VL-PET on both branches (attention and MLP) of every block, plus trainable LayerNorms.

    Per branch: 2dr + r + d for ΔH (the paper's N_h-head down projection is one Linear(d, r)
    with stacked rows, so `heads` changes nothing numerically and is not a parameter here) plus the
    gate: large 2d·r_g + r_g + d, middle-X d + 1, middle-Y d, small 2d + 1. On open_clip ViT-B/32's
    image tower at r = r_g = 96: 3,559,680 for ΔH, 7,119,360 with the large gate; 39,936 LayerNorm
    parameters train as well. Not mergeable: the gates depend on the input.

    Keeps for backward, per branch (the necessary cost of a gate that multiplies the updated output): H, the
    frozen branch output (down's weight gradient needs it); H + ΔH (G's gradient); σ(z) (the gradient into
    H + ΔH, and σ's own derivative σ(1 - σ)); the gate MLP's input X and its [N, r_g] hidden (large); the
    [N, r] bottleneck. Three [B, N, d] tensors a branch beyond X, which the trained LayerNorms keep anyway.

    Default: identity at init (zero-init up and gate outputs, 2σ gates, middle-Y z = 0), so a CLIP
    tower starts at its zero-shot function — the reason mmpeft's default differs from the paper. The
    `paper` preset keeps the released init (σ gates ≈ 0.5, N(0, 0.02) everywhere, scale 1.0 as in the
    BART scripts); it is *not* the identity at step 0.
    """

    name: ClassVar[str] = "vl_pet"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    needs_tokens: ClassVar[bool] = True
    presets: ClassVar[dict] = {"paper": {"identity_init": False, "scale": 1.0, "variant": "large"}}

    variant: str = field(
        default="large",
        metadata={
            "help": (
                'gate granularity: "large" (per token and channel, an MLP), "middle_x" (per token), '
                '"middle_y" (per channel), "small" (one per example) or "none" (no gate)'
            )
        },
    )
    rank: int = field(
        default=96, metadata={"help": "bottleneck width r of the down / up projections that compute the update dH"}
    )
    gate_rank: int = field(
        default=96, metadata={"help": "hidden width r_g of the large variant's gate MLP (unused by the other variants)"}
    )
    scale: float = field(default=1.0, metadata={"help": "multiplier s on the gated output: H_new = s * G * (H + dH)"})
    identity_init: bool = field(
        default=True,
        metadata={
            "help": (
                "zero-init the up projection and gate outputs with 2*sigmoid gates (identity at step 0); "
                "false: the released init (sigmoid gates ~ 0.5, N(0, 0.02))"
            )
        },
    )
    train_norms: bool = field(
        default=True, metadata={"help": "also train the affine parameters of every LayerNorm of the backbone"}
    )
    branches: tuple[str, ...] = field(
        default=("attn", "mlp"), metadata={"help": 'block branches that get a VL-PET module: "attn" and / or "mlp"'}
    )

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"VL-PET variant must be one of {VARIANTS}, got {self.variant!r}")
        if not set(self.branches) <= {"attn", "mlp"}:
            raise ValueError(f"VL-PET branches are 'attn' and/or 'mlp', got {self.branches}")

    def inject(self, backbone: nn.Module) -> None:
        assert isinstance(backbone, TokenBackbone)
        device = next(backbone.parameters()).device
        for branch in self.branches:
            for _, site in backbone.sites(f"{branch}.branch"):
                site.append(VLPETModule(backbone.embed_dim, self.rank, self.variant, self.gate_rank, self.scale,
                                        self.identity_init, device))  # fmt: skip

    def unfrozen(self, backbone: nn.Module) -> list[str]:
        if not self.train_norms:
            return []
        return [
            f"{name}.{p}" for name, m in backbone.named_modules() if isinstance(m, nn.LayerNorm)
            for p, _ in m.named_parameters(recurse=False)
        ]  # fmt: skip
