"""GradientBiasMonitor, NormAffineMonitor and ActivationMonitor in real (tiny) Lightning runs."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from mxprobe.callbacks import ActivationMonitor, GradientBiasMonitor, NormAffineMonitor

import mxprobe
from mxprobe.stats import compare_gradients, quantization_stats
from tests.helpers_lightning import NoComputeLoss, TinyMx, trainer
from tests.helpers_numerics import heavy_tailed
from tests.mx_reference import reference_format

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Recorder(Callback):
    """Keeps, per optimizer step, the callback metrics whose name starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.steps = prefix, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step - 1] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)
        }


def test_grad_bias_is_exactly_zero_under_fp32_scheme(tmp_path):
    module = TinyMx()
    mxprobe.set_scheme(module.model, "fp32")
    recorder = Recorder("mx/grad_bias/")
    trainer(tmp_path, 3, [GradientBiasMonitor(every_n_steps=1), recorder]).fit(module)
    assert sorted(recorder.steps) == [0, 1, 2]
    for metrics in recorder.steps.values():
        zetas = {k: v for k, v in metrics.items() if k.endswith("/zeta")}
        assert len(zetas) == 3 + 2 * 3  # total, total_norms, total_linears + 3 modules per block
        assert set(zetas.values()) == {0.0}
        assert metrics["mx/grad_bias/total/cosine"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["mx/grad_bias/total/bias"] == 0.0
        assert metrics["mx/grad_bias/total/norm_ratio"] == 1.0


class ManualShadow(Callback):
    """Recomputes the full-precision gradient of the captured micro-batches by hand and compares
    it with .grad, right after the monitor logged (this callback comes later in the list)."""

    def __init__(self) -> None:
        self.batches, self.checked = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.batches = []
        self.batches.append(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for p in pl_module.parameters()]
        total = [torch.zeros_like(p) for p in params]
        with mxprobe.full_precision(pl_module):
            for batch in self.batches:
                loss = pl_module.compute_loss(batch) / trainer.accumulate_grad_batches
                for t, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                    t += g
        g_q = torch.cat([p.grad.reshape(-1) for p in params])
        expected = compare_gradients(g_q, torch.cat([t.reshape(-1) for t in total]))
        logged = trainer.callback_metrics
        self.checked.append(len(self.batches))
        for stat in ("zeta", "cosine", "bias", "norm_ratio"):
            assert float(logged[f"mx/grad_bias/total/{stat}"]) == pytest.approx(
                expected[stat].item(), rel=1e-5, abs=1e-7
            )


def test_grad_bias_under_accumulation_matches_hand_computation(tmp_path):
    module = TinyMx(scheme="mxfp4_e2m1")
    manual = ManualShadow()
    monitor = GradientBiasMonitor(every_n_steps=1, per_module=False)
    trainer(tmp_path, 2, [monitor, manual], accumulate_grad_batches=3).fit(module)
    assert manual.checked == [3, 3]
    # A coarse format gives a visible bias; .grad itself was never touched by the monitor.
    assert 0 < float(trainer_metric(module, "mx/grad_bias/total/zeta")) < 1


def trainer_metric(module, name):
    return module.trainer.callback_metrics[name]


def test_grad_bias_needs_compute_loss(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"compute_loss\(batch\)"):
        trainer(tmp_path, 1, [GradientBiasMonitor()]).fit(NoComputeLoss())


def test_grad_bias_keeps_training_bitwise_identical(tmp_path):
    runs = []
    for callbacks in ([], [GradientBiasMonitor(every_n_steps=2)]):
        module = TinyMx()
        trainer(tmp_path, 4, callbacks).fit(module)
        runs.append(torch.cat([p.detach().reshape(-1) for p in module.parameters()]))
    assert torch.equal(*runs)


def test_norm_affine_by_hand(tmp_path):
    module = TinyMx()
    norm = module.model[0].norm
    with torch.no_grad():
        norm.weight[:2] = torch.tensor([1.9, 1.8])
        norm.bias.zero_()
    mxprobe.set_scheme(module.model[1], "mxfp8_e4m3,norm=bf16")
    recorder = Recorder("mx/norm_affine/")
    trainer(tmp_path, 1, [NormAffineMonitor(every_n_steps=1), recorder]).fit(module)
    m = recorder.steps[0]
    first = "mx/norm_affine/model.0.norm/"
    assert m[first + "weight_saturation"] == 2 / 32
    assert m[first + "weight_floor_overflow"] == 1.0
    expected_bias = ((1.75 / 1.9 - 1) + (1.75 / 1.8 - 1)) / 32
    assert m[first + "weight_rel_bias"] == pytest.approx(expected_bias, rel=1e-6)
    error = (0.15**2 + 0.05**2) ** 0.5 / (1.9**2 + 1.8**2 + 30) ** 0.5
    assert m[first + "weight_rel_error"] == pytest.approx(error, rel=1e-5)
    assert m[first + "weight_mean"] == pytest.approx((1.9 + 1.8 + 30) / 32, rel=1e-6)
    assert m[first + "bias_saturation"] == 0.0 and m[first + "bias_rel_error"] == 0.0
    assert m[first + "in_force"] == 1.0
    # norm_affine=bf16 on the second block: statistics under the e4m3 reference, flagged.
    assert m["mx/norm_affine/model.1.norm/in_force"] == 0.0
    # A norm not in force: the same names, its reference statistics marked by in_force 0
    # (its γ is 1: nothing clips under e4m3 either).
    assert m["mx/norm_affine/model.1.norm/weight_saturation"] == 0.0


def test_activation_monitor_hooks_only_on_monitored_steps(tmp_path):
    module = TinyMx()
    monitor = ActivationMonitor(every_n_steps=2)
    linears = [m for m in module.modules() if isinstance(m, mxprobe.MxLinear)]

    class HookCounter(Callback):
        def __init__(self):
            self.hooks = []

        def on_before_backward(self, trainer, pl_module, loss):
            self.hooks.append(sum(len(m._forward_hooks) for m in linears))

    counter = HookCounter()
    recorder = Recorder("mx/activations/")
    trainer(tmp_path, 4, [monitor, counter, GradientBiasMonitor(every_n_steps=2), recorder]).fit(
        module
    )
    assert counter.hooks == [4, 0, 4, 0]
    assert all(len(m._forward_hooks) == 0 for m in linears)
    stats = recorder.steps[2]
    assert len(stats) == 4 * 3
    for name in ("model.0.fc1", "model.1.fc2"):
        assert 0 <= stats[f"mx/activations/{name}/saturation"] < 0.1
        assert 0 <= stats[f"mx/activations/{name}/underflow"] < 0.5
        assert 15 < stats[f"mx/activations/{name}/sqnr_db"] < 60


def e4m3_sums_from_the_definition(x: torch.Tensor) -> torch.Tensor:
    """[elements, saturated, nonzero, underflowed, sum x^2, sum (x - q)^2] of x's e4m3 blocks
    of 32 along the last axis (floor scale), from docs/numerics.md in float64."""
    f = reference_format("e4m3")
    blocks = x.double().reshape(-1, 32)
    _, e = torch.frexp(blocks.abs().amax(dim=1, keepdim=True))  # amax = m 2^e, m in [0.5, 1)
    scale_exp = (e - 1 - f.emax).clamp(-127, 127)  # S = floor(log2 amax) - emax
    saturated = torch.ldexp(blocks.abs(), -scale_exp) > f.max_norm
    q = mxprobe.quantize_mx(x, "e4m3").double().reshape(-1, 32)
    nonzero = blocks != 0
    return torch.tensor(
        [
            blocks.numel(),
            saturated.sum().item(),
            nonzero.sum().item(),
            ((q == 0) & nonzero).sum().item(),
            blocks.square().sum().item(),
            (blocks - q).square().sum().item(),
        ],
        dtype=torch.float64,
    )


def test_activation_sums_follow_the_definition_and_shadow_passes_are_skipped():
    module = TinyMx()
    monitor = ActivationMonitor(every_n_steps=1)
    fc1 = module.model[0].fc1
    handle = fc1.register_forward_hook(monitor._hook("fc1"))
    # Many binades per block: some block maxima overflow e4m3 (saturate), small values underflow.
    x1 = heavy_tailed(64, 32, seed=0)
    x1[::7, 3] = 0.0  # exact zeros count as elements, not as nonzero or underflowed
    x1[5] = torch.tensor([509.44, 1e-4, -1e-6] + [1.0] * 29)  # 509.44 saturates, 2 underflow
    x2 = heavy_tailed(16, 32, seed=1)
    with mxprobe.full_precision(module):
        fc1(x1)
    assert monitor._sums == {}
    fc1(x1)
    fc1(x2)  # every call of the step adds up
    handle.remove()
    want = e4m3_sums_from_the_definition(x1) + e4m3_sums_from_the_definition(x2)
    got = monitor._sums["fc1"]
    assert got[:4].tolist() == want[:4].tolist()
    assert want[1] > 0 and want[3] > 0  # the data exercise saturation and underflow
    # The hook squares in fp32 (x - q itself is exact there) and sums in float64.
    torch.testing.assert_close(got[4:], want[4:], rtol=1e-7, atol=0)
    stats = quantization_stats(got)
    assert stats["saturation"].item() == want[1].item() / (80 * 32)
    assert stats["underflow"].item() == want[3].item() / want[2].item()
    sqnr = 10 * torch.log10(want[4] / want[5])
    assert stats["sqnr_db"].item() == pytest.approx(sqnr.item(), rel=1e-7)


def test_monitor_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientBiasMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="reference_format"):
        NormAffineMonitor(reference_format="bf16")
    with pytest.raises(ValueError, match="unknown format"):
        ActivationMonitor(reference_format="e4m4")
    a, b = NormAffineMonitor(every_n_steps=10), NormAffineMonitor(every_n_steps=20)
    assert a.state_key != b.state_key


