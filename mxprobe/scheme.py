"""Precision schemes: which format every tensor role of a module uses.

A :class:`PrecisionScheme` gives one format per role (docs/numerics.md): an MX element
format (``fp8_e4m3`` ... ``int8``), ``bf16``/``fp16`` (elementwise rounding) or ``fp32``
(untouched), plus the block size, scale mode, rounding and whether backprop is quantized.

Presets (all: ``block_size=32``, ``scale_mode="floor"``, ``rounding="even"``; columns are the
string-form keys below: ``w`` = weight, ``g_dgrad`` = grad_dgrad, ``norm`` = norm_affine,
``elem`` = elementwise, ``backprop`` = quantize_backprop, ...):

| preset                | w    | a    | w_bp | a_bp | g_wgrad | g_dgrad | norm | elem | backprop |
|-----------------------|------|------|------|------|---------|---------|------|------|----------|
| `fp32`                | fp32 | fp32 | fp32 | fp32 | fp32    | fp32    | fp32 | fp32 | true     |
| `bf16`                | bf16 | bf16 | bf16 | bf16 | bf16    | bf16    | bf16 | bf16 | true     |
| `mxfp8_e4m3`          | e4m3 | e4m3 | e4m3 | e4m3 | e4m3    | e4m3    | e4m3 | bf16 | true     |
| `mxfp8_e5m2`          | e5m2 | e5m2 | e5m2 | e5m2 | e5m2    | e5m2    | e5m2 | bf16 | true     |
| `mxfp6_e2m3`          | e2m3 | e2m3 | e2m3 | e2m3 | e2m3    | e2m3    | e2m3 | bf16 | true     |
| `mxfp6_e3m2`          | e3m2 | e3m2 | e3m2 | e3m2 | e3m2    | e3m2    | e3m2 | bf16 | true     |
| `mxfp4_e2m1`          | e2m1 | e2m1 | e2m1 | e2m1 | e2m1    | e2m1    | e2m1 | bf16 | true     |
| `mx_mix`              | e4m3 | e4m3 | e5m2 | e5m2 | e5m2    | e5m2    | e4m3 | bf16 | true     |
| `w_e4m3_a_bf16`       | e4m3 | bf16 | e4m3 | bf16 | bf16    | bf16    | bf16 | bf16 | true     |
| `mxfp8_e4m3_fwd_only` | e4m3 | e4m3 | fp32 | fp32 | fp32    | fp32    | e4m3 | bf16 | false    |
| `nvfp4`               | nvfp4| nvfp4| nvfp4| nvfp4| nvfp4   | nvfp4   | nvfp4| bf16 | true     |
| `nvfp4_recipe`        | nvfp4| nvfp4| nvfp4| nvfp4| nvfp4   | nvfp4   | bf16 | bf16 | true     |

`w_e4m3_a_bf16` and `mxfp8_e4m3_fwd_only` are the paper's mitigations (e4m3 weights with bf16
activations; MX in the forward pass only). ``nvfp4`` roles use NVIDIA's FP4 (docs/nvfp4.md), set
by ``nvscale`` (``amax`` two-level, the default, or ``none``), ``nvtile`` (weight blocks ``1x16``
or ``16x16`` tiles), ``nvgrad`` (gradient rounding ``even`` or ``stochastic``) and ``nvrht``
(``on``: the random Hadamard transform on the weight-gradient GEMM's operands); ``nvfp4_recipe``
is NVIDIA's recipe: ``nvtile=16x16,nvgrad=stochastic,nvrht=on``, norms in bf16.

String form (``PrecisionScheme.parse``, ``str(scheme)``): a preset name, comma-separated
``key=value`` items, or a preset followed by items that amend it, e.g. ``"mxfp8_e4m3,norm=bf16"``
or ``"w=e4m3,a=e4m3,bp=e5m2,scale=rceil"``. Keys: ``w``, ``a``, ``w_bp``, ``a_bp``, ``g_wgrad``,
``g_dgrad``, ``bp`` (all four backward roles), ``norm``, ``elem``, ``block``, ``scale``,
``round``, ``backprop``, ``nvscale``, ``nvtile``, ``nvgrad``, ``nvrht``. Roles not named are
``fp32``; each key may be given once, and a later item overrides an earlier group key
(``"bp=e5m2,g_wgrad=e4m3"``).

A setting that no role of a scheme uses would change nothing: ``block``/``scale``/``round`` need
an MX role, ``nvscale`` an NVFP4 role, ``nvtile`` an NVFP4 weight role, ``nvgrad`` an NVFP4
gradient role and ``nvrht`` an NVFP4 ``g_wgrad`` or ``a_bp`` (with ``backprop=true``).
``convert``/``set_scheme`` refuse such a scheme (``mxfp8_e4m3,nvrht=on``,
``nvfp4,round=stochastic``), an override that sets such a setting for the modules it matches,
and ``amend_scheme`` (and so a rule, at setup) a change whose settings no module it amends
would use. Only the settings an override or change names count (all of them when it is a
scheme or starts with a preset): ``bp=bf16`` on ``nvfp4_recipe`` is fine, though it leaves the
recipe's ``nvgrad``/``nvrht`` unused there.

Per-layer overrides are an ordered mapping ``{glob on the qualified module name: scheme or
partial string}``; the first matching glob wins and a partial string amends the base scheme.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

from mxprobe.checks import check_choice
from mxprobe.formats import NVFP4, PLAIN_FORMATS, canonical_format, is_mx
from mxprobe.quantize import ROUNDINGS, SCALE_MODES

ROLES = (
    "weight",
    "act",
    "weight_bp",
    "act_bp",
    "grad_wgrad",
    "grad_dgrad",
    "norm_affine",
    "elementwise",
)
BACKWARD_ROLES = ("weight_bp", "act_bp", "grad_wgrad", "grad_dgrad")
GEMM_ROLES = ("weight", "act", *BACKWARD_ROLES)

# String key -> the fields it sets.
_KEYS: dict[str, tuple[str, ...]] = {
    "w": ("weight",),
    "a": ("act",),
    "w_bp": ("weight_bp",),
    "a_bp": ("act_bp",),
    "g_wgrad": ("grad_wgrad",),
    "g_dgrad": ("grad_dgrad",),
    "bp": BACKWARD_ROLES,
    "norm": ("norm_affine",),
    "elem": ("elementwise",),
    "block": ("block_size",),
    "scale": ("scale_mode",),
    "round": ("rounding",),
    "backprop": ("quantize_backprop",),
    "nvscale": ("nvfp4_scale",),
    "nvtile": ("nvfp4_weight_tile",),
    "nvgrad": ("nvfp4_grad_rounding",),
    "nvrht": ("nvfp4_wgrad_rht",),
}
_NVFP4_SETTINGS = {
    "nvfp4_scale": ("amax", "none"),
    "nvfp4_weight_tile": ("1x16", "16x16"),
    "nvfp4_grad_rounding": ("even", "stochastic"),
    "nvfp4_wgrad_rht": ("off", "on"),
}
# (key, field, default, roles it applies to, which formats): what makes a setting matter.
_SETTING_SCOPES = (
    ("block", "block_size", 32, ROLES, "mx"),
    ("scale", "scale_mode", "floor", ROLES, "mx"),
    ("round", "rounding", "even", ROLES, "mx"),
    ("nvscale", "nvfp4_scale", "amax", ROLES, NVFP4),
    ("nvtile", "nvfp4_weight_tile", "1x16", ("weight", "weight_bp"), NVFP4),
    ("nvgrad", "nvfp4_grad_rounding", "even", ("grad_wgrad", "grad_dgrad"), NVFP4),
    ("nvrht", "nvfp4_wgrad_rht", "off", ("grad_wgrad", "act_bp"), NVFP4),
)
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclasses.dataclass(frozen=True)
class PrecisionScheme:
    """The format of every tensor role of a module, and how MX blocks are scaled and rounded.

    Role fields take an MX element format or alias (``"e4m3"`` becomes ``"fp8_e4m3"``),
    ``"bf16"``, ``"fp16"``, or ``"fp32"``/``None`` (untouched); ``elementwise`` takes only the
    plain formats. Construct directly, with :meth:`parse`, :meth:`from_dict` or
    :meth:`from_mx_specs`; use a preset from :data:`PRESETS`.

    Raises:
        ValueError: for a bad value; the message names the field, the value and the choices.
        TypeError: for a ``block_size`` that is not an int or a non-bool ``quantize_backprop``.

    Example::

        >>> s = PrecisionScheme.parse("mxfp8_e4m3,norm=bf16")
        >>> s.weight, s.norm_affine, str(s.amend("norm=e4m3"))
        ('fp8_e4m3', 'bf16', 'mxfp8_e4m3')
    """

    weight: str = "fp32"
    """W in the forward GEMM."""
    act: str = "fp32"
    """X in the forward GEMM."""
    weight_bp: str = "fp32"
    """W in the grad-input GEMM."""
    act_bp: str = "fp32"
    """X in the grad-weight GEMM."""
    grad_wgrad: str = "fp32"
    """dY in the grad-weight GEMM."""
    grad_dgrad: str = "fp32"
    """dY in the grad-input GEMM."""
    norm_affine: str = "fp32"
    """LayerNorm/RMSNorm affine weight (and bias)."""
    elementwise: str = "fp32"
    """Norm/activation/softmax internals and GEMM outputs: ``bf16``, ``fp16`` or ``fp32``."""
    block_size: int = 32
    """Elements sharing one E8M0 scale."""
    scale_mode: str = "floor"
    """How the shared scale is chosen: one of :data:`SCALE_MODES`."""
    rounding: str = "even"
    """How elements round: one of :data:`ROUNDINGS`."""
    quantize_backprop: bool = True
    """When false the backward GEMMs see unquantized operands whatever the backward roles say
    (microxcaling's ``quantize_backprop``)."""
    nvfp4_scale: str = "amax"
    """NVFP4 roles: ``amax`` (two-level: an FP32 per-tensor scale amax / 2688 on top of the
    E4M3 block scales, NVIDIA's recipe) or ``none`` (single-level)."""
    nvfp4_weight_tile: str = "1x16"
    """NVFP4 weight roles: ``1x16`` blocks along in-features, or ``16x16`` tiles, so that the
    forward and the grad-input GEMM see the same quantized weight (NVIDIA's recipe)."""
    nvfp4_grad_rounding: str = "even"
    """NVFP4 gradient roles (``grad_wgrad``, ``grad_dgrad``): ``even`` or ``stochastic``
    (NVIDIA's recipe); the other NVFP4 roles round to nearest-even. ``rounding`` is for MX."""
    nvfp4_wgrad_rht: str = "off"
    """``on``: a linear's weight-gradient GEMM multiplies both operands, 16 tokens at a time, by
    a random Hadamard matrix before quantizing them when either of its roles (``grad_wgrad``,
    ``act_bp``) is NVFP4 (NVIDIA's recipe; :mod:`mxprobe.hadamard`). Exact without
    quantization; the signs change every step (:mod:`mxprobe.nvfp4_random`)."""

    def __post_init__(self) -> None:
        # object.__setattr__ because the dataclass is frozen; canonical names make == meaningful.
        for role in ROLES:
            try:
                value = canonical_format(getattr(self, role))
            except ValueError as exc:
                raise ValueError(f"{role}: {exc}") from None
            object.__setattr__(self, role, value)
        if self.elementwise not in PLAIN_FORMATS:
            raise ValueError(
                f"elementwise must be one of {', '.join(PLAIN_FORMATS)}, got "
                f"{self.elementwise!r}: MX formats need blocks and apply only to GEMM operands "
                "and norm_affine"
            )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int, got {self.block_size!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        for field, choices in (("scale_mode", SCALE_MODES), ("rounding", ROUNDINGS)):
            value = getattr(self, field)
            if str(value).lower() not in choices:
                raise ValueError(f"unknown {field} {value!r}; expected one of {', '.join(choices)}")
            object.__setattr__(self, field, str(value).lower())
        if not isinstance(self.quantize_backprop, bool):
            raise TypeError(f"quantize_backprop must be a bool, got {self.quantize_backprop!r}")
        for field, choices in _NVFP4_SETTINGS.items():
            check_choice(str(getattr(self, field)).lower(), choices, field)
            object.__setattr__(self, field, str(getattr(self, field)).lower())

    def inert_settings(self) -> dict[str, str]:
        """{key: why} of the block/scale/rounding settings set away from their default that no
        role of this scheme uses (e.g. ``nvfp4,round=stochastic``: ``round`` is for MX roles),
        so they would change nothing. :func:`parse_scheme` refuses a scheme with any."""
        formats = {r: getattr(self, r) for r in ROLES}
        if not self.quantize_backprop:  # the backward roles see unquantized operands
            formats.update(dict.fromkeys(BACKWARD_ROLES, "fp32"))
        mx_roles = [r for r, f in formats.items() if is_mx(f)]
        inert = {}
        for key, field, default, roles, fmt in _SETTING_SCOPES:
            value = getattr(self, field)
            wanted = mx_roles if fmt == "mx" else [r for r in roles if formats[r] == NVFP4]
            if value != default and not wanted:
                where = "any role" if fmt == "mx" else " or ".join(roles)
                inert[key] = (
                    f"{key}={str(value).lower()} would have no effect: it applies to {fmt} "
                    f"formats and no {fmt} format is set for {where}"
                    + ("" if self.quantize_backprop or fmt == "mx" else " (backprop=false)")
                    + f"; drop it or set {key}={str(default).lower()}"
                )
        return inert

    @classmethod
    def parse(cls, text: str) -> PrecisionScheme:
        """Parse the string form (see the module docstring); ``parse(str(s)) == s``."""
        return cls().amend(text)

    def amend(self, text: str) -> PrecisionScheme:
        """A copy with the ``key=value`` items of ``text`` applied.

        A leading preset name replaces this scheme entirely before the items are applied.
        """
        preset, changes = _split(text)
        try:
            return dataclasses.replace(preset or self, **changes)
        except ValueError as exc:
            raise ValueError(f"{exc} (in scheme {text!r})") from None

    def __str__(self) -> str:
        for name, preset in PRESETS.items():
            if preset == self:
                return name
        role_keys = [("w", "weight"), ("a", "act")]
        if len({getattr(self, role) for role in BACKWARD_ROLES}) == 1:
            role_keys.append(("bp", "weight_bp"))
        else:
            role_keys += [
                ("w_bp", "weight_bp"),
                ("a_bp", "act_bp"),
                ("g_wgrad", "grad_wgrad"),
                ("g_dgrad", "grad_dgrad"),
            ]
        role_keys += [("norm", "norm_affine"), ("elem", "elementwise")]
        # Unnamed roles parse as fp32 and settings as their defaults, so both are left out.
        items = [f"{k}={getattr(self, f)}" for k, f in role_keys if getattr(self, f) != "fp32"]
        for key, field, default in (
            ("block", "block_size", 32),
            ("scale", "scale_mode", "floor"),
            ("round", "rounding", "even"),
        ):
            if getattr(self, field) != default:
                items.append(f"{key}={getattr(self, field)}")
        if not self.quantize_backprop:
            items.append("backprop=false")
        for key, field, default in (
            ("nvscale", "nvfp4_scale", "amax"),
            ("nvtile", "nvfp4_weight_tile", "1x16"),
            ("nvgrad", "nvfp4_grad_rounding", "even"),
            ("nvrht", "nvfp4_wgrad_rht", "off"),
        ):
            if getattr(self, field) != default:
                items.append(f"{key}={getattr(self, field)}")
        return ",".join(items)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON/YAML values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrecisionScheme:
        """Inverse of :meth:`to_dict`; missing fields take their defaults.

        Raises:
            ValueError: for an unknown key (the message lists the fields) or a bad value.
        """
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in fields]
        if unknown:
            raise ValueError(
                f"unknown PrecisionScheme field(s) {', '.join(map(repr, unknown))}; "
                f"expected some of {', '.join(fields)}"
            )
        return cls(**d)

    @classmethod
    def from_mx_specs(cls, specs: Mapping[str, Any]) -> PrecisionScheme:
        """Import a microxcaling ``mx_specs`` dict.

        Mapping (microxcaling's ``mx.specs`` semantics):

        - ``w_elem_format`` -> ``weight``; ``a_elem_format`` -> ``act``.
        - ``w_elem_format_bp`` -> ``weight_bp`` (default: ``w_elem_format``).
        - ``a_elem_format_bp_ex`` -> ``act_bp``, the activation in the grad-weight GEMM.
        - ``a_elem_format_bp_os`` -> ``grad_wgrad`` and ``grad_dgrad``, the output gradient.
        - ``a_elem_format_bp`` -> default of the three roles above (itself defaulting to
          ``a_elem_format``).
        - ``norm_affine`` = the weight format, as in the paper's proxy (LayerNorm γ/β in MX).
          Upstream ``mx.LayerNorm`` only rounds γ/β elementwise per ``bfloat``; to mimic it,
          ``.amend("norm=bf16")`` (or ``norm=fp32`` when ``bfloat`` is 0).
        - ``bfloat``: 16 -> ``elementwise="bf16"``; 0 or missing -> ``"fp32"``.
        - ``round``: ``nearest`` (the default, ties away from zero), ``floor``, ``even``;
          ``dither``/``stochastic`` -> ``"stochastic"``. Scale mode is always ``floor``.
        - ``block_size`` (default 32), ``quantize_backprop`` (default true) pass through;
          ``scale_bits`` must be 8 (E8M0), 0 or missing.

        A missing or ``None`` format is "not given": forward roles become ``fp32`` and
        backward ones inherit as above, like microxcaling's ``finalize_mx_specs``; the string
        ``"none"`` (or ``"fp32"``) sets ``fp32`` explicitly.

        Raises:
            ValueError: for an unknown key (the message lists the accepted keys), an unsupported
                ``scale_bits``/``bfloat``/``round``/``block_size``, or an unknown format.
        """
        unknown = [k for k in specs if k not in _MX_SPECS_KEYS]
        if unknown:
            raise ValueError(
                f"unknown mx_specs key(s) {', '.join(map(repr, unknown))}; "
                f"accepted keys: {', '.join(_MX_SPECS_KEYS)}"
            )

        def given(key: str, default: Any) -> Any:
            value = specs.get(key)
            return default if value is None else value

        if given("scale_bits", 0) not in (0, 8):
            raise ValueError(
                f"unsupported scale_bits {specs['scale_bits']!r}: only E8M0 scales "
                "(scale_bits 8) are supported"
            )
        bfloat = given("bfloat", 0)
        if bfloat not in (0, 16):
            raise ValueError(f"unsupported bfloat {bfloat!r}; expected 0 or 16")
        rounding = str(given("round", "nearest")).lower()
        if rounding not in _MX_ROUNDINGS:
            raise ValueError(
                f"unsupported round {rounding!r}; expected one of {', '.join(_MX_ROUNDINGS)}"
            )
        if given("block_size", 32) == 0:
            raise ValueError("block_size 0 (one scale per tensor row) is not supported")
        weight = given("w_elem_format", "fp32")
        act = given("a_elem_format", "fp32")
        act_backward = given("a_elem_format_bp", act)
        output_grad = given("a_elem_format_bp_os", act_backward)
        return cls(
            weight=weight,
            act=act,
            weight_bp=given("w_elem_format_bp", weight),
            act_bp=given("a_elem_format_bp_ex", act_backward),
            grad_wgrad=output_grad,
            grad_dgrad=output_grad,
            norm_affine=weight,
            elementwise="bf16" if bfloat == 16 else "fp32",
            block_size=given("block_size", 32),
            rounding=_MX_ROUNDINGS[rounding],
            quantize_backprop=given("quantize_backprop", True),
        )


_MX_SPECS_KEYS = (
    "w_elem_format",
    "a_elem_format",
    "w_elem_format_bp",
    "a_elem_format_bp",
    "a_elem_format_bp_ex",
    "a_elem_format_bp_os",
    "block_size",
    "bfloat",
    "round",
    "quantize_backprop",
    "scale_bits",
)
# microxcaling's round values -> ours ("dither" is its name for stochastic rounding).
_MX_ROUNDINGS = {
    "nearest": "nearest",
    "floor": "floor",
    "even": "even",
    "dither": "stochastic",
    "stochastic": "stochastic",
}


def _all_gemm_and_norm(fmt: str) -> PrecisionScheme:
    return PrecisionScheme(**dict.fromkeys((*GEMM_ROLES, "norm_affine"), fmt), elementwise="bf16")


PRESETS: dict[str, PrecisionScheme] = {
    "fp32": PrecisionScheme(),
    # Every GEMM operand and the norms' affine weights in NVFP4 (two-level), as the MX presets.
    "nvfp4": _all_gemm_and_norm("nvfp4"),
    # NVIDIA's NVFP4 pretraining recipe: 16x16 weight tiles, stochastic rounding of gradients,
    # norms in bf16 (its BF16 layer exceptions are per-model overrides).
    "nvfp4_recipe": dataclasses.replace(
        _all_gemm_and_norm("nvfp4"),
        norm_affine="bf16",
        nvfp4_weight_tile="16x16",
        nvfp4_grad_rounding="stochastic",
        nvfp4_wgrad_rht="on",
    ),
    "bf16": PrecisionScheme(**dict.fromkeys(ROLES, "bf16")),
    "mxfp8_e4m3": _all_gemm_and_norm("fp8_e4m3"),
    "mxfp8_e5m2": _all_gemm_and_norm("fp8_e5m2"),
    "mxfp6_e2m3": _all_gemm_and_norm("fp6_e2m3"),
    "mxfp6_e3m2": _all_gemm_and_norm("fp6_e3m2"),
    "mxfp4_e2m1": _all_gemm_and_norm("fp4_e2m1"),
    "mx_mix": PrecisionScheme(
        weight="fp8_e4m3",
        act="fp8_e4m3",
        **dict.fromkeys(BACKWARD_ROLES, "fp8_e5m2"),
        norm_affine="fp8_e4m3",
        elementwise="bf16",
    ),
    "w_e4m3_a_bf16": PrecisionScheme(
        weight="fp8_e4m3",
        act="bf16",
        weight_bp="fp8_e4m3",
        act_bp="bf16",
        grad_wgrad="bf16",
        grad_dgrad="bf16",
        norm_affine="bf16",
        elementwise="bf16",
    ),
    "mxfp8_e4m3_fwd_only": PrecisionScheme(
        weight="fp8_e4m3",
        act="fp8_e4m3",
        norm_affine="fp8_e4m3",
        elementwise="bf16",
        quantize_backprop=False,
    ),
}


def named_roles(scheme: str | PrecisionScheme) -> set[str]:
    """The roles a scheme string names item by item (``"mxfp8_e4m3,norm=bf16"`` names
    ``norm_affine``; a preset or a ``PrecisionScheme`` names none: it sets every role)."""
    if isinstance(scheme, PrecisionScheme):
        return set()
    return set(_split(scheme)[1]) & set(ROLES)


def _split(text: str) -> tuple[PrecisionScheme | None, dict[str, Any]]:
    """The leading preset (if any) and the field changes of a scheme string."""
    if not isinstance(text, str):
        raise TypeError(f"a scheme string must be a str, got {type(text).__name__}")
    valid = (
        f"expected a preset ({', '.join(PRESETS)}) and/or key=value items with keys "
        f"{', '.join(_KEYS)}"
    )
    tokens = [token.strip() for token in text.split(",")]
    if tokens == [""]:
        raise ValueError(f"empty scheme string; {valid}")
    preset: PrecisionScheme | None = None
    changes: dict[str, Any] = {}
    seen: set[str] = set()
    for i, token in enumerate(tokens):
        if not token:
            raise ValueError(f"empty item in scheme {text!r}; {valid}")
        if "=" not in token:
            if token.lower() not in PRESETS:
                raise ValueError(f"unknown preset {token!r} in scheme {text!r}; {valid}")
            if token.lower() in (t.lower() for t in tokens[:i]):
                raise ValueError(f"duplicated item {token!r} in scheme {text!r}")
            if i > 0:
                raise ValueError(
                    f"preset {token!r} must be the first item of scheme {text!r}; "
                    "only one preset may be given"
                )
            preset = PRESETS[token.lower()]
            continue
        key, _, value = (part.strip() for part in token.partition("="))
        key = key.lower()
        if key not in _KEYS:
            raise ValueError(
                f"unknown key {key!r} in scheme {text!r}; expected one of {', '.join(_KEYS)}"
            )
        if key in seen:  # "norm=bf16,norm=fp32": which one was meant cannot be known
            raise ValueError(f"key {key!r} given twice in scheme {text!r}; give each key once")
        seen.add(key)
        for field in _KEYS[key]:
            changes[field] = _convert(key, value, text)
    return preset, changes


def _convert(key: str, value: str, text: str) -> Any:
    if key == "block":
        try:
            return int(value)
        except ValueError:
            raise ValueError(
                f"block must be a positive integer, got {value!r} (in scheme {text!r})"
            ) from None
    if key == "backprop":
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(
            f"backprop must be one of {', '.join(_TRUE + _FALSE)}, got {value!r} "
            f"(in scheme {text!r})"
        )
    return value


def parse_scheme(text_or_scheme: str | PrecisionScheme) -> PrecisionScheme:
    """A scheme to put in force, from its string form or as given.

    Raises:
        ValueError: a malformed string, or a setting that no role of the scheme uses
            (:meth:`PrecisionScheme.inert_settings`), e.g. ``mxfp8_e4m3,nvrht=on``.
    """
    scheme = (
        text_or_scheme
        if isinstance(text_or_scheme, PrecisionScheme)
        else PrecisionScheme.parse(text_or_scheme)
    )
    inert = scheme.inert_settings()
    if inert:
        shown = text_or_scheme if isinstance(text_or_scheme, str) else str(scheme)
        raise ValueError(f"{'; '.join(inert.values())} (in scheme {shown!r})")
    return scheme


def inert_settings_of(change: str | PrecisionScheme, result: PrecisionScheme) -> dict[str, str]:
    """:meth:`PrecisionScheme.inert_settings` of ``result``, the scheme ``change`` made (an
    override of a base or an amendment of a module's scheme), limited to the settings
    ``change`` itself sets: all of them for a scheme or a string that starts with a preset,
    else the keys it names. A setting inherited from the base that the change's roles no longer
    use is not the change's doing (``bp=bf16`` on ``nvfp4_recipe`` leaves ``nvgrad`` unused)."""
    inert = result.inert_settings()
    if isinstance(change, PrecisionScheme):
        return inert
    preset, changes = _split(change)
    if preset is not None:
        return inert
    named = {key for key, field, *_ in _SETTING_SCOPES if field in changes}
    return {key: why for key, why in inert.items() if key in named}


def matches_glob(name: str, pattern: str) -> bool:
    """Whether the qualified module name ``name`` matches the glob ``pattern``: the one rule for
    override globs, ``amend_scheme``/rule ``modules`` and the monitors' ``modules``.

    ``fnmatch.fnmatchcase`` on the dotted name (case-sensitive; ``*`` also crosses dots), and a
    glob with a leading ``*.`` also matches a top-level module: ``"*.lm_head"`` matches
    ``lm_head`` as well as ``model.decoder.lm_head``, as users expect from dotted paths.
    """
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase("." + name, pattern)


def resolve_scheme(
    name: str,
    base: PrecisionScheme,
    overrides: Mapping[str, str | PrecisionScheme] | None = None,
) -> PrecisionScheme:
    """The scheme of the module with qualified name ``name``.

    The first glob of ``overrides`` (in order, matched by :func:`matches_glob`) that matches
    ``name`` decides: a scheme is used as is, a string amends ``base`` (so a partial override
    follows later changes of the base scheme). No match gives ``base``.
    """
    for pattern, value in (overrides or {}).items():
        if matches_glob(name, pattern):
            return value if isinstance(value, PrecisionScheme) else base.amend(value)
    return base


def validate_overrides(overrides: Mapping[str, str | PrecisionScheme] | None) -> None:
    """Parse every override now, so a typo fails at setup rather than mid-run.

    Raises:
        ValueError: naming the glob and the bad value.
        TypeError: for a glob that is not a string or a value of the wrong type.
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(
            f"overrides must be a mapping {{glob: scheme}} or None, got {type(overrides).__name__}"
            f" {overrides!r}"
        )
    for pattern, value in (overrides or {}).items():
        if not isinstance(pattern, str):
            raise TypeError(f"override glob must be a str, got {pattern!r}")
        if isinstance(value, PrecisionScheme):
            continue
        if not isinstance(value, str):
            raise TypeError(
                f"override {pattern!r}: expected a PrecisionScheme or str, got {value!r}"
            )
        try:
            PrecisionScheme().amend(value)
        except ValueError as exc:
            raise ValueError(f"override {pattern!r} = {value!r}: {exc}") from None
