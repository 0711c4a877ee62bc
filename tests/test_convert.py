"""convert / set_scheme / describe: a precision switch is an attribute change, nothing else.

Parameters, ``state_dict`` keys and optimizer state must survive conversion and any number of
switches; the ``fp32`` scheme must give back the unconverted model to the bit.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mxprobe import (
    PrecisionScheme,
    amend_scheme,
    convert,
    describe,
    full_precision,
    module_names,
    quantize_mx,
    restore_schemes,
    schemes_of,
    set_scheme,
)
from mxprobe.modules import MxGELU, MxLayerNorm, MxLinear, MxRMSNorm
from mxprobe.scheme import BACKWARD_ROLES, ROLES

D = 32


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Head(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, 16, bias=False)

    def forward(self, x):
        return self.lm_head(self.norm(x))


class TinyLM(nn.Module):
    """Module names: blocks.{0,1}.{norm,fc1,act,fc2}, head.{norm,lm_head}."""

    def __init__(self, d: int = D):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = Head(d)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def batch(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def inputs() -> torch.Tensor:
    return 2.0 * batch(1, 2, 5, D)


def test_convert_keeps_parameters_keys_and_module_objects():
    model = tiny_lm()
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    keys = list(model.state_dict())

    assert convert(model, "mxfp8_e4m3") is model

    assert list(model.state_dict()) == keys
    after = dict(model.named_parameters())
    assert list(after) == list(params)
    assert all(after[name] is p for name, p in params.items())
    assert all(dict(model.named_modules())[name] is m for name, m in modules.items())
    assert type(model.blocks[0].fc1) is MxLinear
    assert type(model.blocks[0].norm) is MxLayerNorm
    assert type(model.blocks[0].act) is MxGELU
    assert type(model.head.norm) is MxRMSNorm
    assert type(model.blocks) is nn.ModuleList


def adam_steps(model, opt, n: int, seed: int) -> list[float]:
    losses = []
    for i in range(n):
        x, target = batch(seed + i, 4, 3, D), batch(seed + 100 + i, 4, 3, 16)
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_optimizer_state_survives_convert_and_switches_mid_training():
    model = tiny_lm()
    params = list(model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    adam_steps(model, opt, 2, seed=10)  # unconverted: state exists before convert
    state_ids = {id(p) for p in opt.state}

    convert(model, "mxfp8_e4m3")
    adam_steps(model, opt, 2, seed=20)
    set_scheme(model, "mx_mix", overrides={"head.*": "fp32"})
    adam_steps(model, opt, 2, seed=30)
    amend_scheme(model, "norm=bf16", "blocks.*")
    adam_steps(model, opt, 2, seed=40)
    set_scheme(model, "fp32")
    losses = adam_steps(model, opt, 1, seed=50)

    assert all(torch.isfinite(torch.tensor(losses)))
    assert list(model.parameters()) == params and all(
        a is b for a, b in zip(model.parameters(), params, strict=True)
    )
    assert {id(p) for p in opt.state} == state_ids == {id(p) for p in params}
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params, strict=True))
    # One state per parameter, carried through every switch: 9 steps in all.
    assert all(int(opt.state[p]["step"]) == 9 for p in params)
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in params)


def test_fp32_scheme_reproduces_unconverted_model_bit_for_bit():
    model = tiny_lm()
    reference = copy.deepcopy(model)
    x = inputs()
    convert(model, "mxfp8_e4m3")
    assert not torch.equal(model(x), reference(x))

    set_scheme(model, "fp32")
    out, ref_out = model(x), reference(x)
    assert torch.equal(out, ref_out)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, p_ref.grad), name


def test_fp32_scheme_reproduces_wide_linear_with_bias():
    torch.manual_seed(0)
    lin = nn.Linear(512, 64)
    reference = copy.deepcopy(lin)
    convert(lin, "fp32")
    x = batch(2, 2, 16, 512)
    assert torch.equal(lin(x), reference(x))


def test_convert_twice_is_set_scheme():
    overrides = {"head.*": "fp32"}
    twice = convert(convert(tiny_lm(), "mxfp8_e4m3", overrides), "mx_mix", overrides)
    switched = set_scheme(convert(tiny_lm(), "mxfp8_e4m3", overrides), "mx_mix", overrides)
    classes = [type(m) for m in twice.modules()]
    assert classes == [type(m) for m in switched.modules()]
    assert schemes_of(twice) == schemes_of(switched)
    assert schemes_of(twice)["blocks.0.fc1"] == PrecisionScheme.parse("mx_mix")
    assert schemes_of(twice)["head.lm_head"] == PrecisionScheme()
    assert torch.equal(twice(inputs()), switched(inputs()))
    again = convert(twice, "mx_mix", overrides)
    assert [type(m) for m in again.modules()] == classes


def test_set_scheme_on_unconverted_model_raises_helpful_error():
    with pytest.raises(ValueError, match=r"no MX modules.*mxprobe\.convert"):
        set_scheme(tiny_lm(), "mxfp8_e4m3")
    with pytest.raises(ValueError, match="no MX modules"):
        set_scheme(nn.Sequential(nn.Conv1d(2, 2, 3)), "fp32")


def test_bad_scheme_or_override_fails_before_touching_the_model():
    model = tiny_lm()
    with pytest.raises(ValueError, match="e4m4"):
        convert(model, "w=e4m4")
    with pytest.raises(ValueError, match="blocks"):
        convert(model, "mxfp8_e4m3", overrides={"blocks.*": "w=e9m9"})
    assert not module_names(model)
    assert type(model.blocks[0].fc1) is nn.Linear


def test_overrides_first_match_wins_and_show_in_describe():
    overrides = {
        "*.lm_head": "fp32",
        "blocks.0.*": "norm=bf16",
        "blocks.*": "w=e5m2",  # would also match blocks.0.*: only blocks.1 gets it
    }
    model = convert(tiny_lm(), "mxfp8_e4m3", overrides)
    base = PrecisionScheme.parse("mxfp8_e4m3")
    schemes = schemes_of(model)
    assert schemes["head.lm_head"] == PrecisionScheme()
    assert schemes["head.norm"] == base
    assert schemes["blocks.0.fc1"] == base.amend("norm=bf16")
    assert schemes["blocks.1.fc1"] == base.amend("w=e5m2")

    rows = {name: roles for name, _, roles in describe(model).rows}
    assert rows["head.lm_head"]["weight"] == "fp32"
    assert rows["head.norm"]["norm_affine"] == "fp8_e4m3"
    assert rows["blocks.0.norm"]["norm_affine"] == "bf16"
    assert rows["blocks.0.fc1"]["weight"] == "fp8_e4m3"
    assert rows["blocks.1.norm"]["norm_affine"] == "fp8_e4m3"
    assert rows["blocks.1.fc1"]["weight"] == "fp8_e5m2"

    # Order decides: with the broad glob first, blocks.0 gets it too.
    reordered = {"blocks.*": "w=e5m2", "blocks.0.*": "norm=bf16"}
    set_scheme(model, "mxfp8_e4m3", reordered)
    assert schemes_of(model)["blocks.0.fc1"] == base.amend("w=e5m2")
    assert schemes_of(model)["blocks.0.norm"].norm_affine == "fp8_e4m3"


def test_describe_rows_and_table():
    model = convert(tiny_lm(), "mxfp8_e4m3_fwd_only", {"blocks.1.*": "mxfp8_e4m3,block=16"})
    desc = describe(model)
    names = [name for name, _, _ in desc.rows]
    assert names == module_names(model)
    assert names[:4] == ["blocks.0.norm", "blocks.0.fc1", "blocks.0.act", "blocks.0.fc2"]
    rows = {name: (kind, roles) for name, kind, roles in desc.rows}

    kind, fc1 = rows["blocks.0.fc1"]
    assert kind == "MxLinear"
    assert fc1["weight"] == fc1["act"] == "fp8_e4m3"
    # quantize_backprop=False: the backward GEMMs are full precision whatever the roles say.
    assert all(fc1[r] == "fp32" for r in BACKWARD_ROLES)
    assert fc1["norm_affine"] == "-"
    assert fc1["backprop"] == "false"
    kind, norm = rows["blocks.0.norm"]
    assert kind == "MxLayerNorm"
    assert norm["norm_affine"] == "fp8_e4m3" and norm["elementwise"] == "bf16"
    assert all(norm[r] == "-" for r in ("weight", "act", *BACKWARD_ROLES))
    kind, act = rows["blocks.0.act"]
    assert kind == "MxGELU"
    assert [r for r in ROLES if act[r] != "-"] == ["elementwise"]
    _, fc1_mx = rows["blocks.1.fc1"]
    assert all(fc1_mx[r] == "fp8_e4m3" for r in BACKWARD_ROLES)
    assert (fc1_mx["block"], fc1_mx["backprop"]) == ("16", "true")

    lines = str(desc).splitlines()
    assert lines[0].split() == ["module", "type", *ROLES, "block", "scale", "round", "backprop"]
    assert len(lines) == 1 + len(names) + 1  # header, one row per MX module, the share line
    total = desc.total_parameters
    assert lines[-1] == f"parameters held by MX modules: {total} of {total} (100.0 %)"
    fc1_line = next(line.split() for line in lines if line.startswith("blocks.0.fc1 "))
    want = "blocks.0.fc1 MxLinear fp8_e4m3 fp8_e4m3 fp32 fp32 fp32 fp32 - bf16 32 floor even false"
    assert fc1_line == want.split()

    with full_precision(model):
        assert all(roles[r] in ("fp32", "-") for _, _, roles in describe(model).rows for r in ROLES)
    root = describe(convert(nn.Linear(4, 4), "bf16"))
    assert str(root).splitlines()[1].split()[:3] == ["<root>", "MxLinear", "bf16"]


def test_amend_scheme_on_a_glob():
    model = convert(tiny_lm(), "mxfp8_e4m3")
    base = PrecisionScheme.parse("mxfp8_e4m3")
    changed = amend_scheme(model, "norm=bf16", "blocks.*.norm")
    assert sorted(changed) == ["blocks.0.norm", "blocks.1.norm"]
    assert all(v == (base, base.amend("norm=bf16")) for v in changed.values())
    schemes = schemes_of(model)
    assert schemes["head.norm"] == base and schemes["blocks.0.fc1"] == base
    # Amending amends each module's current scheme, not the base.
    amend_scheme(model, "elem=fp32", "blocks.0.*")
    assert schemes_of(model)["blocks.0.norm"] == base.amend("norm=bf16,elem=fp32")
    with pytest.raises(ValueError, match=r"no MX module matches 'decoder\.\*'"):
        amend_scheme(model, "norm=bf16", "decoder.*")


def norms_near_one(model: nn.Module) -> None:
    """γ near 1 (as trained norms are: its block max saturates under e4m3 floor), β small."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (MxLayerNorm, MxRMSNorm)):
                module.weight.copy_(1.0 + 0.1 * batch(len(name), D))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * batch(len(name) + 1, D))


