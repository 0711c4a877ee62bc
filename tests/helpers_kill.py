"""A callback that ends its own process with SIGKILL at a given step: a ``kill -9`` at a known
point of a run (no exception, no exit handler, no flush), for the resume tests."""

import os
import signal
import time

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    """SIGKILL this process at the start of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PauseAt(Callback):
    """At optimizer step ``step``, create ``marker`` and wait while ``hold`` exists: a run
    caught mid-training, for as long as a test needs it there."""

    def __init__(self, step: int, hold: str, marker: str) -> None:
        self.step, self.hold, self.marker = step, hold, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            open(self.marker, "w").close()
            while os.path.exists(self.hold):
                time.sleep(0.05)