def test_norm_affine_on_plain_rmsnorm_uses_the_reference():
    norm = torch.nn.RMSNorm(64)
    with torch.no_grad():
        norm.weight[0] = 3.6  # mantissa 1.8 > 1.75: its block overflows, one element clips
    stats = NormAffineMonitor(reference_format="e4m3")._module_stats(norm)
    assert stats["in_force"].item() == 0.0
    # Not in force: the reference format's statistics, under the same names.
    assert stats["weight_floor_overflow"].item() == 0.5
    assert stats["weight_saturation"].item() == 1 / 64
    assert not any("bias_" in k for k in stats)


def test_norm_probes_count_binades_crossings_and_the_gap(tmp_path):
    """The mechanism probes on a γ moved by hand between two readings, checked by hand."""
    from lightning.pytorch.callbacks import Callback

    class MoveGamma(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            gamma = pl_module.model[0].norm.weight
            with torch.no_grad():
                # Step 0: the (one) block max at 1.01 (binade [1, 2)). Step 1: the max
                # pushed below 1 ([0.5, 1)): one block crossed.
                gamma.copy_(torch.full_like(gamma, 0.95))
                gamma[1] = 1.01 if trainer.global_step == 0 else 0.96

    monitor = NormAffineMonitor(every_n_steps=1)
    seen = []

    class Read(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            seen.append({k.split("/")[-1]: float(v) for k, v in m.items() if "model.0.norm/" in k})

    trainer(tmp_path, 2, [MoveGamma(), monitor, Read()]).fit(TinyMx(d=32, lr=0.0))
    first, second = seen
    assert first["weight_blocks_amax_1_to_2"] == 1.0 and "weight_blocks_crossed" not in first
    assert second["weight_blocks_amax_half_to_1"] == 1.0
    assert second["weight_blocks_crossed"] == 1.0
    # e4m3, floor scale: a block with max 0.96 has S = -1 - 8, so 0.95 and 0.96 clip to 0.875;
    # in the first block (max 1.01) they round to 0.9375 (step 1/16 in [0.5, 1)) and 1.0.
    assert second["weight_gap"] == pytest.approx(((0.875 - 0.95) * 31 + (0.875 - 0.96)) / 32)
    want_first = ((0.9375 - 0.95) * 31 + (1.0 - 1.01)) / 32
    assert first["weight_gap"] == pytest.approx(want_first, rel=1e-5)
