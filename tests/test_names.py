"""The names contract: what the callbacks publish is what mxprobe.names defines, and
docs/callbacks.md documents every name."""

from pathlib import Path

import pytest
from mxprobe.callbacks import (
    ActivationMonitor,
    GradientBiasMonitor,
    LossSpikeDetector,
    NormAffineMonitor,
    PrecisionIntervention,
    read_record,
)

from mxprobe import names
from tests.helpers_lightning import TinyMx, trainer

DOCS = (Path(__file__).resolve().parents[1] / "docs" / "callbacks.md").read_text()

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize(
    "name",
    [s for stats in names.STATS.values() for s in stats] + list(names.EVENT_KINDS)
    + list(names.EVENT_FIELDS) + [f for fs in names.ACTION_FIELDS.values() for f in fs],
)  # fmt: skip
def test_every_name_is_documented(name):
    assert f"`{name}`" in DOCS, f"{name!r} is missing from docs/callbacks.md"


def test_what_a_run_publishes_is_in_the_contract(tmp_path):
    rule = {
        "name": "r",
        "trigger": {"kind": "spike"},
        "action": {"kind": "rewind", "steps": 2, "then": {"kind": "scale_lr", "factor": 0.5}},
    }
    callbacks = [
        GradientBiasMonitor(every_n_steps=2),
        NormAffineMonitor(every_n_steps=2),
        ActivationMonitor(every_n_steps=2),
        LossSpikeDetector(window=3),
        PrecisionIntervention(rules=[rule], snapshot_every=2),
    ]
    trainer(tmp_path, 10, callbacks, log_every_n_steps=1).fit(TinyMx(spike_at=6))
    record = read_record(tmp_path)
    published = {names.parse_metric(n) for n in record.readings}
    assert None not in published
    for monitor, _module, stat in published:
        assert stat in names.STATS[monitor], f"{monitor}/{stat} is not in mxprobe.names"
    assert {m for m, _, _ in published} == set(names.MONITORS)
    kinds = {e["kind"] for e in record.events}
    assert {"spike", "rewind", "scale_lr"} <= kinds <= set(names.EVENT_KINDS)
    for event in record.events:
        assert set(names.EVENT_FIELDS) <= set(event)
        assert set(names.ACTION_FIELDS.get(event["kind"], ())) <= set(event)
