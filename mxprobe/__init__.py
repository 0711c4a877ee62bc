"""mxprobe: emulate MX (Microscaling) training exactly, diagnose it, and intervene mid-run."""

from mxprobe.adapters import register_adapter
from mxprobe.compiled import compile_model
from mxprobe.convert import (
    amend_scheme,
    convert,
    describe,
    full_precision,
    module_names,
    restore_schemes,
    schemes_of,
    set_scheme,
)
from mxprobe.formats import ElementFormat, canonical_format, mx_format
from mxprobe.modules import (
    MxLayerNorm,
    MxLinear,
    MxMatmul,
    MxRMSNorm,
    NotEmulatedError,
    mx_linear,
    mx_matmul,
)
from mxprobe.nvfp4 import NVFP4Packed, nvfp4_decode, nvfp4_encode, quantize_nvfp4
from mxprobe.quantize import mx_decode, mx_encode, quantize_mx, round_to
from mxprobe.scheme import PRESETS, PrecisionScheme, parse_scheme

__all__ = [
    "PRESETS",
    "ElementFormat",
    "MxLayerNorm",
    "MxLinear",
    "MxMatmul",
    "MxRMSNorm",
    "NVFP4Packed",
    "NotEmulatedError",
    "PrecisionScheme",
    "amend_scheme",
    "canonical_format",
    "compile_model",
    "convert",
    "describe",
    "full_precision",
    "module_names",
    "mx_decode",
    "mx_encode",
    "mx_format",
    "mx_linear",
    "mx_matmul",
    "nvfp4_decode",
    "nvfp4_encode",
    "parse_scheme",
    "quantize_mx",
    "quantize_nvfp4",
    "register_adapter",
    "restore_schemes",
    "round_to",
    "schemes_of",
    "set_scheme",
]
