"""mxprobe.compile_model keeps MX emulation exact under torch.compile (bf16 roundings included)."""

import torch
from mxprobe.models.lit import ProxyLitModule

import mxprobe
from tests.helpers_numerics import bits_equal


def _batch(width: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, width, generator=g), 0.01 * torch.randn(n, width, generator=g)


def test_compiled_proxy_equals_eager_forward_bitwise_and_grads_to_reduction_order():
    x, y = _batch(32)
    eager = ProxyLitModule(depth=2, width=32, scheme="mxfp8_e4m3")
    compiled = ProxyLitModule(depth=2, width=32, scheme="mxfp8_e4m3", compiled=True)
    assert bits_equal(compiled._student_forward(x), eager.student(x))
    want = torch.autograd.grad(eager.compute_loss((x, y)), list(eager.parameters()))
    got = torch.autograd.grad(compiled.compute_loss((x, y)), list(compiled.parameters()))
    for (name, _), g_want, g_got in zip(eager.named_parameters(), want, got, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation runs eager (no second compilation)
        assert bits_equal(compiled.compute_loss((x, y)), eager.compute_loss((x, y)))
    # state_dict keys are the student's: the compiled function is not a submodule
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_round_to_keeps_its_rounding_under_plain_torch_compile():
    """Inductor drops a bare .to(bf16).to(fp32) pair; round_to is an opaque op under compile."""

    def round_trip(t):
        return mxprobe.round_to(t * 3.0, "bf16") / 3.0

    def bare_casts(t):
        return (t * 3.0).to(torch.bfloat16).to(torch.float32) / 3.0

    x = torch.randn(4096) * 1.2345
    want = round_trip(x)
    assert bits_equal(torch.compile(round_trip)(x), want)
    assert bits_equal(mxprobe.compile_model(round_trip)(x), want)
    # Why: the same casts written plainly lose the rounding under Inductor's defaults.
    assert not torch.equal(torch.compile(bare_casts)(x), bare_casts(x))


def test_compiled_follows_a_precision_switch():
    x, y = _batch(32)
    model = ProxyLitModule(depth=1, width=32, scheme="mxfp8_e4m3", compiled=True)
    mx_out = model._student_forward(x)
    mxprobe.set_scheme(model.student, "fp32")
    fp_out = model._student_forward(x)
    # fp32 kernels fuse differently under Inductor: equal to rounding, not to the bit
    torch.testing.assert_close(fp_out, model.student(x), rtol=1e-5, atol=1e-6)
    assert (mx_out - fp_out).abs().max() > 1e-3


def test_forward_hooks_registered_after_compilation_still_run():
    """Dynamo does not guard on hooks; compile_model falls back to eager while hooks exist."""
    x, y = _batch(32, n=8)
    model = ProxyLitModule(depth=1, width=32, scheme="mxfp8_e4m3", compiled=True)
    model.compute_loss((x, y)).backward()  # compiled before any hook exists
    seen = []
    handle = model.student.blocks[0].mlp.fc1.register_forward_hook(
        lambda module, args, out: seen.append(out.shape)
    )
    model.compute_loss((x, y)).backward()
    assert seen == [torch.Size([8, 128])]
    handle.remove()
    model.compute_loss((x, y)).backward()
    assert len(seen) == 1


def test_plain_torch_compile_is_exact_and_names_drop_orig_mod():
    """The bf16 elementwise rounding is an opaque op under compile: plain torch.compile is
    bitwise eager (it was off by 5e-2), and torch.compile's wrapper does not rename modules."""
    torch.manual_seed(0)
    student = ProxyLitModule(depth=2, width=32, scheme="mxfp8_e4m3").student
    x, _ = _batch(32)
    compiled = torch.compile(student)
    assert bits_equal(compiled(x), student(x))
    assert mxprobe.module_names(compiled) == mxprobe.module_names(student)
    rows = [name for name, *_ in mxprobe.describe(compiled).rows]
    assert rows == [name for name, *_ in mxprobe.describe(student).rows]
    assert mxprobe.amend_scheme(compiled, "norm=bf16", "blocks.0.*").keys() == {"blocks.0.ln"}


def test_compile_model_returns_the_module_itself():
    torch.manual_seed(0)
    student = ProxyLitModule(depth=1, width=32, scheme="mxfp8_e4m3").student
    x, _ = _batch(32)
    want = student(x)
    keys = student.state_dict().keys()
    compiled = mxprobe.compile_model(student)
    assert compiled is student and isinstance(compiled, torch.nn.Module)
    assert student.state_dict().keys() == keys
    assert bits_equal(student(x), want)
