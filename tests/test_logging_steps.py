"""Every monitor reading appears once, on the row of the step it measured, for any
``log_every_n_steps`` (Lightning's own throttling would delay and repeat it)."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from mxprobe.callbacks import GradientBiasMonitor, LossSpikeDetector, NormAffineMonitor

from tests.helpers_lightning import TinyMx, trainer

COLUMNS = ("mx/norm_affine/model.0.norm/weight_mean", "mx/grad_bias/total/zeta")
SPIKES = "mx/spikes/total/loss"  # the detector logs every log_every_n_steps steps


def readings(tmp_path, log_every_n_steps: int) -> dict[str, list[tuple[int, float]]]:
    callbacks = [
        NormAffineMonitor(every_n_steps=5),
        GradientBiasMonitor(every_n_steps=5, per_module=False),
        LossSpikeDetector(window=4),
    ]
    logger = CSVLogger(tmp_path, name="", version="")
    run = trainer(tmp_path, 11, callbacks, logger=logger, log_every_n_steps=log_every_n_steps)
    run.fit(TinyMx(seed=3))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        c: [(int(r["step"]), float(r[c])) for r in rows if r.get(c)] for c in (*COLUMNS, SPIKES)
    }


def test_readings_sit_once_on_their_own_step_whatever_log_every_n_steps(tmp_path):
    every = readings(tmp_path / "n1", 1)
    spikes = every.pop(SPIKES)
    for column, series in every.items():
        assert [s for s, _ in series] == [0, 5, 10], column
    # Step 0 is measured before the first update: a fresh LayerNorm's gamma, mean exactly 1.
    assert every[COLUMNS[0]][0] == (0, 1.0)
    assert [s for s, _ in spikes] == list(range(11))
    for n in (5, 7):
        got = readings(tmp_path / f"n{n}", n)
        got_spikes = got.pop(SPIKES)
        assert got == every, f"log_every_n_steps={n}"
        assert got_spikes == [(s, v) for s, v in spikes if s % n == 0], n
