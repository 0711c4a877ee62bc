"""The names contract: every metric name, monitor, event kind and event field that the
callbacks write and the report, plots, headlines and docs read. One home, so that a name cannot
mean one thing where it is written and another where it is read.

A monitor reading is named ``mx/<monitor>/<module>/<stat>``: ``<module>`` is the qualified
module name (dots, never slashes) or an aggregate (``total``, ``total_norms``,
``total_linears``). ``docs/callbacks.md`` documents every stat; a test checks that every name
here is documented there.
"""

from __future__ import annotations

import re

PREFIX = "mx"

GRAD_BIAS = "grad_bias"
NORM_AFFINE = "norm_affine"
ACTIVATIONS = "activations"
SPIKES = "spikes"
MONITORS = (GRAD_BIAS, NORM_AFFINE, ACTIVATIONS, SPIKES)

# The callback that publishes each monitor's readings.
MONITOR_CALLBACKS = {
    GRAD_BIAS: "GradientBiasMonitor",
    NORM_AFFINE: "NormAffineMonitor",
    ACTIVATIONS: "ActivationMonitor",
    SPIKES: "LossSpikeDetector",
}

TOTAL = "total"
TOTAL_NORMS = "total_norms"
TOTAL_LINEARS = "total_linears"
AGGREGATES = (TOTAL, TOTAL_NORMS, TOTAL_LINEARS)

# The stats each monitor writes (what its docstring and docs/callbacks.md list).
GRAD_BIAS_STATS = ("cosine", "zeta", "bias", "mean_diff", "norm_ratio")
NORM_AFFINE_STATS = (
    "weight_saturation",
    "weight_floor_overflow",
    "weight_rel_bias",
    "weight_rel_error",
    "weight_gap",
    "weight_mean",
    "weight_std",
    "weight_blocks_clipped",
    "weight_dynamic_range",
    "bias_saturation",
    "bias_floor_overflow",
    "bias_rel_bias",
    "bias_rel_error",
    "bias_gap",
    "bias_blocks_clipped",
    "bias_dynamic_range",
    "weight_blocks_amax_lt_half",
    "weight_blocks_amax_half_to_1",
    "weight_blocks_amax_1_to_2",
    "weight_blocks_amax_ge_2",
    "weight_blocks_crossed",
    "in_force",
)
ACTIVATION_STATS = ("saturation", "underflow", "sqnr_db")
SPIKE_STATS = ("loss", "score", "grad_norm")
STATS = {
    GRAD_BIAS: GRAD_BIAS_STATS,
    NORM_AFFINE: NORM_AFFINE_STATS,
    ACTIVATIONS: ACTIVATION_STATS,
    SPIKES: SPIKE_STATS,
}

# Event kinds: what a detector raises (alarms) and what a rule does (actions).
SPIKE = "spike"
NONFINITE = "nonfinite"
SCALER_SKIP = "scaler_skip"
SET_SCHEME = "set_scheme"
REWIND = "rewind"
SCALE_LR = "scale_lr"
ALARM_KINDS = (SPIKE, NONFINITE, SCALER_SKIP)
ACTION_KINDS = (SET_SCHEME, REWIND, SCALE_LR)
EVENT_KINDS = ALARM_KINDS + ACTION_KINDS

# Keys of every event; actions add their own (ACTION_FIELDS).
EVENT_FIELDS = ("step", "kind", "rule", "values", "scheme_before", "scheme_after", "source")
ACTION_FIELDS = {
    SET_SCHEME: ("scheme", "modules", "snap"),
    REWIND: ("steps", "rewound_to"),
    SCALE_LR: ("factor", "lr_before", "lr_after"),
}

_METRIC = re.compile(rf"^{PREFIX}/(?P<monitor>[^/]+)/(?P<module>.+)/(?P<stat>[^/]+)$")


def metric(monitor: str, module: str, stat: str) -> str:
    """``mx/<monitor>/<module>/<stat>``."""
    return f"{PREFIX}/{monitor}/{module}/{stat}"


def monitor_prefix(monitor: str) -> str:
    """``mx/<monitor>/``: what every reading of ``monitor`` starts with."""
    return f"{PREFIX}/{monitor}/"


def parse_metric(name: str) -> tuple[str, str, str] | None:
    """``(monitor, module, stat)`` of an mxprobe reading's name; ``None`` for any other name."""
    m = _METRIC.match(name)
    return (m["monitor"], m["module"], m["stat"]) if m else None


def monitor_of(name: str) -> str | None:
    """The monitor an mxprobe reading belongs to, ``None`` for any other name."""
    parsed = parse_metric(name)
    return parsed[0] if parsed else None
