"""What a training run did, and the one schema of the results tables: compare's and the demo's
``summary.csv`` (:data:`SUMMARY_COLUMNS`), a sweep's ``results.csv`` (its run and grid columns,
then :data:`RESULT_COLUMNS`), all written by :func:`mxprobe.atomic.write_csv`.

Separate from :mod:`mxprobe.app.training` so that what reads the tables (the report) does not
import Lightning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from mxprobe.outcome import DivergenceTracker


@dataclass(frozen=True)
class RunResult:
    """What one run did: its divergence summary (:meth:`DivergenceTracker.summary`: the final
    and smallest finite loss, whether and where it diverged, its recovered spikes), the steps
    it trained, and its wall-clock and process CPU seconds."""

    final_loss: float
    min_loss: float
    diverged: bool
    divergence_step: int | None
    recovered_spikes: int
    steps: int
    wall_s: float
    cpu_s: float

    @classmethod
    def of(cls, tracker: DivergenceTracker, wall_s: float, cpu_s: float) -> RunResult:
        """The result of the run ``tracker`` watched (seconds rounded to 0.1)."""
        return cls(
            **tracker.summary(), steps=tracker.step, wall_s=round(wall_s, 1), cpu_s=round(cpu_s, 1)
        )

    def to_row(self) -> dict:
        """The result as a table row keyed by :data:`RESULT_COLUMNS`, values typed (a bool, None
        for no divergence step): :func:`mxprobe.atomic.write_csv` renders them."""
        return asdict(self)


RESULT_COLUMNS = tuple(f.name for f in fields(RunResult))
# compare's and the demo's summary.csv: the run (its scheme and seed), then its result.
SUMMARY_COLUMNS = ("scheme", "seed", *RESULT_COLUMNS)