def snap_and_diff(model: nn.Module, change: str) -> dict[str, torch.Tensor]:
    """Snap-amend ``change``; {name: new value} of every parameter that moved."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    amend_scheme(model, change, snap=True)
    return {n: p.detach() for n, p in model.named_parameters() if not torch.equal(p, before[n])}


NORM_PARAMS = [f"blocks.{i}.norm.{p}" for i in (0, 1) for p in ("weight", "bias")]
LINEAR_WEIGHTS = [f"blocks.{i}.fc{j}.weight" for i in (0, 1) for j in (1, 2)]


@pytest.mark.parametrize(
    ("change", "snapped_names"),
    [
        ("norm=bf16", [*NORM_PARAMS, "head.norm.weight"]),
        ("w=fp32", [*LINEAR_WEIGHTS, "head.lm_head.weight"]),
    ],
)
def test_snapping_switch_keeps_the_output_a_plain_switch_does_not(change, snapped_names):
    model = convert(tiny_lm(), "mxfp8_e4m3")
    norms_near_one(model)
    x = inputs()
    out = model(x)
    plain, snapped = copy.deepcopy(model), copy.deepcopy(model)
    amend_scheme(plain, change)
    assert not torch.equal(plain(x), out)
    before = {n: p.clone() for n, p in model.named_parameters()}
    amend_scheme(snapped, change, snap=True)
    assert torch.equal(snapped(x), out)
    moved = [n for n, p in snapped.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(moved) == sorted(snapped_names)
    assert schemes_of(snapped) == schemes_of(plain)


def test_snapping_moves_exactly_to_the_old_forward_values_and_never_moves_grid_values():
    model = convert(tiny_lm(), "mxfp8_e4m3")
    norms_near_one(model)
    on_grid = quantize_mx(1.0 + 0.1 * batch(7, D), "fp4_e2m1")  # on the e2m1 and e4m3 grids
    with torch.no_grad():
        model.blocks[1].norm.weight.copy_(on_grid)
    params = dict(model.named_parameters())
    latent = {n: p.detach().clone() for n, p in params.items()}
    norm_names = [*NORM_PARAMS, "head.norm.weight"]
    moving_norms = [n for n in norm_names if n != "blocks.1.norm.weight"]

    # e4m3 -> e2m1 for the norms: each γ/β becomes its e4m3 value (one block of D along -1).
    moved = snap_and_diff(model, "norm=e2m1")
    assert sorted(moved) == sorted(moving_norms)
    for name in moving_norms:
        assert torch.equal(params[name], quantize_mx(latent[name], "fp8_e4m3")), name
    assert torch.equal(params["blocks.1.norm.weight"], on_grid)
    assert all(dict(model.named_parameters())[n] is p for n, p in params.items())
    after_first = {n: p.detach().clone() for n, p in params.items()}
    first_schemes = schemes_of(model)

    # A change of scale mode alone changes the forward rounding of every MX parameter role:
    # the norms take their e2m1 (floor) value, the GEMM weights their e4m3 (floor) value.
    moved = snap_and_diff(model, "scale=rceil")
    gemm_weights = [*LINEAR_WEIGHTS, "head.lm_head.weight"]
    assert sorted(moved) == sorted(moving_norms + gemm_weights)  # biases: elementwise bf16
    for name in norm_names:
        want = quantize_mx(after_first[name], "fp4_e2m1", scale_mode="floor")
        assert torch.equal(params[name], want), name
    for name in gemm_weights:  # blocks along in_features
        assert torch.equal(params[name], quantize_mx(latent[name], "fp8_e4m3", axis=-1)), name

    # Back to the floor scheme, then the same switch again: every switched parameter is already
    # on the old forward's grid, so this snap moves nothing.
    snapped = {n: p.detach().clone() for n, p in params.items()}
    restore_schemes(model, first_schemes)
    assert snap_and_diff(model, "scale=rceil") == {}
    assert all(torch.equal(params[n], snapped[n]) for n in params)


def test_schemes_of_restore_schemes_round_trip():
    model = convert(tiny_lm(), "mxfp8_e4m3", {"head.*": "bf16"})
    x = inputs()
    snapshot = schemes_of(model)
    out = model(x)
    set_scheme(model, "mxfp4_e2m1")
    assert not torch.equal(model(x), out)

    restore_schemes(model, snapshot)
    assert schemes_of(model) == snapshot
    assert torch.equal(model(x), out)
    with pytest.raises(ValueError, match="lacks"):
        restore_schemes(model, {**snapshot, "blocks.7.fc1": PrecisionScheme()})


# A model the project never saw: torch's own TransformerEncoder.


def transformer(dim_feedforward: int = 128) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        64, 4, dim_feedforward=dim_feedforward, dropout=0.0, batch_first=True
    )
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def convert_transformer(model, scheme="mxfp8_e4m3"):
    with pytest.warns(UserWarning, match="MultiheadAttention.*full precision") as record:
        convert(model, scheme)
    assert len(record) == 1
    return model


def test_transformer_encoder_converts_and_trains():
    model = transformer()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    convert_transformer(model)
    assert list(model.state_dict()) == keys
    assert all(dict(model.named_parameters())[n] is p for n, p in params.items())
    assert sorted(module_names(model)) == sorted(
        f"layers.{i}.{m}" for i in range(2) for m in ("linear1", "linear2", "norm1", "norm2")
    )
    assert type(model.layers[0].self_attn.out_proj) is not MxLinear

    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, target = batch(3, 4, 12, 64), batch(4, 4, 12, 64)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p.detach(), before[n]) for n, p in params.items())
    assert {id(p) for p in opt.state} == {id(p) for p in params.values()}


def test_transformer_encoder_fp32_scheme_reproduces_unconverted_output():
    model = transformer().eval()
    reference = copy.deepcopy(model)
    convert_transformer(model)
    x = batch(5, 2, 10, 64)
    assert not torch.equal(model(x), reference(x))
    set_scheme(model, "fp32")
    assert torch.equal(model(x), reference(x))


def test_transformer_encoder_is_emulated_under_no_grad():
    model = transformer().eval()
    reference = copy.deepcopy(model)
    convert_transformer(model)
    x = batch(5, 2, 10, 64)
    emulated = model(x).detach()
    with torch.no_grad():
        out, ref_out = model(x), reference(x)
    assert not torch.equal(out, ref_out), "no_grad output is the unconverted model's"
    torch.testing.assert_close(out, emulated, rtol=1e-5, atol=1e-5)


def test_transformer_encoder_default_width_fp32_scheme_reproduces_unconverted_output():
    model = transformer(dim_feedforward=2048).eval()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        convert(model, "fp32")
    x = batch(5, 2, 10, 64)
    assert torch.equal(model(x), reference(x))
