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

- :class:`RunRecorder`: the run record (``mxprobe_record.sqlite`` in the run's directory: every
  loss, reading and event; :mod:`mxprobe.record`), added by any of the above when absent.

Read a record back with :func:`read_record` or :func:`read_events` (no Lightning needed).
"""

from mxprobe.callbacks.grad_bias import GradientBiasMonitor
from mxprobe.callbacks.interventions import PrecisionIntervention
from mxprobe.callbacks.precision_state import load_schemes, save_schemes
from mxprobe.callbacks.quant_monitor import ActivationMonitor, NormAffineMonitor
from mxprobe.callbacks.recorder import RunRecorder
from mxprobe.callbacks.rules import Rule
from mxprobe.callbacks.spikes import LossSpikeDetector

from mxprobe.record import RECORD_FILE, read_events, read_record

__all__ = [
    "RECORD_FILE",
    "ActivationMonitor",
    "GradientBiasMonitor",
    "LossSpikeDetector",
    "NormAffineMonitor",
    "PrecisionIntervention",
    "Rule",
    "RunRecorder",
    "load_schemes",
    "read_events",
    "read_record",
    "save_schemes",
]
