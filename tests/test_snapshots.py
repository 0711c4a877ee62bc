"""SnapshotStore: what it keeps, and that a restore puts weights, buffers and optimizer state
back exactly, in place, without tying the live state to the snapshot."""

import copy

import pytest
import torch
from mxprobe.callbacks.snapshots import SnapshotStore
from torch import nn


def _model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _train(model, optimizer, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def _state(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()["state"])


def _assert_equal(state, other):
    (model, opt), (model2, opt2) = state, other
    assert model.keys() == model2.keys()
    assert all(torch.equal(model[k], model2[k]) for k in model)
    assert opt.keys() == opt2.keys()
    for i in opt:
        assert opt[i].keys() == opt2[i].keys()
        assert all(torch.equal(opt[i][k], opt2[i][k]) for k in opt[i])


def test_restore_is_exact_in_place_and_keeps_hyperparameters():
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, 3, seed=1)
    store = SnapshotStore(every=1, keep=2)
    store.take(model, [optimizer], step=3)
    at_snapshot = _state(model, optimizer)
    _train(model, optimizer, 1, seed=2)
    after_one_step = _state(model, optimizer)
    _train(model, optimizer, 3, seed=3)
    parameters = list(model.parameters())
    optimizer.param_groups[0]["lr"] = 5e-3  # e.g. a scale_lr since the snapshot

    store.restore(model, [optimizer], store.snapshots[0])
    _assert_equal(_state(model, optimizer), at_snapshot)
    assert list(model.parameters()) == parameters  # the same tensors: DDP and optimizers keep them
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], parameters, strict=True))
    assert optimizer.param_groups[0]["lr"] == 5e-3
    # Training from the restored state retraces the original trajectory bit for bit...
    optimizer.param_groups[0]["lr"] = 1e-2
    _train(model, optimizer, 1, seed=2)
    _assert_equal(_state(model, optimizer), after_one_step)
    # ...and has not moved the snapshot: restoring again gives the snapshot's state.
    store.restore(model, [optimizer], store.snapshots[0])
    _assert_equal(_state(model, optimizer), at_snapshot)


def test_keeps_the_newest_and_rewind_drops_the_abandoned_ones():
    model, optimizer = _model_and_optimizer()
    store = SnapshotStore(every=2, keep=3)
    for step in range(9):
        if store.due(step):
            store.take(model, [optimizer], step)
        assert not store.due(step)  # taken once per step
        _train(model, optimizer, 1, seed=step)
    assert [s.step for s in store.snapshots] == [4, 6, 8]
    assert store.rewind(model, [optimizer], step=9, steps=3) == 6
    assert [s.step for s in store.snapshots] == [4, 6]
    with pytest.warns(UserWarning, match="oldest snapshot kept is at step 4"):
        assert store.rewind(model, [optimizer], step=7, steps=5) == 4
    assert [s.step for s in store.snapshots] == [4]

    restored = SnapshotStore(every=2, keep=3)
    restored.load_state_dict(store.state_dict())
    ((ours, theirs),) = zip(restored.snapshots, store.snapshots, strict=True)
    assert ours.step == theirs.step and ours.model is theirs.model
    with pytest.warns(UserWarning, match="no snapshot to rewind to"):
        assert SnapshotStore(every=2, keep=3).rewind(model, [optimizer], step=9, steps=1) is None


@pytest.mark.parametrize(("every", "keep"), [(0, 3), (2, 0), (True, 3), (2, 1.5)])
def test_bad_settings_are_rejected(every, keep):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        SnapshotStore(every, keep)
