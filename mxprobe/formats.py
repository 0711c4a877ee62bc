"""Element formats of OCP MX v1.0 and the plain floating-point formats used for emulation.

An MX element format is described by its exponent bits, mantissa bits, the exponent of its
largest power of two (``emax``), its largest normal value (``max_norm``) and the exponent of
its smallest normal (``emin``). INT8 is the OCP MXINT8 element: a two's-complement integer
with an implicit scale of 2^-6 (so values are k/64, |k| <= 127).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ElementFormat:
    """One MX element format.

    Attributes:
        name: canonical name, e.g. ``"fp8_e4m3"``.
        ebits: exponent bits (0 for int8).
        mbits: mantissa bits (for int8, the fraction bits of the implicit 2^-6 scale: 6).
        emax: exponent of the largest power of two in the format (floor(log2(max_norm))).
        max_norm: the largest finite magnitude.
        emin: exponent of the smallest normal (for int8, the exponent of its fixed step + mbits).
        is_int: ``True`` for int8.
    """

    name: str
    ebits: int
    mbits: int
    emax: int
    max_norm: float
    emin: int
    is_int: bool = False

    @property
    def bits(self) -> int:
        """Bits per element code (sign included)."""
        return 8 if self.is_int else 1 + self.ebits + self.mbits

    @property
    def min_subnormal(self) -> float:
        """The smallest positive magnitude (for int8, its fixed step)."""
        return 2.0 ** (self.emin - self.mbits)

    @property
    def num_codes(self) -> int:
        """Number of distinct finite values the element can take (+0 and -0 counted once)."""
        return 2 * self.num_magnitudes - 1

    @property
    def num_magnitudes(self) -> int:
        """Number of distinct non-negative finite values, zero included."""
        if self.is_int:
            return 128
        return len(self.magnitudes())

    def magnitudes(self) -> list[float]:
        """Every non-negative finite value of the format, ascending (zero first)."""
        if self.is_int:
            return [k / 64.0 for k in range(128)]
        values = [m * 2.0 ** (self.emin - self.mbits) for m in range(2**self.mbits)]
        e = self.emin
        while True:
            for m in range(2**self.mbits):
                v = (1.0 + m / 2**self.mbits) * 2.0**e
                if v > self.max_norm:
                    return values
                values.append(v)
            e += 1


_MX_FORMATS = {
    f.name: f
    for f in (
        ElementFormat("fp8_e4m3", 4, 3, 8, 448.0, -6),
        ElementFormat("fp8_e5m2", 5, 2, 15, 57344.0, -14),
        ElementFormat("fp6_e2m3", 2, 3, 2, 7.5, 0),
        ElementFormat("fp6_e3m2", 3, 2, 4, 28.0, -2),
        ElementFormat("fp4_e2m1", 2, 1, 2, 6.0, 0),
        ElementFormat("int8", 0, 6, 0, 127.0 / 64.0, 0, is_int=True),
    )
}

_ALIASES = {
    "e4m3": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "e2m3": "fp6_e2m3",
    "e3m2": "fp6_e3m2",
    "e2m1": "fp4_e2m1",
    "mxfp8_e4m3": "fp8_e4m3",
    "mxfp8_e5m2": "fp8_e5m2",
    "mxfp6_e2m3": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp4_e2m1": "fp4_e2m1",
    "mxint8": "int8",
}

# Elementwise (non-block) formats a role may take instead of an MX format.
PLAIN_FORMATS = ("bf16", "fp16", "fp32")
# NVIDIA's FP4 (E2M1 elements, E4M3 scale per 16, FP32 per-tensor scale): mxprobe/nvfp4.py.
NVFP4 = "nvfp4"

MX_FORMAT_NAMES = tuple(_MX_FORMATS)


def mx_format(name: str | ElementFormat) -> ElementFormat:
    """Look up an MX element format by canonical name or alias.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if isinstance(name, ElementFormat):
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    try:
        return _MX_FORMATS[key]
    except KeyError:
        valid = ", ".join(list(_MX_FORMATS) + list(_ALIASES))
        raise ValueError(f"unknown MX format {name!r}; expected one of {valid}") from None


def canonical_format(name: str | None) -> str:
    """Canonical name of any role format: an MX format, ``nvfp4``, ``bf16``, ``fp16`` or
    ``fp32``.

    ``None``, ``"none"`` and ``"fp32"`` all mean "untouched" and map to ``"fp32"``.
    """
    if name is None:
        return "fp32"
    key = str(name).lower()
    if key in ("none", "fp32", "float32"):
        return "fp32"
    if key in ("bf16", "bfloat16"):
        return "bf16"
    if key in ("fp16", "float16", "half"):
        return "fp16"
    if key == NVFP4:
        return NVFP4
    try:
        return mx_format(key).name
    except ValueError:
        valid = ", ".join([*_MX_FORMATS, *_ALIASES, *PLAIN_FORMATS, NVFP4])
        raise ValueError(f"unknown format {name!r}; expected one of {valid}") from None


def is_mx(name: str) -> bool:
    """Whether a canonical role format is a block-scaled MX format."""
    return name in _MX_FORMATS


def is_block_format(name: str) -> bool:
    """Whether a canonical role format quantizes in scaled blocks (MX or NVFP4)."""
    return name in _MX_FORMATS or name == NVFP4
