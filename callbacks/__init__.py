"""Lightning callbacks that watch MX training and intervene in it (see docs/callbacks.md).

- :class:`GradientBiasMonitor`: MX gradient vs the full-precision gradient at the same weights
  and batch (``mx/grad_bias/...``).
- :class:`NormAffineMonitor`: block saturation and error of LayerNorm/RMSNorm γ, β
  (``mx/norm_affine/...``).
- :class:`ActivationMonitor`: saturation, underflow and SQNR of MX linear inputs
  (``mx/activations/...``).
- :class:`LossSpikeDetector`: loss spikes, gradient-norm blow-ups, NaN/Inf (``mx/spikes/...``).
- :class:`PrecisionIntervention`: rule-driven precision switches, rewinds and LR scaling.
- :func:`save_schemes` / :func:`load_schemes`: the MX schemes in a checkpoint, for a
  LightningModule's own ``on_save_checkpoint`` / ``on_load_checkpoint``.

Events go to ``events.jsonl`` in the run's log directory (format: :mod:`mxprobe.events`).
"""

from mxprobe.callbacks.grad_bias import GradientBiasMonitor
from mxprobe.callbacks.interventions import PrecisionIntervention
from mxprobe.callbacks.precision_state import load_schemes, save_schemes
from mxprobe.callbacks.quant_monitor import ActivationMonitor, NormAffineMonitor
from mxprobe.callbacks.rules import Rule
from mxprobe.callbacks.spikes import LossSpikeDetector

from mxprobe.events import EVENTS_FILE, read_events

__all__ = [
    "EVENTS_FILE",
    "ActivationMonitor",
    "GradientBiasMonitor",
    "LossSpikeDetector",
    "NormAffineMonitor",
    "PrecisionIntervention",
    "Rule",
    "load_schemes",
    "read_events",
    "save_schemes",
]
