"""LossSpikeDetector: the three rules, the non-finite guard, episodes, exact state round trip."""

import math

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from mxprobe.callbacks import LossSpikeDetector, PrecisionIntervention, read_events
from mxprobe.callbacks.spikes import squared_norm

from tests.helpers_lightning import TinyMx, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class _Trainer:
    """A run of the detector without Lightning: rank 0, no callbacks; its events stay in the
    recorder added to ``callbacks`` (nothing is written: the recorder's setup never runs)."""

    is_global_zero = True

    def __init__(self):
        self.callbacks = []


_TRAINER = _Trainer()


def _feed(detector, losses, grad_norms=None, start=0):
    scores = []
    for i, loss in enumerate(losses):
        grad = None if grad_norms is None else grad_norms[i]
        scores.append(detector._check(_TRAINER, start + i, loss, grad))
    return scores


def _noisy(n, level=1.0):
    return [level * (1 + 0.01 * math.sin(7 * i)) for i in range(n)]


@pytest.mark.parametrize("method", ["zscore", "ema_ratio", "derivative"])
def test_each_method_flags_one_event_per_episode(method):
    detector = LossSpikeDetector(method=method, window=20)
    losses = _noisy(40) + [5.0, 6.0, 5.0] + _noisy(10)
    _feed(detector, losses)
    assert [(e["step"], e["kind"], e["signals"]) for e in detector.spikes] == [
        (40, "spike", ["loss"])
    ]
    assert detector.events_at(40) == [detector.last_spike]


def test_scores_by_hand():
    window = [1.0, 2.0, 3.0, 4.0]
    z = LossSpikeDetector(method="zscore", window=4)
    _feed(z, window)
    std = math.sqrt(sum((v - 2.5) ** 2 for v in window) / 4)
    assert _feed(z, [10.0], start=4)[0] == pytest.approx((10 - 2.5) / std)

    d = LossSpikeDetector(method="derivative", window=4)
    _feed(d, window)
    # m_t - m_{t-1} = (L_t - L_{t-4}) / 4, relative to m_{t-1} = 2.5.
    assert _feed(d, [10.0], start=4)[0] == pytest.approx((10 - 1) / 4 / 2.5)

    e = LossSpikeDetector(method="ema_ratio", window=4, ema_decay=0.5)
    _feed(e, window)
    ema = 1.0
    for v in window[1:]:
        ema = 0.5 * ema + 0.5 * v
    assert _feed(e, [10.0], start=4)[0] == pytest.approx(10 / ema)


def test_warm_up_and_threshold():
    detector = LossSpikeDetector(method="zscore", window=10, threshold=3.0)
    assert all(math.isnan(s) for s in _feed(detector, [1.0, 100.0, 1.0, 1.0, 1.0]))
    assert detector.spikes == []


def test_gradient_norm_growth_signal():
    detector = LossSpikeDetector(window=5, grad_norm_factor=3.0)
    _feed(detector, [1.0] * 8 + [1.0], grad_norms=[1.0] * 8 + [10.0])
    assert [(e["step"], e["signals"]) for e in detector.spikes] == [(8, ["grad_norm"])]
    assert detector.last_spike["values"]["grad_norm_ratio"] == pytest.approx(10.0)


def test_nonfinite_is_always_an_event():
    detector = LossSpikeDetector(window=100)
    _feed(detector, [1.0, math.nan, math.nan, 1.0, 1.0], grad_norms=[1.0] * 4 + [math.inf])
    assert [(e["step"], e["kind"]) for e in detector.spikes] == [(1, "nonfinite"), (4, "nonfinite")]
    assert len(detector._history) == 3  # non-finite losses never enter the history


def test_state_round_trip_gives_identical_decisions():
    losses = _noisy(30) + [4.0] + _noisy(20) + [9.0, 1.0]
    grads = [1.0 + 0.1 * (i % 3) for i in range(len(losses))]
    reference = LossSpikeDetector(method="ema_ratio", window=10, grad_norm_factor=2.0)
    ref_scores = _feed(reference, losses, grads)

    first = LossSpikeDetector(method="ema_ratio", window=10, grad_norm_factor=2.0)
    scores = _feed(first, losses[:25], grads[:25])
    resumed = LossSpikeDetector(method="ema_ratio", window=10, grad_norm_factor=2.0)
    resumed.load_state_dict(first.state_dict())
    scores += _feed(resumed, losses[25:], grads[25:], start=25)
    assert scores == ref_scores
    assert resumed.spikes == reference.spikes


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown method 'median'"):
        LossSpikeDetector(method="median")
    with pytest.raises(ValueError, match="window"):
        LossSpikeDetector(window=1)
    with pytest.raises(ValueError, match="ema_decay"):
        LossSpikeDetector(ema_decay=1.0)
    assert LossSpikeDetector(method="derivative").threshold == 0.01


