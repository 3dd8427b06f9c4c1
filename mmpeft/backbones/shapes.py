"""A small point transformer pretrained by mmpeft itself on the upstream shapes (ten primitives), so the
point-cloud quickstart is a real transfer. Its weights are built on first use by the pretraining
registered for "shapes_point" (`mmpeft.pretrain.shapes`) and cached, keyed by architecture and recipe.
"""

from __future__ import annotations

from mmpeft.backbones.point import PointTransformer
from mmpeft.backbones.registry import register_backbone
from mmpeft.backbones.weights import load_quickstart_weights, register_weights_builder

__all__ = ["ShapesPointTransformer", "ARCH", "RECIPE"]

# Point-MAE's architecture at a tenth of the width: 256 points, 32 groups of 16, 4 blocks of 96
ARCH = {"num_points": 256, "num_group": 32, "group_size": 16, "depth": 4, "embed_dim": 96, "num_heads": 4,
        "encoder_dims": 96, "pointnet_widths": [32, 64, 128], "drop_path_rate": 0.0}  # fmt: skip
# "data": the shapes generator's version, part of the cache key (so a changed generator pretrains anew);
# "threads": the torch thread count the pretraining runs under, whatever the machine's (`pretrain.common`)
RECIPE = {"epochs": 20, "lr": 1e-3, "weight_decay": 0.05, "batch_size": 32, "warmup_epochs": 2, "seed": 0,
          "per_class": 100, "data": 2, "threads": 2}  # fmt: skip


# the upstream pretraining that builds its weights (a lazy path: backbones never import the pretrain layer)
register_weights_builder("shapes_point", "mmpeft.pretrain.shapes:pretrain_shapes_point")


@register_backbone(
    "shapes_point",
    description="the point quickstart's transformer (Point-MAE layout, 4 x 96), pretrained on the upstream shapes",
)
class ShapesPointTransformer(PointTransformer):
    """The point transformer of the shapes quickstart (Point-MAE layout, 4 x 96).

    Args:
        pretrained: load (building on first use) mmpeft's upstream-pretrained weights; False: random init.
        weights: a weights file instead (e.g. one copied from another machine's cache).
        epochs: the pretraining budget (part of the cache key).
        drop_path_rate: stochastic depth while fine-tuning (0 by default: the model is small).
    """

    def __init__(self, pretrained: bool = True, weights: str | None = None, epochs: int | None = None,
                 drop_path_rate: float = 0.0):  # fmt: skip
        arch = {**ARCH, "pointnet_widths": tuple(ARCH["pointnet_widths"]), "drop_path_rate": drop_path_rate}
        super().__init__("point_mae", **arch)
        self.name = "shapes_point"
        load_quickstart_weights(self, "shapes_point", ARCH, RECIPE, pretrained, weights, epochs)
