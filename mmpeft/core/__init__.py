"""The shared method core. Imports no backbone, method, task or dataset."""

from mmpeft.core.anatomy import SITES, Attention, Site, TokenBackbone, TokenBlock
from mmpeft.core.attention import choose_backend
from mmpeft.core.backbone import Backbone, as_backbone, register_foreign_backbone
from mmpeft.core.context import BackboneInput, ContextSlot, ForwardContext, checkpoint_in_context
from mmpeft.core.errors import AdapterMismatch, MmpeftError, NotMergeable, NotSupported, UnknownName, WeightsUnavailable
from mmpeft.core.inject import (
    attach,
    detach,
    find_modules,
    find_parameters,
    freeze,
    match_name,
    placements,
    replace_module,
)
from mmpeft.core.method import Method, create_method, get_method, list_methods, register_method
from mmpeft.core.model import PeftModel, backbone_signature
from mmpeft.core.modules import AdapterModule, Bottleneck, Gate, LowRank, PromptTokens, ScaleShift
from mmpeft.core.pristine import disabled
from mmpeft.core.report import ParamReport, markdown_table, parameter_report
from mmpeft.core.state import adapter_from_file, load_adapter, read_adapter, save_adapter

__all__ = [
    "SITES",
    "Attention",
    "Backbone",
    "BackboneInput",
    "ContextSlot",
    "ForwardContext",
    "as_backbone",
    "checkpoint_in_context",
    "register_foreign_backbone",
    "placements",
    "Site",
    "TokenBackbone",
    "TokenBlock",
    "choose_backend",
    "AdapterMismatch",
    "MmpeftError",
    "NotMergeable",
    "NotSupported",
    "UnknownName",
    "WeightsUnavailable",
    "attach",
    "detach",
    "find_modules",
    "find_parameters",
    "freeze",
    "match_name",
    "replace_module",
    "Method",
    "create_method",
    "get_method",
    "list_methods",
    "register_method",
    "PeftModel",
    "backbone_signature",
    "AdapterModule",
    "Bottleneck",
    "Gate",
    "LowRank",
    "PromptTokens",
    "ScaleShift",
    "disabled",
    "ParamReport",
    "markdown_table",
    "parameter_report",
    "adapter_from_file",
    "load_adapter",
    "read_adapter",
    "save_adapter",
]