@pytest.mark.parametrize("return_dict", [False, True])
def test_spike_and_nan_in_a_run(tmp_path, return_dict):
    module = TinyMx(spike_at=8, nan_at=11, return_dict=return_dict, lr=1e-3)
    detector = LossSpikeDetector(window=5, threshold=6.0)
    trainer(tmp_path, 13, [detector]).fit(module)
    events = read_events(tmp_path)
    assert [(e["step"], e["kind"]) for e in events] == [(8, "spike"), (11, "nonfinite")]
    assert events[0]["values"]["loss"] > 100 and events[0]["values"]["score"] > 6.0
    assert events[1]["values"]["loss"] == "nan"
    for e in events:
        assert {"step", "kind", "rule", "values", "scheme_before", "scheme_after"} <= set(e)


@pytest.mark.parametrize("multi_tensor", [False, True])
def test_squared_gradient_norm_against_float64(multi_tensor):
    """Both kernels (per-tensor dot on CPU, multi-tensor norm elsewhere) give sum g^2."""
    g = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(300, 70, generator=g) * 1e3,
        torch.randn(64, 128, generator=g).t(),  # not contiguous
        torch.randn(5, generator=g).to(torch.bfloat16),
        torch.zeros(0),
    ]
    want = sum(t.double().square().sum() for t in grads).item()
    got = squared_norm(grads, multi_tensor=multi_tensor)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5)
    grads[1][3, 4] = float("nan")
    assert math.isnan(squared_norm(grads, multi_tensor=multi_tensor).item())
    grads[1][3, 4] = float("inf")
    assert squared_norm(grads, multi_tensor=multi_tensor).item() == math.inf


class TwoSpikes(TinyMx):
    """Loss x1000 at two optimizer steps (counted forward, so a rewind does not replay them)."""

    def training_step(self, batch, batch_idx):
        loss = self.mse(batch)
        if self.trainer.global_step in (12, 16):
            loss = loss * 1000.0
        self.log("train/loss", loss)
        return loss


def test_a_rewind_drops_the_spike_from_the_window_so_a_repeat_is_seen(tmp_path):
    rule = {
        "name": "rewind",
        "trigger": {"kind": "spike", "signal": "loss"},
        "action": {"kind": "rewind", "steps": 3},
        "max_times": 1,
    }
    detector = LossSpikeDetector(window=5)
    intervention = PrecisionIntervention(rules=[rule], snapshot_every=1, keep_snapshots=5)
    trainer(tmp_path, 20, [detector, intervention]).fit(TwoSpikes())
    assert [e["rewound_to"] for e in intervention.timeline] == [10]
    # The second spike is 4 steps after the first: with the first still in a 5-step window
    # its z-score would be ~2; with the window rolled back it is far above the threshold.
    assert [(e["step"], e["kind"]) for e in detector.spikes] == [(12, "spike"), (16, "spike")]


def test_scaler_skips_are_their_own_event_and_do_not_fire_any_rules(tmp_path):
    class Overflow(TinyMx):
        def on_after_backward(self):  # an fp16 overflow in the backward pass of step 6
            if self.trainer.global_step == 6:
                next(self.parameters()).grad.fill_(float("inf"))

    fired = {
        "name": "any",
        "trigger": {"kind": "spike"},
        "action": {"kind": "scale_lr", "factor": 0.5},
    }
    asked = {
        "name": "asked",
        "trigger": {"kind": "spike", "signal": "scaler_skip"},
        "action": {"kind": "scale_lr", "factor": 0.9},
    }
    detector = LossSpikeDetector(window=4)
    intervention = PrecisionIntervention(rules=[fired, asked])
    # Lightning turns precision="16-mixed" into bf16 on CPU; a GradScaler plugin keeps fp16.
    fp16 = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer(tmp_path, 10, [detector, intervention], plugins=[fp16]).fit(Overflow())
    assert [(e["step"], e["kind"]) for e in detector.spikes] == [(6, "scaler_skip")]
    assert [e["rule"] for e in intervention.timeline] == ["asked"]
