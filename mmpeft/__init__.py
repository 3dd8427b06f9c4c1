"""mmpeft: parameter-efficient fine-tuning of frozen foundation models across modalities."""

__version__ = "0.1.0"

from mmpeft import methods  # noqa: E402,F401  (registers the built-in methods)
from mmpeft.core.backbone import register_foreign_backbone  # noqa: E402

# diffusers models handed to PeftModel directly are wrapped (imported only when one shows up)
register_foreign_backbone("UNet2DConditionModel", "mmpeft.backbones.diffusion:DiffusersUNet")
register_foreign_backbone("DiTTransformer2DModel", "mmpeft.backbones.diffusion:DiffusersDiT")

# mmpeft's quickstart backbones get their weights from a pretraining run (imported only when one is built)
from mmpeft.backbones.weights import register_weights_builder  # noqa: E402

register_weights_builder("digits_vit", "mmpeft.pretrain.digits:pretrain_digits_vit")
register_weights_builder("shapes_point", "mmpeft.pretrain.shapes:pretrain_shapes_point")
from mmpeft.core import (  # noqa: E402
    PeftModel,
    create_method,
    list_methods,
    load_adapter,
    parameter_report,
    save_adapter,
)

__all__ = ["PeftModel", "create_method", "list_methods", "load_adapter", "parameter_report", "save_adapter"]
