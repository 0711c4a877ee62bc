"""mxprobe: emulate MX (Microscaling) training exactly, diagnose it, and intervene mid-run."""

from mxprobe.formats import ElementFormat, canonical_format, mx_format
from mxprobe.quantize import mx_decode, mx_encode, quantize_mx, round_to

__all__ = [
    "ElementFormat",
    "canonical_format",
    "mx_decode",
    "mx_encode",
    "mx_format",
    "quantize_mx",
    "round_to",
]
