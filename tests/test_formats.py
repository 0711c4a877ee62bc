"""The element format table, pinned to the OCP MX v1.0 values.

Each format's fields and its list of representable magnitudes must equal the tests' own table
(``tests.mx_reference``, written from the spec) and the literal counts and values below.
"""

import math

import pytest

from mxprobe.formats import MX_FORMAT_NAMES, canonical_format, mx_format
from tests.mx_reference import REFERENCE_FORMATS, reference_format

# name: (ebits, mbits, emax, max_norm, emin, is_int, bits per code,
#        non-negative finite magnitudes (zero included), smallest positive magnitude)
PINNED = {
    "fp8_e4m3": (4, 3, 8, 448.0, -6, False, 8, 127, 2.0**-9),  # 0x7F/0xFF NaN, no Inf
    "fp8_e5m2": (5, 2, 15, 57344.0, -14, False, 8, 124, 2.0**-16),  # exponent 31: Inf/NaN
    "fp6_e2m3": (2, 3, 2, 7.5, 0, False, 6, 32, 2.0**-3),
    "fp6_e3m2": (3, 2, 4, 28.0, -2, False, 6, 32, 2.0**-4),
    "fp4_e2m1": (2, 1, 2, 6.0, 0, False, 4, 8, 2.0**-1),
    "int8": (0, 6, 0, 127 / 64, 0, True, 8, 128, 2.0**-6),
}
FIELDS = ("ebits", "mbits", "emax", "max_norm", "emin", "is_int")


def test_format_names_are_the_ocp_elements():
    assert MX_FORMAT_NAMES == tuple(PINNED) == tuple(REFERENCE_FORMATS)
    for short in ("e4m3", "e5m2", "e2m3", "e3m2", "e2m1"):
        canonical = next(n for n in PINNED if n.endswith(short))
        assert mx_format(short) is mx_format(canonical) is mx_format(f"mx{canonical}")
        assert canonical_format(short.upper()) == canonical
    assert mx_format("mxint8") is mx_format("int8")


@pytest.mark.parametrize("name", list(PINNED))
def test_fields_are_pinned(name):
    ebits, mbits, emax, max_norm, emin, is_int, bits, count, smallest = PINNED[name]
    f, ref = mx_format(name), reference_format(name)
    assert f.name == name
    assert tuple(getattr(f, k) for k in FIELDS) == (ebits, mbits, emax, max_norm, emin, is_int)
    assert tuple(getattr(ref, k) for k in FIELDS) == (ebits, mbits, emax, max_norm, emin, is_int)
    assert f.bits == bits
    assert f.num_magnitudes == count and f.num_codes == 2 * count - 1
    assert f.min_subnormal == smallest
    # The table is self-consistent: emax is floor(log2 max_norm); floats have emin = 1 - bias.
    assert 2.0**emax <= max_norm < 2.0 ** (emax + 1)
    if not is_int:
        assert emin == 1 - (2 ** (ebits - 1) - 1)


@pytest.mark.parametrize("name", list(PINNED))
def test_magnitudes_equal_the_reference_list(name):
    *_, count, smallest = PINNED[name]
    values = mx_format(name).magnitudes()
    assert values == reference_format(name).magnitudes()
    assert len(values) == count
    assert values[0] == 0.0 and values[1] == smallest
    assert values[-1] == mx_format(name).max_norm
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def test_literal_magnitudes():
    assert mx_format("e2m1").magnitudes() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    e2m3 = (
        [k / 8 for k in range(16)] + [2 + k / 4 for k in range(8)] + [4 + k / 2 for k in range(8)]
    )
    assert mx_format("e2m3").magnitudes() == e2m3
    e3m2 = mx_format("e3m2").magnitudes()
    assert e3m2[:5] == [0.0, 0.0625, 0.125, 0.1875, 0.25]
    assert e3m2[-4:] == [16.0, 20.0, 24.0, 28.0]
    e4m3 = mx_format("e4m3").magnitudes()
    assert e4m3[:4] == [0.0, 2.0**-9, 2.0**-8, 3 * 2.0**-9]
    assert e4m3[8] == 2.0**-6  # the smallest normal follows the 7 subnormals
    assert e4m3[-4:] == [352.0, 384.0, 416.0, 448.0]
    assert e4m3.index(1.0) == 56 and e4m3[57] == 1.125
    e5m2 = mx_format("e5m2").magnitudes()
    assert e5m2[:4] == [0.0, 2.0**-16, 2.0**-15, 3 * 2.0**-16]
    assert e5m2[4] == 2.0**-14
    assert e5m2[-4:] == [32768.0, 40960.0, 49152.0, 57344.0]
    int8 = mx_format("int8").magnitudes()
    assert int8 == [k / 64 for k in range(128)] and int8[-1] == 1.984375
    # Every element has at most mbits + 1 significant bits (docs/numerics.md, exact in bf16).
    for name in PINNED:
        f = mx_format(name)
        for v in f.magnitudes()[1:]:
            mantissa, _ = math.frexp(v)
            assert (mantissa * 2 ** (f.mbits + 1)).is_integer(), (name, v)
