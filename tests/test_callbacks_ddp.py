"""Two-process CPU DDP (gloo): a spike on one rank makes both ranks switch at the same step.

Lightning's DDP launcher starts the other rank by re-running the script, so the run lives in
``main()`` of this file, executed as a subprocess; each rank writes what it saw to a JSON file.
"""

import json
import os
import sys
from pathlib import Path

import pytest

from mxprobe.record import read_events, read_record
from tests.helpers_lightning import run_ranks

pytestmark = pytest.mark.slow  # two processes (gloo DDP)

ROOT = Path(__file__).resolve().parents[1]


def main(out_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    from mxprobe.callbacks import GradientBiasMonitor, LossSpikeDetector, PrecisionIntervention

    import mxprobe
    from tests.helpers_lightning import TinyMx, trainer

    module = TinyMx(spike_at=6, spike_rank=1)
    rule = {
        "name": "spike-to-bf16",
        "trigger": {"kind": "spike"},
        "action": {"kind": "set_scheme", "scheme": "norm=bf16", "modules": "*norm"},
    }
    intervention = PrecisionIntervention(rules=[rule])
    detector = LossSpikeDetector(window=4)

    class Record(GradientBiasMonitor):
        """Also keeps the per-step local loss and the grad-bias metrics of this rank (in class
        attributes: safe, as each rank is its own process with one instance)."""

        local_losses, zetas = {}, {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step - 1
            self.local_losses[step] = float(outputs["loss"])
            zeta = trainer.callback_metrics.get("mx/grad_bias/total/zeta")
            if step % self.every_n_steps == 0:
                self.zetas[step] = float(zeta)

    record = Record(every_n_steps=2)
    run = trainer(out_dir, 9, [intervention, detector, record], strategy="ddp", devices=2)
    run.fit(module)
    result = {
        "rank": run.global_rank,
        "timeline": [(e["step"], e["kind"]) for e in intervention.timeline],
        "spikes": [(e["step"], e["kind"]) for e in detector.spikes],
        "norm_affine": sorted(
            {s.norm_affine for n, s in mxprobe.schemes_of(module).items() if n.endswith("norm")}
        ),
        "local_losses": record.local_losses,
        "zetas": record.zetas,
        "checksum": float(sum(p.double().sum() for p in module.parameters())),
    }
    with open(os.path.join(out_dir, f"rank{run.global_rank}.json"), "w") as f:
        json.dump(result, f)


def test_ddp_ranks_switch_together(tmp_path):
    # Two processes: what they share (port, tmp_path, seeds) is safe, see run_ranks.
    ranks = run_ranks(__file__, tmp_path)
    for r in ranks:
        assert r["spikes"] == [[6, "spike"]]
        assert r["timeline"] == [[7, "set_scheme"]]
        assert r["norm_affine"] == ["bf16"]
    # The spike was injected on rank 1 only; rank 0's own loss stayed normal.
    assert ranks[1]["local_losses"]["6"] > 100 * ranks[0]["local_losses"]["6"]
    # Same weights everywhere, and the same (reduced) gradient statistics on both ranks.
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["zetas"] == ranks[1]["zetas"] and len(ranks[0]["zetas"]) == 5
    # Step 6 is the injected spike, which compute_loss (the shadow) does not reproduce.
    assert all(0 < z < 1 for step, z in ranks[0]["zetas"].items() if step != "6")
    events = read_events(tmp_path)
    assert [(e["step"], e["kind"]) for e in events] == [(6, "spike"), (7, "set_scheme")]
    # The record's loss is the mean over both ranks, each step once.
    steps, losses = read_record(tmp_path).losses
    assert steps == list(range(9))
    for step, loss in zip(steps, losses, strict=True):
        both = [r["local_losses"][str(step)] for r in ranks]
        assert loss == pytest.approx(sum(both) / 2, rel=1e-6)


if __name__ == "__main__":
    main(sys.argv[1])
