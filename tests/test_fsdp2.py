"""Two-process CPU FSDP2 (Lightning's ModelParallelStrategy, ``fully_shard`` in
``configure_model``, gloo): MX training with every monitor, the spike detector and a rule that
rewinds and snaps, in one fit checkpointed at step 7; then a second fit resumed from there; under
MXFP8 and under NVIDIA's NVFP4 recipe with the norms in NVFP4.

As in test_callbacks_ddp.py, Lightning starts the other rank by re-running the script, so the
run lives in ``main()`` of this file, executed as a subprocess; each rank writes what it saw to a
JSON file.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_lightning import run_ranks

pytestmark = pytest.mark.slow  # two processes (gloo FSDP2)

ROOT = Path(__file__).resolve().parents[1]


# The schemes the run is tested under, and how each puts a gamma in its norm_affine format.
SCHEMES = {
    "mxfp8_e4m3": ("quantize_mx", {"fmt": "e4m3"}),
    # NVIDIA's recipe with the norms in NVFP4 (two-level: the per-tensor scale needs the full
    # gamma); stochastic rounding and the Hadamard signs drawn per rank and step.
    "nvfp4_recipe,norm=nvfp4": ("quantize_nvfp4", {"tensor_scale": "amax"}),
}


def main(out_dir: str, scheme: str) -> None:
    sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl
    import torch

    torch.set_num_threads(1)
    from lightning.pytorch.callbacks import ModelCheckpoint
    from mxprobe.callbacks import (
        ActivationMonitor,
        GradientBiasMonitor,
        LossSpikeDetector,
        NormAffineMonitor,
        PrecisionIntervention,
    )
    from torch.distributed.tensor import DTensor

    import mxprobe
    from tests.helpers_fsdp2 import TinyMxFsdp2, fsdp2_trainer

    name, kwargs = SCHEMES[scheme]
    quantize = getattr(mxprobe, name)

    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            t = t.to_local() if isinstance(t, DTensor) else t
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    class Record(pl.Callback):
        """After the intervention's hook (it is listed later): this rank's shards of the weights
        and Adam state at each step's start, the gathered gammas, and the mx/ metrics."""

        def __init__(self):
            self.states, self.metrics, self.snapped = {}, {}, {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step
            params = [p for n, p in pl_module.named_parameters() if "norm" not in n]
            moments = [
                v
                for s in trainer.optimizers[0].state.values()
                for k, v in sorted(s.items())
                if k != "step"
            ]
            gammas = [
                m.weight.full_tensor() for m in pl_module.model.modules() if hasattr(m, "eps")
            ]
            self.states[step] = {
                "weights": digest(params),
                "moments": digest(moments),
                "gammas": [g.tolist() for g in gammas],
                "gammas_forward": [quantize(g, **kwargs).tolist() for g in gammas],
                "local_numel": [p.to_local().numel() for p in pl_module.parameters()],
            }

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.metrics[trainer.global_step - 1] = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mx/")
            }

    rule = {
        "name": "rewind-to-bf16",
        "trigger": {"kind": "step", "at": 6},
        "action": {
            "kind": "rewind",
            "steps": 2,
            "then": {"kind": "set_scheme", "scheme": "norm=bf16", "snap": True},
        },
    }

    def fit(max_steps: int, **fit_kwargs):
        intervention = PrecisionIntervention(rules=[rule], snapshot_every=2, keep_snapshots=2)
        record = Record()
        callbacks = [
            intervention,
            record,
            LossSpikeDetector(window=3),
            GradientBiasMonitor(every_n_steps=2),
            NormAffineMonitor(every_n_steps=2),
            ActivationMonitor(every_n_steps=2),
            ModelCheckpoint(os.path.join(out_dir, "ckpt"), every_n_train_steps=7, save_top_k=-1),
        ]
        module = TinyMxFsdp2(scheme=scheme)
        run = fsdp2_trainer(out_dir, max_steps, callbacks, enable_checkpointing=True)
        run.fit(module, **fit_kwargs)
        moments = [v for s in run.optimizers[0].state.values() for k, v in s.items() if k != "step"]
        return run, module, intervention, record, digest(module.parameters()), digest(moments)

    # The full run, checkpointed at step 7 (after the rewind and switch at 6); then a run
    # resumed from that checkpoint.
    run, module, intervention, record, weights, moments = fit(9)
    ckpt = os.path.join(out_dir, "ckpt", "epoch=0-step=7.ckpt")
    _, resumed, resumed_intervention, _, resumed_weights, resumed_moments = fit(9, ckpt_path=ckpt)
    result = {
        "rank": run.global_rank,
        "timeline": [(e["step"], e["kind"], e.get("rewound_to")) for e in intervention.timeline],
        "norm_affine": sorted(
            {s.norm_affine for n, s in mxprobe.schemes_of(module).items() if n.endswith("norm")}
        ),
        "sharded": all(isinstance(p, DTensor) for p in module.parameters()),
        "states": record.states,
        "metrics": record.metrics,
        "final": [weights, moments],
        "resumed_final": [resumed_weights, resumed_moments],
        "resumed_schemes": [str(s) for s in mxprobe.schemes_of(resumed).values()],
        "schemes": [str(s) for s in mxprobe.schemes_of(module).values()],
        "resumed_timeline": resumed_intervention.timeline == intervention.timeline,
    }
    with open(os.path.join(out_dir, f"rank{run.global_rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_fsdp2_monitors_rewind_snap_and_resume(tmp_path, scheme):
    # Two processes: what they share (port, tmp_path, seeds) is safe, see run_ranks; the
    # checkpoint under tmp_path/ckpt is Lightning's distributed one, each rank its own shard
    # files between barriers, and the resumed fit saves nothing (its steps 8, 9 are not 7k).
    ranks = run_ranks(__file__, tmp_path, scheme)
    for r in ranks:
        assert r["sharded"]
        # d = 32 over two ranks: gamma shards of 16, a block of 32 straddles them.
        assert r["states"]["0"]["local_numel"][0] == 16
        assert r["timeline"] == [[6, "rewind", 4], [6, "set_scheme", None]]
        assert r["norm_affine"] == ["bf16"]
        states = r["states"]
        # The rewind at step 6 put back this rank's shards of step 4 exactly: the weights and
        # the Adam moments.
        assert states["6"]["weights"] == states["4"]["weights"] != states["5"]["weights"]
        assert states["6"]["moments"] == states["4"]["moments"]
        # snap=True: each gamma is the value the step-4 forward used (e4m3 or NVFP4 of the
        # full gamma), on every rank.
        assert states["6"]["gammas"] == states["4"]["gammas_forward"]
        assert states["6"]["gammas"] != states["4"]["gammas"]
        # Resumed from step 7 (Lightning's distributed checkpoint): the same weights and Adam
        # state bit for bit, the schemes (norm=bf16, from checkpoint["mx_precision"]) and the
        # timeline back.
        assert r["resumed_final"] == r["final"]
        assert r["resumed_schemes"] == r["schemes"] and r["resumed_timeline"]
    # Every reading of every monitor is the same on both ranks (statistics of the full
    # tensors), the spike detector's gradient norm included (its shard squares are summed).
    zero, one = (r["metrics"] for r in ranks)
    assert zero == one
    names = set().union(*zero.values())
    prefixes = ("mx/grad_bias/total/", "mx/norm_affine/model.0.norm/", "mx/activations/")
    for prefix in (*prefixes, "mx/spikes/total/grad_norm"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert 0 < zero["2"]["mx/grad_bias/total/zeta"] < 1
    assert zero["2"]["mx/norm_affine/model.0.norm/in_force"] == 1.0
    assert zero["6"]["mx/norm_affine/model.0.norm/in_force"] == 0.0


_TENSOR_PARALLEL = """
import os, tempfile
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from mxprobe.callbacks.distributed import check_fsdp2_sharding

store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
layer = nn.Linear(4, 4)
layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
check_fsdp2_sharding(layer, "GradientBiasMonitor")
layer.bias = nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Replicate()]))
try:
    check_fsdp2_sharding(layer, "GradientBiasMonitor")
except Exception as exc:
    print(type(exc).__name__, exc)
dist.destroy_process_group()
"""


def test_sharding_other_than_fsdp2_is_refused_by_name():
    # One process (world size 1) on a FileStore in a fresh temporary directory: no port.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _TENSOR_PARALLEL],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.startswith("MisconfigurationException GradientBiasMonitor supports")
    assert "'bias' has placements (Replicate(),)" in done.stdout


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
