"""Frozen weights stored in low precision: what a PEFT run never updates need not sit in memory at 4 bytes.

Under autocast every fp32 weight is cast again at every use (autocast caches casts only for tensors that require
grad), so a frozen backbone in fp32 pays the cast each step and keeps both copies alive in the saved tensors. With
`frozen_dtype="bfloat16"` the frozen weights of the matmul layers (Linear, Conv, Embedding) are stored in bf16 once,
so autocast's cast is a no-op. Everything that trains stays fp32 (the method's pieces, tensors trained in place,
the head, hence the optimizer state), and so do the norms' affine tensors and the free parameters (position
embeddings, class tokens, projections used by `@`): they are small, and the norms and the residual stream need fp32.

The exactness contracts hold as they are: `disabled()` gives the backbone with the same frozen weights; merging
computes in fp32 and writes the host's dtype (bf16), unmerging restores the bf16 weights bit for bit; adapter files
hold only fp32 trainable tensors, so a file trained in one precision loads in the other; and the weights
fingerprint is the one taken at load, before the cast (`mmpeft.core.identity`).
"""

from __future__ import annotations

import torch
from torch import nn

from mmpeft.core.errors import NotSupported

__all__ = ["FROZEN_DTYPES", "LOW_PRECISION_LAYERS", "cast_frozen", "frozen_dtype_of", "needed_precision"]

FROZEN_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# the autocast precision each frozen dtype needs: the activations are cast at each matmul, the rest stays fp32
_PRECISION = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}
LOW_PRECISION_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def needed_precision(frozen_dtype: str) -> str:
    """The trainer precision a frozen dtype runs under (Lightning's name)."""
    return _PRECISION[frozen_dtype]


def cast_frozen(module: nn.Module, frozen_dtype: str, method_name: str = "", trains_backbone: bool = False) -> int:
    """Store the frozen weights and biases of `module`'s matmul layers in `frozen_dtype`, in place (the parameter
    objects stay, so references to them do too); returns how many elements were cast.

    Only tensors that do not require grad are cast, so call it after the method has frozen the backbone. A method
    that trains the backbone itself (full fine-tuning) is refused: its optimizer must update fp32 weights."""
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype must be one of {sorted(FROZEN_DTYPES)} (None: fp32), got {frozen_dtype!r}")
    if trains_backbone:
        raise NotSupported(
            f"frozen_dtype={frozen_dtype!r} stores the frozen backbone in low precision, but method {method_name!r} "
            "trains the whole backbone, whose weights and optimizer updates must stay fp32 (a bf16 weight loses "
            f"updates below its 8-bit mantissa); use trainer.precision {needed_precision(frozen_dtype)} alone"
        )
    dtype, cast = FROZEN_DTYPES[frozen_dtype], 0
    for layer in module.modules():
        if not isinstance(layer, LOW_PRECISION_LAYERS):
            continue
        for tensor in layer.parameters(recurse=False):
            if not tensor.requires_grad and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)
                cast += tensor.numel()
    return cast


def frozen_dtype_of(module: nn.Module) -> torch.dtype | None:
    """The low-precision dtype of `module`'s frozen matmul weights, or None when they are all fp32."""
    for layer in module.modules():
        if isinstance(layer, LOW_PRECISION_LAYERS):
            for tensor in layer.parameters(recurse=False):
                if not tensor.requires_grad and tensor.dtype in FROZEN_DTYPES.values():
                    return tensor.dtype
    return None
