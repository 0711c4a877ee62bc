"""Byte-level corpus, cached memmap, deterministic DDP-sharded sampling."""

import os
import socket

import numpy as np
import pytest
import torch
from mxprobe.models.text_data import (
    DOCUMENT_SEPARATOR,
    TrainWindows,
    ValWindows,
    build_cache,
    corpus_files,
    load_cache,
    stdlib_root,
)
from torch.utils.data import DataLoader


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "pkg").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / ".git").mkdir()
    for i in range(12):
        (root / "pkg" / f"m{i}.py").write_bytes(bytes([65 + i]) * (1000 + 50 * i))
    (root / "notes.txt").write_text("not python")
    (root / "__pycache__" / "m0.py").write_text("skipped")
    (root / ".git" / "x.py").write_text("skipped")
    return root


def test_corpus_files_walks_filters_and_orders_deterministically(corpus):
    files = corpus_files([corpus], suffixes=[".py"])
    names = [name for name, _ in files]
    assert sorted(names) == sorted(f"pkg/m{i}.py" for i in range(12))
    assert names != sorted(names)  # shuffled by name hash, so the held-out tail is a sample
    assert corpus_files([corpus], suffixes=[".py"]) == files
    assert len(corpus_files([corpus])) == 13  # no suffix filter: notes.txt too
    assert corpus_files([corpus / "notes.txt"]) == [("notes.txt", corpus / "notes.txt")]


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus_files([tmp_path / "missing"])
    with pytest.raises(ValueError, match="no corpus files"):
        corpus_files([tmp_path], suffixes=[".py"])


def test_default_corpus_is_the_standard_library():
    files = corpus_files(None)
    assert len(files) > 100
    assert all(p.suffix == ".py" and p.is_relative_to(stdlib_root()) for _, p in files)
    assert not any("site-packages" in p.parts for _, p in files)


def test_cache_holds_the_files_separated_and_splits_at_a_file_boundary(corpus, tmp_path):
    files = corpus_files([corpus], suffixes=[".py"])
    directory = build_cache([corpus], suffixes=[".py"], cache_dir=tmp_path / "c", val_fraction=0.2)
    splits = load_cache(directory)
    stream = b"".join(p.read_bytes() + DOCUMENT_SEPARATOR for _, p in files)
    assert bytes(splits.train) + bytes(splits.val) == stream
    assert splits.train.dtype == np.uint8 and splits.meta["files"] == 12
    assert bytes(splits.train)[-1:] == DOCUMENT_SEPARATOR  # cut between two files
    assert 0.1 < len(splits.val) / len(stream) < 0.3


def test_cache_is_reused_and_rebuilt_when_a_file_changes(corpus, tmp_path):
    kw = dict(suffixes=[".py"], cache_dir=tmp_path / "c", val_fraction=0.2)
    first = build_cache([corpus], **kw)
    stamp = os.stat(first / "tokens.bin").st_mtime_ns
    assert build_cache([corpus], **kw) == first
    assert os.stat(first / "tokens.bin").st_mtime_ns == stamp
    target = corpus / "pkg" / "m3.py"
    target.write_bytes(b"changed" * 100)
    second = build_cache([corpus], **kw)
    assert second != first and b"changed" in bytes(load_cache(second).train) + bytes(
        load_cache(second).val
    )
    assert build_cache([corpus], **{**kw, "val_fraction": 0.3}) not in (first, second)
    assert not [p for p in (tmp_path / "c" / "text").iterdir() if p.name.startswith(".")]


def test_one_file_corpus_splits_mid_file_and_tiny_corpora_are_refused(tmp_path):
    big = tmp_path / "one.txt"
    big.write_bytes(bytes(range(256)) * 40)
    splits = load_cache(build_cache([big], cache_dir=tmp_path / "c", val_fraction=0.25))
    assert abs(len(splits.val) - 0.25 * (len(big.read_bytes()) + 1)) <= 1
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 500)
    with pytest.raises(ValueError, match="too small"):
        build_cache([small], cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="val_fraction"):
        build_cache([big], cache_dir=tmp_path / "c", val_fraction=1.5)


def test_max_bytes_truncates_the_stream(corpus, tmp_path):
    directory = build_cache([corpus], cache_dir=tmp_path / "c", max_bytes=6000, val_fraction=0.4)
    splits = load_cache(directory)
    assert len(splits.train) + len(splits.val) == 6000


def test_nothing_touches_the_network(corpus, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    splits = load_cache(build_cache([corpus], cache_dir=tmp_path / "c", val_fraction=0.2))
    next(iter(TrainWindows(splits.train, 16, 2)))


def _tokens(n=5000):
    return np.random.default_rng(0).integers(0, 256, n).astype(np.uint8)


def test_train_windows_are_deterministic_shifted_and_in_range():
    tokens = _tokens()
    stream = TrainWindows(tokens, context=32, batch_size=4, seed=1)
    x, y = stream.batch(7)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    torch.testing.assert_close(TrainWindows(tokens, 32, 4, seed=1).batch(7)[0], x)
    assert not torch.equal(TrainWindows(tokens, 32, 4, seed=2).batch(7)[0], x)
    assert not torch.equal(stream.batch(8)[0], x)
    t = torch.from_numpy(tokens.astype(np.int64))
    for row in range(4):  # every row is a contiguous window of the stream
        starts = [s for s in range(len(t) - 32) if torch.equal(t[s : s + 32], x[row])]
        assert starts


def test_ranks_share_one_global_batch_and_resume_continues_the_stream():
    tokens = _tokens()
    whole = TrainWindows(tokens, 16, 6, seed=3)
    ranks = [TrainWindows(tokens, 16, 3, seed=3, rank=r, world_size=2) for r in range(2)]
    for i in (0, 5):
        torch.testing.assert_close(torch.cat([r.batch(i)[0] for r in ranks]), whole.batch(i)[0])
    stream = iter(TrainWindows(tokens, 16, 6, seed=3, start_batch=5))
    torch.testing.assert_close(next(stream)[0], whole.batch(5)[0])
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        TrainWindows(tokens, 16, 3, rank=2, world_size=2)


def test_dataloader_workers_keep_the_batch_order():
    # Two worker processes: batch i comes from its own numpy generator seeded (seed, i), not from
    # any global generator, so which worker draws it does not matter.
    stream = TrainWindows(_tokens(), 16, 2, seed=0)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    got = [x for (x, _), _ in zip(loader, range(5), strict=False)]
    for i, x in enumerate(got):
        torch.testing.assert_close(x, stream.batch(i)[0])


def test_validation_windows_are_fixed_disjoint_and_partitioned_by_rank():
    tokens = _tokens(1000)
    everything = torch.cat([x for x, _ in ValWindows(tokens, 32, 5)])
    assert everything.shape == ((1000 - 1) // 32, 32)
    torch.testing.assert_close(everything[1], torch.from_numpy(tokens[32:64].astype(np.int64)))
    capped = torch.cat([x for x, _ in ValWindows(tokens, 32, 5, max_windows=7)])
    torch.testing.assert_close(capped, everything[:7])
    shards = [
        torch.cat([x for x, _ in ValWindows(tokens, 32, 2, max_windows=7, rank=r, world_size=3)])
        for r in range(3)
    ]
    assert [len(s) for s in shards] == [3, 2, 2]
    torch.testing.assert_close(shards[1], everything[1:7:3])
