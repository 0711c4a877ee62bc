"""Progress of several training runs in worker processes, shown by the parent.

Each run carries a :class:`ProgressReporter` callback that posts ``(run, step, loss)`` to a queue
the parent shares with its workers (:func:`set_queue`, the pool's initializer). The parent's
:class:`ProgressBoard` draws one progress bar per run on an interactive terminal, and otherwise
(a log file, CI) prints one plain line per run every few seconds: no carriage-return frames.
"""

from __future__ import annotations

import math
import queue as queue_module
import sys
import time

import lightning.pytorch as pl

_QUEUE = None


def set_queue(q) -> None:
    """Pool initializer: the queue this worker's reporters post to."""
    global _QUEUE
    _QUEUE = q


class ProgressReporter(pl.Callback):
    """Posts the run's global step and training loss at most every ``every_s`` seconds.

    Args:
        run: the run's name on the board.
        total: the step budget (``trainer.max_steps``).
        every_s: seconds between two posts.

    Without a queue (the run's config replayed by ``mxprobe proxy fit``) it does nothing.
    """

    def __init__(self, run: str, total: int, every_s: float = 0.5) -> None:
        self.run = run
        self.total = total
        self.every_s = every_s
        self._last = 0.0

    def _post(self, message: tuple) -> None:
        if _QUEUE is not None:
            _QUEUE.put(message)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._post((self.run, trainer.global_step, float(loss), self.total))

    def on_train_end(self, trainer, pl_module) -> None:
        self._post((self.run, trainer.global_step, None, self.total))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressBoard:
    """The parent's view of the runs' progress (bars on a TTY, plain lines elsewhere)."""

    def __init__(self, runs: list[str], stream=None, line_every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.line_every_s = line_every_s
        self.state: dict[str, dict] = {
            r: {"step": 0, "loss": math.nan, "done": False} for r in runs
        }
        self._width = max(map(len, runs))
        self._last_lines = time.monotonic()
        self._bars = {}
        if self.tty:
            from tqdm import tqdm

            for i, run in enumerate(runs):
                self._bars[run] = tqdm(
                    total=1, desc=run.ljust(self._width), position=i, file=self.stream, leave=True
                )

    def poll(self, q, timeout: float) -> None:
        """Take every message waiting in ``q`` (blocking up to ``timeout``) and show them."""
        try:
            message = q.get(timeout=timeout)
            while True:
                self._update(*message)
                message = q.get_nowait()
        except queue_module.Empty:
            pass
        if not self.tty and time.monotonic() - self._last_lines >= self.line_every_s:
            self._last_lines = time.monotonic()
            for run, s in self.state.items():
                if s.get("started") and not s["done"]:
                    self._print_line(run, s)

    def _update(self, run: str, step: int, loss: float | None, total: int) -> None:
        s = self.state[run]
        if not s.get("started"):
            s.update(started=True, start=time.monotonic(), first_step=step)
        s.update(step=step, total=total)
        if loss is None:
            s["done"] = True
        else:
            s["loss"] = loss
        if self.tty:
            bar = self._bars[run]
            bar.total = total
            bar.n = min(step, total)
            bar.set_postfix_str(f"loss {s['loss']:.4g}" + (" done" if s["done"] else ""))
        elif s["done"]:
            self._print_line(run, s)

    def _eta(self, s: dict) -> float:
        done = s["step"] - s["first_step"]
        if done <= 0:
            return math.inf
        return (time.monotonic() - s["start"]) / done * max(0, s["total"] - s["step"])

    def _print_line(self, run: str, s: dict) -> None:
        tail = "finished" if s["done"] else f"ETA {_duration(self._eta(s))}"
        print(
            f"[demo] {run:<{self._width}}  step {s['step']:>5}/{s.get('total', '?')}  "
            f"loss {s['loss']:.4g}  {tail}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
