"""MoE experts under FSDP2 (two CPU ranks, gloo, ``fully_shard`` per decoder layer): the sharded
MX model's loss and expert gradients equal the unsharded MX model's, and snapping the 3-D expert
weights works across shards. The ranks rendezvous through a file, not a port."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _rank(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import mxprobe
    from tests.helpers_hf import pair, tokens

    sharded, whole = pair("mixtral")
    for model in (sharded, whole):
        model.train()
        mxprobe.convert(model, "mxfp8_e4m3")
    mesh = init_device_mesh("cpu", (world,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    x = tokens()
    losses = []
    for model in (sharded, whole):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.item())
    experts = [m.model.layers[0].mlp.experts for m in (sharded, whole)]
    grads_equal = all(
        torch.equal(getattr(experts[0], n).grad.full_tensor(), getattr(experts[1], n).grad)
        for n in ("gate_up_proj", "down_proj")
    )
    before = experts[1].down_proj.detach().clone()
    changed = mxprobe.amend_scheme(sharded, "w=bf16", "*.experts", snap=True)
    snapped = torch.equal(
        experts[0].down_proj.full_tensor(), mxprobe.quantize_mx(before, "e4m3", axis=-1)
    )
    result = {"losses": losses, "grads_equal": grads_equal, "snapped": snapped}
    result["changed"] = sorted(changed)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_experts_shard_train_and_snap_like_the_unsharded_model(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["losses"][0] == result["losses"][1]
        assert result["grads_equal"] and result["snapped"]
        assert result["changed"] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
