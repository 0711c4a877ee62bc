"""mxprobe.compile_model keeps MX emulation exact under torch.compile (bf16 roundings included)."""

import torch
from mxprobe.models.lit import ProxyLitModule

import mxprobe
from tests.conftest import bits_equal


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


def test_plain_torch_compile_would_drop_the_bf16_rounding():
    """Why compile_model exists: without emulate_precision_casts Inductor skips the bf16 round."""

    def round_trip(t):
        return mxprobe.round_to(t * 3.0, "bf16") / 3.0

    x = torch.randn(4096) * 1.2345
    want = round_trip(x)
    assert bits_equal(mxprobe.compile_model(round_trip)(x), want)
    plain = torch.compile(round_trip)(x)
    assert not torch.equal(plain, want), "Inductor now keeps bf16 casts; compile_model may go"


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
