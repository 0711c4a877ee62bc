"""Divergence rates with exact intervals, and the tests between arms, from outcome tables (a
compare's ``summary.csv``, a sweep's ``results.csv``).

- Rate: ``k/n`` with its 95 % Clopper–Pearson interval,
  ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``.
- Two arms run on the same seeds (paired): exact McNemar, the two-sided binomial test of the
  discordant seeds (diverged in one arm only) against 1/2.
- Two arms on different seeds: Fisher's exact test on the 2×2 table of diverged / not.

Rows whose ``diverged`` is neither true nor false (:func:`mxprobe.outcome.read_diverged`:
unfinished runs) are left out and counted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from scipy.stats import binomtest, fisher_exact

from mxprobe.atomic import write_csv
from mxprobe.outcome import read_diverged

RATE_COLUMNS = ("arm", "n", "diverged", "rate", "ci_low", "ci_high", "unfinished")
TEST_COLUMNS = (
    "arm_a", "arm_b", "test", "n", "a_diverged", "b_diverged", "a_only", "b_only", "p_value"
)  # fmt: skip
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Rate:
    arm: str
    n: int
    diverged: int
    low: float
    high: float
    unfinished: int = 0

    @property
    def rate(self) -> float:
        return self.diverged / self.n if self.n else float("nan")

    def words(self) -> str:
        """``k/n (low–high %)``."""
        if not self.n:
            return "0/0 (no finished run)"
        return f"{self.diverged}/{self.n} ({100 * self.low:.1f}–{100 * self.high:.1f} %)"

    def row(self) -> dict:
        return {
            "arm": self.arm,
            "n": self.n,
            "diverged": self.diverged,
            "rate": round(self.rate, 6),
            "ci_low": round(self.low, 6),
            "ci_high": round(self.high, 6),
            "unfinished": self.unfinished,
        }


def rate(arm: str, diverged: int, n: int, unfinished: int = 0) -> Rate:
    if n == 0:
        return Rate(arm, 0, 0, float("nan"), float("nan"), unfinished)
    ci = binomtest(diverged, n).proportion_ci(confidence_level=CONFIDENCE, method="exact")
    return Rate(arm, n, diverged, float(ci.low), float(ci.high), unfinished)


def by_arm(rows: list[dict], arm_of, seed_of=None) -> dict[str, dict[str, bool | None]]:
    """``{arm: {seed: diverged (None: unfinished)}}`` in the order arms first appear; the
    seed is the row's ``seed`` unless ``seed_of`` says otherwise."""
    seed_of = seed_of or (lambda row: str(row.get("seed", "")))
    arms: dict[str, dict[str, bool | None]] = {}
    for row in rows:
        arms.setdefault(arm_of(row), {})[seed_of(row)] = read_diverged(row.get("diverged"))
    return arms


def rates(arms: dict[str, dict[str, bool | None]]) -> list[Rate]:
    out = []
    for arm, seeds in arms.items():
        done = [d for d in seeds.values() if d is not None]
        out.append(rate(arm, sum(done), len(done), len(seeds) - len(done)))
    return out


def arm_tests(arms: dict[str, dict[str, bool | None]]) -> list[dict]:
    """One row per pair of arms: McNemar where both ran the same finished seeds, else Fisher."""
    rows = []
    for (a, sa), (b, sb) in itertools.combinations(arms.items(), 2):
        fa = {s: d for s, d in sa.items() if d is not None}
        fb = {s: d for s, d in sb.items() if d is not None}
        if fa and set(fa) == set(fb):
            a_only = sum(fa[s] and not fb[s] for s in fa)
            b_only = sum(fb[s] and not fa[s] for s in fa)
            discordant = a_only + b_only
            p = binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
            test, n, only = "exact McNemar (paired seeds)", len(fa), (a_only, b_only)
        elif fa and fb:
            ka, kb = sum(fa.values()), sum(fb.values())
            p = fisher_exact([[ka, len(fa) - ka], [kb, len(fb) - kb]]).pvalue
            test, n, only = "Fisher exact (unpaired)", len(fa) + len(fb), ("", "")
        else:
            continue
        rows.append(
            {
                "arm_a": a,
                "arm_b": b,
                "test": test,
                "n": n,
                "a_diverged": sum(fa.values()),
                "b_diverged": sum(fb.values()),
                "a_only": only[0],
                "b_only": only[1],
                "p_value": round(float(p), 6),
            }
        )
    return rows


def write_tables(out, arms: dict[str, dict[str, bool | None]]) -> list[Rate]:
    """``rates.csv`` and ``tests.csv`` in ``out`` (each atomically); the rates."""
    found = rates(arms)
    write_csv(out / "rates.csv", [r.row() for r in found], RATE_COLUMNS)
    write_csv(out / "tests.csv", arm_tests(arms), TEST_COLUMNS)
    return found
