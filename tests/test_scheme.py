"""Tests for mxprobe.scheme: presets, string form, dict form, mx_specs import, overrides."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mxprobe
from mxprobe import scheme as scheme_module
from mxprobe.formats import MX_FORMAT_NAMES, PLAIN_FORMATS, canonical_format
from mxprobe.scheme import (
    BACKWARD_ROLES,
    PRESETS,
    ROLES,
    ROUNDINGS,
    SCALE_MODES,
    PrecisionScheme,
    parse_scheme,
    resolve_scheme,
    validate_overrides,
)

E4M3, E5M2 = "fp8_e4m3", "fp8_e5m2"
HYPOTHESIS = settings(max_examples=200, derandomize=True, deadline=None)

# Expected role tables, written out independently of the implementation:
# (weight, act, weight_bp, act_bp, grad_wgrad, grad_dgrad, norm_affine, elementwise), backprop.
EXPECTED_PRESETS = {
    "fp32": (("fp32",) * 8, True),
    "bf16": (("bf16",) * 8, True),
    "mxfp8_e4m3": ((E4M3,) * 7 + ("bf16",), True),
    "mxfp8_e5m2": ((E5M2,) * 7 + ("bf16",), True),
    "mxfp6_e2m3": (("fp6_e2m3",) * 7 + ("bf16",), True),
    "mxfp6_e3m2": (("fp6_e3m2",) * 7 + ("bf16",), True),
    "mxfp4_e2m1": (("fp4_e2m1",) * 7 + ("bf16",), True),
    "mx_mix": ((E4M3, E4M3, E5M2, E5M2, E5M2, E5M2, E4M3, "bf16"), True),
    "w_e4m3_a_bf16": ((E4M3, "bf16", E4M3, "bf16", "bf16", "bf16", "bf16", "bf16"), True),
    "mxfp8_e4m3_fwd_only": ((E4M3, E4M3, "fp32", "fp32", "fp32", "fp32", E4M3, "bf16"), False),
    "nvfp4": (("nvfp4",) * 7 + ("bf16",), True),
    "nvfp4_recipe": (("nvfp4",) * 6 + ("bf16", "bf16"), True),
}


def roles_of(s: PrecisionScheme) -> tuple[str, ...]:
    return tuple(getattr(s, role) for role in ROLES)


# --- roles and presets ----------------------------------------------------------------------


def test_roles_are_the_eight_design_roles_in_order():
    assert ROLES == (
        "weight",
        "act",
        "weight_bp",
        "act_bp",
        "grad_wgrad",
        "grad_dgrad",
        "norm_affine",
        "elementwise",
    )
    assert BACKWARD_ROLES == ("weight_bp", "act_bp", "grad_wgrad", "grad_dgrad")
    assert [f.name for f in dataclasses.fields(PrecisionScheme)][:8] == list(ROLES)


def test_default_scheme_touches_nothing():
    s = PrecisionScheme()
    assert roles_of(s) == ("fp32",) * 8
    assert (s.block_size, s.scale_mode, s.rounding, s.quantize_backprop) == (
        32,
        "floor",
        "even",
        True,
    )


def test_preset_names():
    assert set(PRESETS) == set(EXPECTED_PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_role_table(name):
    roles, backprop = EXPECTED_PRESETS[name]
    preset = PRESETS[name]
    assert roles_of(preset) == roles
    assert preset.quantize_backprop is backprop
    assert (preset.block_size, preset.scale_mode, preset.rounding) == (32, "floor", "even")


def test_module_docstring_table_matches_presets():
    header, *rows = (
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in scheme_module.__doc__.splitlines()
        if line.startswith(("| preset", "| `"))
    )
    # The columns are the string-form keys of the roles, in role order.
    assert header == [
        "preset",
        "w",
        "a",
        "w_bp",
        "a_bp",
        "g_wgrad",
        "g_dgrad",
        "norm",
        "elem",
        "backprop",
    ]
    assert {row[0].strip("`") for row in rows} == set(PRESETS)
    for row in rows:
        preset = PRESETS[row[0].strip("`")]
        assert tuple(canonical_format(cell) for cell in row[1:9]) == roles_of(preset), row[0]
        assert row[9] == str(preset.quantize_backprop).lower(), row[0]


# --- construction ---------------------------------------------------------------------------


def test_constructor_canonicalises_aliases_and_none():
    s = PrecisionScheme(
        weight="e4m3",
        act="MXFP8_E5M2",
        weight_bp=None,
        elementwise="bfloat16",
        scale_mode="RCEIL",
        rounding="Stochastic",
    )
    assert (s.weight, s.act, s.weight_bp, s.elementwise) == (E4M3, E5M2, "fp32", "bf16")
    assert (s.scale_mode, s.rounding) == ("rceil", "stochastic")
    assert s == PrecisionScheme(
        weight=E4M3, act=E5M2, elementwise="bf16", scale_mode="rceil", rounding="stochastic"
    )


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"weight": "e4m4"}, ["weight", "'e4m4'", "fp8_e4m3", "bf16"]),
        ({"norm_affine": "int4"}, ["norm_affine", "'int4'", "fp4_e2m1"]),
        ({"elementwise": "e4m3"}, ["elementwise", "'fp8_e4m3'", "bf16, fp16, fp32"]),
        ({"block_size": 0}, ["block_size", "0"]),
        ({"scale_mode": "round"}, ["scale_mode", "'round'", "floor, rceil, ceil, even"]),
        ({"rounding": "up"}, ["rounding", "'up'", "even, nearest, floor, stochastic"]),
    ],
)
def test_constructor_rejects_bad_values(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        PrecisionScheme(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "kwargs", [{"block_size": "32"}, {"block_size": True}, {"quantize_backprop": "yes"}]
)
def test_constructor_rejects_wrong_types(kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        PrecisionScheme(**kwargs)


# --- string form ----------------------------------------------------------------------------


def test_parse_forward_e4m3_backward_e5m2_touches_nothing_else():
    s = PrecisionScheme.parse("w=e4m3,a=e4m3,bp=e5m2")
    assert roles_of(s) == (E4M3, E4M3, E5M2, E5M2, E5M2, E5M2, "fp32", "fp32")
    assert (s.block_size, s.scale_mode, s.rounding, s.quantize_backprop) == (
        32,
        "floor",
        "even",
        True,
    )


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_parse_preset_name(name):
    assert PrecisionScheme.parse(name) == PRESETS[name]
    assert str(PRESETS[name]) == name


def test_parse_preset_amended():
    s = PrecisionScheme.parse("mxfp8_e4m3,norm=bf16")
    assert s == dataclasses.replace(PRESETS["mxfp8_e4m3"], norm_affine="bf16")


def test_parse_later_keys_override_earlier():
    s = PrecisionScheme.parse("bp=e5m2,g_dgrad=fp32")
    assert roles_of(s) == ("fp32", "fp32", E5M2, E5M2, E5M2, "fp32", "fp32", "fp32")


@pytest.mark.parametrize(
    "text", ["w=e4m3,w=e2m1", "mxfp8_e4m3,norm=bf16,norm=fp32", "bp=e5m2,BP=e4m3"]
)
def test_a_key_given_twice_is_refused_naming_it(text):
    key = text.split(",")[-1].split("=")[0].lower()
    with pytest.raises(ValueError, match=f"key '{key}' given twice"):
        PrecisionScheme.parse(text)


@pytest.mark.parametrize("overrides", ["x*", ["*.fc1"], 3])
def test_overrides_of_the_wrong_type_are_a_type_error_naming_the_argument(overrides):
    with pytest.raises(TypeError, match="overrides must be a mapping"):
        validate_overrides(overrides)


def test_parse_every_key():
    s = PrecisionScheme.parse(
        "w=e2m1,a=e3m2,w_bp=e2m3,a_bp=int8,g_wgrad=e5m2,g_dgrad=bf16,norm=fp16,elem=fp16,"
        "block=16,scale=rceil,round=stochastic,backprop=false"
    )
    assert roles_of(s) == ("fp4_e2m1", "fp6_e3m2", "fp6_e2m3", "int8", E5M2, "bf16", "fp16", "fp16")
    assert (s.block_size, s.scale_mode, s.rounding, s.quantize_backprop) == (
        16,
        "rceil",
        "stochastic",
        False,
    )


def test_parse_tolerates_whitespace():
    assert PrecisionScheme.parse("  mxfp8_e4m3 ,  norm = bf16 , block= 64 ") == dataclasses.replace(
        PRESETS["mxfp8_e4m3"], norm_affine="bf16", block_size=64
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("1", True), ("yes", True), ("False", False), ("0", False), ("no", False)],
)
def test_parse_backprop_values(text, value):
    assert PrecisionScheme.parse(f"backprop={text}").quantize_backprop is value


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["empty", "mxfp8_e4m3", "g_wgrad"]),
        ("   ", ["empty"]),
        ("w=e4m3,,a=e4m3", ["empty item"]),
        ("wt=e4m3", ["'wt'", "w, a, w_bp, a_bp, g_wgrad, g_dgrad, bp, norm, elem, block"]),
        ("mxfp9", ["'mxfp9'", "mxfp8_e4m3", "mx_mix", "w_e4m3_a_bf16"]),
        ("mxfp8_e4m3,mxfp8_e4m3", ["duplicated", "'mxfp8_e4m3'"]),
        ("mxfp8_e4m3,bf16", ["'bf16'", "first"]),
        ("norm=bf16,mxfp8_e4m3", ["'mxfp8_e4m3'", "first"]),
        ("w=e4m4", ["'e4m4'", "fp8_e4m3", "weight"]),
        ("w=", ["''", "fp8_e4m3"]),
        ("elem=e4m3", ["elementwise", "'fp8_e4m3'", "bf16, fp16, fp32"]),
        ("block=abc", ["block", "'abc'"]),
        ("block=0", ["block_size", "0"]),
        ("scale=up", ["'up'", "floor, rceil, ceil, even"]),
        ("round=up", ["'up'", "even, nearest, floor, stochastic"]),
        ("backprop=maybe", ["'maybe'", "true", "no"]),
    ],
)
def test_parse_errors_name_the_bad_value_and_the_choices(text, fragments):
    with pytest.raises(ValueError) as info:
        PrecisionScheme.parse(text)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_str_short_forms():
    assert str(PrecisionScheme.parse("w=e4m3,a=e4m3,bp=e5m2")) == (
        "w=fp8_e4m3,a=fp8_e4m3,bp=fp8_e5m2"
    )
    assert str(PrecisionScheme.parse("mxfp8_e4m3,block=16,scale=rceil")) == (
        "w=fp8_e4m3,a=fp8_e4m3,bp=fp8_e4m3,norm=fp8_e4m3,elem=bf16,block=16,scale=rceil"
    )
    assert str(PrecisionScheme.parse("g_dgrad=e5m2,round=nearest,backprop=no")) == (
        "g_dgrad=fp8_e5m2,round=nearest,backprop=false"
    )
    assert str(PrecisionScheme.parse("block=32,elem=fp32,bp=fp32")) == "fp32"


def test_parse_scheme_passes_schemes_through():
    s = PrecisionScheme(weight=E4M3)
    assert parse_scheme(s) is s
    assert parse_scheme("w=e4m3") == s


def test_amend_keeps_unnamed_fields_and_returns_a_new_scheme():
    base = PRESETS["mx_mix"]
    amended = base.amend("norm=bf16,block=64")
    assert amended == dataclasses.replace(base, norm_affine="bf16", block_size=64)
    assert base == PrecisionScheme.parse("mx_mix")
    assert base.amend("bf16,w=e4m3") == dataclasses.replace(PRESETS["bf16"], weight=E4M3)


# --- random schemes -------------------------------------------------------------------------

ALIASES = ("e4m3", "e5m2", "e2m3", "e3m2", "e2m1", "mxint8", "bfloat16", "half", "none")
FORMATS = st.sampled_from(MX_FORMAT_NAMES + PLAIN_FORMATS + ALIASES)
ELEMENTWISE = st.sampled_from(PLAIN_FORMATS + ("bfloat16", "half", "none"))


@st.composite
def random_schemes(draw: st.DrawFn) -> PrecisionScheme:
    roles = {role: draw(FORMATS) for role in ROLES[:-1]}
    if draw(st.booleans()):  # agreeing backward roles exercise the "bp=" short form
        roles |= dict.fromkeys(BACKWARD_ROLES, draw(FORMATS))
    return PrecisionScheme(
        **roles,
        elementwise=draw(ELEMENTWISE),
        block_size=draw(st.one_of(st.just(32), st.integers(1, 4096))),
        scale_mode=draw(st.sampled_from(SCALE_MODES)),
        rounding=draw(st.sampled_from(ROUNDINGS)),
        quantize_backprop=draw(st.booleans()),
    )


SCHEMES = st.one_of(st.sampled_from(list(PRESETS.values())), random_schemes())


@HYPOTHESIS
@given(SCHEMES)
def test_str_round_trips(s):
    text = str(s)
    assert PrecisionScheme.parse(text) == s
    if not s.inert_settings():  # parse_scheme refuses the rest (tested below)
        assert parse_scheme(text) == s
    assert (text in PRESETS) == (s in PRESETS.values())


@HYPOTHESIS
@given(SCHEMES)
def test_dict_round_trips_through_json(s):
    d = s.to_dict()
    assert list(d) == [f.name for f in dataclasses.fields(PrecisionScheme)]
    assert PrecisionScheme.from_dict(json.loads(json.dumps(d))) == s


# The test's own copy of what each key sets, and text values valid for it.
KEY_FIELDS = {
    "w": ["weight"],
    "a": ["act"],
    "w_bp": ["weight_bp"],
    "a_bp": ["act_bp"],
    "g_wgrad": ["grad_wgrad"],
    "g_dgrad": ["grad_dgrad"],
    "norm": ["norm_affine"],
    "elem": ["elementwise"],
    "bp": ["weight_bp", "act_bp", "grad_wgrad", "grad_dgrad"],
    "block": ["block_size"],
    "scale": ["scale_mode"],
    "round": ["rounding"],
    "backprop": ["quantize_backprop"],
}
BOOL_TEXT = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
ITEMS = st.one_of(
    st.tuples(
        st.sampled_from(["w", "a", "w_bp", "a_bp", "g_wgrad", "g_dgrad", "norm", "bp"]), FORMATS
    ),
    st.tuples(st.just("elem"), ELEMENTWISE),
    st.tuples(st.just("block"), st.integers(1, 512).map(str)),
    st.tuples(st.just("scale"), st.sampled_from(SCALE_MODES)),
    st.tuples(st.just("round"), st.sampled_from(ROUNDINGS)),
    st.tuples(st.just("backprop"), st.sampled_from(sorted(BOOL_TEXT))),
)


@HYPOTHESIS
@given(SCHEMES, st.lists(ITEMS, min_size=1, max_size=6, unique_by=lambda item: item[0]))
def test_amend_applies_items_in_order(s, items):
    expected = s.to_dict()
    for key, value in items:
        for field in KEY_FIELDS[key]:
            if key == "block":
                expected[field] = int(value)
            elif key == "backprop":
                expected[field] = BOOL_TEXT[value]
            else:
                expected[field] = value
    amended = s.amend(",".join(f"{key}={value}" for key, value in items))
    assert amended == PrecisionScheme(**expected)


def test_from_dict_partial_and_unknown_keys():
    assert PrecisionScheme.from_dict({"weight": "e4m3"}) == PrecisionScheme(weight=E4M3)
    with pytest.raises(ValueError) as info:
        PrecisionScheme.from_dict({"weight": "e4m3", "wieght": "e4m3"})
    assert "'wieght'" in str(info.value)
    assert "norm_affine" in str(info.value)
    assert "quantize_backprop" in str(info.value)


# --- microxcaling mx_specs ------------------------------------------------------------------

PROXY_SPECS = {
    "w_elem_format": "fp8_e4m3",
    "a_elem_format": "fp8_e4m3",
    "w_elem_format_bp": "fp8_e4m3",
    "a_elem_format_bp_ex": "fp8_e4m3",
    "a_elem_format_bp_os": "fp8_e4m3",
    "block_size": 32,
    "scale_bits": 8,
    "bfloat": 16,
}
LLM_SPECS = {
    "w_elem_format": "fp8_e4m3",
    "a_elem_format": "fp8_e5m2",
    "block_size": 32,
    "bfloat": 16,
    "quantize_backprop": True,
    "scale_bits": 8,
}


def test_from_mx_specs_paper_proxy():
    s = PrecisionScheme.from_mx_specs(PROXY_SPECS)
    assert roles_of(s) == (E4M3,) * 7 + ("bf16",)
    assert (s.block_size, s.scale_mode, s.rounding, s.quantize_backprop) == (
        32,
        "floor",
        "nearest",
        True,
    )
    assert s == dataclasses.replace(PRESETS["mxfp8_e4m3"], rounding="nearest")


def test_from_mx_specs_paper_llm():
    s = PrecisionScheme.from_mx_specs(LLM_SPECS)
    assert roles_of(s) == (E4M3, E5M2, E4M3, E5M2, E5M2, E5M2, E4M3, "bf16")
    assert s.quantize_backprop is True


def test_from_mx_specs_backward_defaults():
    s = PrecisionScheme.from_mx_specs(
        {"w_elem_format": "fp8_e4m3", "a_elem_format": "fp8_e4m3", "a_elem_format_bp": "fp8_e5m2"}
    )
    assert roles_of(s)[:6] == (E4M3, E4M3, E4M3, E5M2, E5M2, E5M2)
    s = PrecisionScheme.from_mx_specs(
        {
            "a_elem_format": "fp6_e2m3",
            "a_elem_format_bp": "fp8_e5m2",
            "a_elem_format_bp_ex": None,
            "a_elem_format_bp_os": "fp8_e4m3",
        }
    )
    assert (s.act, s.act_bp, s.grad_wgrad, s.grad_dgrad) == ("fp6_e2m3", E5M2, E4M3, E4M3)
    s = PrecisionScheme.from_mx_specs({"w_elem_format": "fp8_e4m3", "w_elem_format_bp": "none"})
    assert (s.weight, s.weight_bp, s.norm_affine, s.act) == (E4M3, "fp32", E4M3, "fp32")


def test_from_mx_specs_empty_is_unquantized_with_microxcaling_rounding():
    assert PrecisionScheme.from_mx_specs({}) == PrecisionScheme(rounding="nearest")


@pytest.mark.parametrize(
    ("mx_round", "rounding"),
    [
        ("nearest", "nearest"),
        ("floor", "floor"),
        ("even", "even"),
        ("dither", "stochastic"),
        ("stochastic", "stochastic"),
    ],
)
def test_from_mx_specs_rounding(mx_round, rounding):
    assert PrecisionScheme.from_mx_specs({"round": mx_round}).rounding == rounding


def test_from_mx_specs_passes_block_size_and_backprop():
    s = PrecisionScheme.from_mx_specs(LLM_SPECS | {"block_size": 16, "quantize_backprop": False})
    assert (s.block_size, s.quantize_backprop) == (16, False)
    assert PrecisionScheme.from_mx_specs({"scale_bits": 0, "bfloat": 0}).elementwise == "fp32"


@pytest.mark.parametrize(
    ("specs", "fragments"),
    [
        (PROXY_SPECS | {"fp": 16}, ["'fp'", "w_elem_format", "a_elem_format_bp_os", "scale_bits"]),
        ({"scale_bits": 5}, ["5", "E8M0"]),
        ({"bfloat": 12}, ["12", "0 or 16"]),
        ({"round": "up"}, ["'up'", "nearest", "dither"]),
        ({"block_size": 0}, ["block_size 0"]),
        ({"w_elem_format": "int4"}, ["weight", "'int4'"]),
    ],
)
def test_from_mx_specs_errors(specs, fragments):
    with pytest.raises(ValueError) as info:
        PrecisionScheme.from_mx_specs(specs)
    for fragment in fragments:
        assert fragment in str(info.value)


# --- per-layer overrides --------------------------------------------------------------------


def test_resolve_scheme_first_matching_glob_wins():
    base = PRESETS["mxfp8_e4m3"]
    overrides = {
        "blocks.0.*": "fp32",
        "blocks.*.norm*": "norm=bf16",
        "*.norm1": PRESETS["bf16"],
        "head": PRESETS["mx_mix"],
    }
    assert resolve_scheme("blocks.0.norm1", base, overrides) == PRESETS["fp32"]
    assert resolve_scheme("blocks.1.norm1", base, overrides) == base.amend("norm=bf16")
    assert resolve_scheme("layers.1.norm1", base, overrides) is PRESETS["bf16"]
    assert resolve_scheme("head", base, overrides) is PRESETS["mx_mix"]
    assert resolve_scheme("blocks.1.mlp.fc1", base, overrides) is base
    assert resolve_scheme("Head", base, overrides) is base  # case-sensitive
    assert resolve_scheme("head", base, None) is base


def test_resolve_scheme_partial_follows_the_base():
    overrides = {"*.norm": "norm=bf16"}
    for base in PRESETS.values():
        resolved = resolve_scheme("block.norm", base, overrides)
        assert resolved == dataclasses.replace(base, norm_affine="bf16")


def test_validate_overrides():
    validate_overrides(None)
    validate_overrides({"a.*": "mxfp8_e4m3,norm=bf16", "b": PRESETS["fp32"], "c": "bp=e5m2"})
    with pytest.raises(ValueError) as info:
        validate_overrides({"a.*": "fp32", "blocks.*.attn": "w=e4m4"})
    assert "'blocks.*.attn'" in str(info.value)
    assert "'e4m4'" in str(info.value)
    with pytest.raises(ValueError, match="'lm_head'.*'nrom'"):
        validate_overrides({"lm_head": "nrom=bf16"})
    with pytest.raises(TypeError, match="'x'"):
        validate_overrides({"x": 3})


def test_leading_star_dot_glob_matches_top_level_module():
    from mxprobe.scheme import PRESETS, resolve_scheme

    base = PRESETS["mxfp8_e4m3"]
    assert resolve_scheme("lm_head", base, {"*.lm_head": "fp32"}) == PRESETS["fp32"]
    assert resolve_scheme("model.lm_head", base, {"*.lm_head": "fp32"}) == PRESETS["fp32"]
    assert resolve_scheme("lm_head_x", base, {"*.lm_head": "fp32"}) == base


@pytest.mark.parametrize(
    "text, key",
    [
        ("nvfp4,round=stochastic", "round"),  # round is for MX roles, nvgrad for NVFP4's
        ("nvfp4,scale=rceil", "scale"),
        ("fp32,block=16", "block"),
        ("mxfp8_e4m3,nvrht=on", "nvrht"),
        ("mxfp8_e4m3,nvscale=none", "nvscale"),
        ("a=nvfp4,w=bf16,nvtile=16x16", "nvtile"),  # the weight roles are not NVFP4
        ("nvfp4_recipe,g_wgrad=e4m3,a_bp=e4m3", "nvrht"),  # NVFP4 left the wgrad GEMM
        ("nvfp4,backprop=false,nvgrad=stochastic", "nvgrad"),  # the backward is unquantized
    ],
)
def test_a_setting_no_role_uses_is_refused_when_put_in_force(text, key):
    scheme = PrecisionScheme.parse(text)  # a well-formed scheme ...
    assert list(scheme.inert_settings()) == [key]
    with pytest.raises(ValueError, match=rf"^{key}=\S+ would have no effect: .*set {key}="):
        parse_scheme(text)  # ... that convert/set_scheme refuse: it would change nothing
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match=f"{key}="):
        mxprobe.convert(model, text)
    assert type(model[0]) is nn.Linear  # refused before anything changed


@pytest.mark.parametrize(
    "text", ["nvfp4_recipe", "nvfp4_recipe,norm=nvfp4", "w=nvfp4,nvtile=16x16",
             "g_wgrad=nvfp4,nvrht=on", "mxfp8_e4m3,round=stochastic,block=16", "nvfp4,nvscale=none"]
)  # fmt: skip
def test_settings_that_apply_are_accepted(text):
    assert parse_scheme(text).inert_settings() == {}


def test_an_amendment_must_apply_to_some_module_it_amends():
    model = mxprobe.convert(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)), "mxfp8_e4m3")
    with pytest.raises(ValueError, match="nvgrad=stochastic would have no effect"):
        mxprobe.amend_scheme(model, "nvgrad=stochastic")
    assert model[0].mx_scheme == PrecisionScheme.parse("mxfp8_e4m3")  # untouched
    # Enough that one amended module uses it: the other (bf16) simply has no NVFP4 gradient.
    mxprobe.set_scheme(model, "mxfp8_e4m3", overrides={"1": "bf16"})
    mxprobe.amend_scheme(model, "bp=nvfp4,nvgrad=stochastic", modules="0")
    mxprobe.amend_scheme(model, "nvrht=on")
    assert model[0].mx_scheme.nvfp4_wgrad_rht == "on" and model[1].mx_scheme.weight == "bf16"


def test_an_override_that_sets_a_setting_its_modules_do_not_use_is_refused():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"^override '1' = 'nvrht=on': nvrht=on would have no"):
        mxprobe.convert(model, "mxfp8_e4m3", overrides={"1": "nvrht=on"})
    assert type(model[1]) is nn.Linear  # refused before anything changed
    with pytest.raises(ValueError, match="round=stochastic would have no effect"):
        mxprobe.convert(
            model, "mxfp8_e4m3", overrides={"1": PrecisionScheme.parse("nvfp4,round=stochastic")}
        )


def test_settings_a_change_inherits_but_does_not_set_are_not_its_doing():
    """bp=bf16 on NVIDIA's recipe leaves its nvgrad/nvrht unused on those modules: the override
    or the rule asked for exactly that, so it is accepted (only keys it names are checked)."""
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    mxprobe.convert(model, "nvfp4_recipe", overrides={"1": "bp=bf16"})
    assert model[1].mx_scheme.grad_wgrad == "bf16" and model[1].mx_scheme.nvfp4_wgrad_rht == "on"
    mxprobe.amend_scheme(model, "bp=bf16")  # a mid-run switch of the backward to bf16
    assert model[0].mx_scheme.grad_dgrad == "bf16"
    with pytest.raises(ValueError, match="nvrht=on would have no effect"):
        mxprobe.amend_scheme(model, "nvrht=on")  # named, and no amended module uses it
