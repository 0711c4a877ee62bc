"""Lightning wrappers of the LLM: :class:`LLMModule` (model, loss, optimizer, schedule) and
:class:`ByteTextDataModule` (the cached byte stream), both LightningCLI/YAML-ready."""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from mxprobe.models.lit_base import LrSchedule, MxLitModule, check_adam
from mxprobe.models.llm import LLM, LLMConfig
from mxprobe.models.text_data import TrainWindows, ValWindows, build_cache, load_cache
from torch.utils.data import DataLoader

# A checkpoint's hyperparameters hold the LLMConfig: plain data, allowed to weights_only loading
# (LightningCLI reads them from a --ckpt_path with torch.load(weights_only=True)).
torch.serialization.add_safe_globals([LLMConfig])


class LLMModule(MxLitModule):
    """The OLMo-style byte-level LLM trained as in the paper, MX-emulated by ``scheme``.

    Args:
        config: architecture (``LLMConfig``); ``None`` is the ``tiny`` size.
        scheme: precision scheme string given to ``mxprobe.convert`` (``"fp32"``,
            ``"mxfp8_e4m3"``, ``"w=e4m3,a=bf16"``, ...). The model is converted even under
            ``fp32``, so callbacks can switch precision mid-run.
        overrides: ordered ``{module-name glob: scheme or partial string}``, first match wins
            (e.g. ``{"*ln*": "norm=bf16"}``).
        lr: peak learning rate.
        betas, eps, weight_decay: AdamW's; the paper's (0.9, 0.95), 1e-15, 0. Weight decay
            applies to matrices only (not norms).
        warmup_fraction: share of ``trainer.max_steps`` spent in linear warmup (paper: 0.2).
        final_lr_fraction: lr at the end of the cosine decay over the peak (paper: 0.1).

    Logs ``train/loss`` every step and, after each validation pass, ``val/loss`` (nats per
    byte) and ``val/bpb`` (bits per byte = val/loss / ln 2) over the whole validation set,
    reduced exactly across DDP ranks. Gradient clipping is the Trainer's
    (``gradient_clip_val: 1.0`` in the YAML). Conversion (all-fp32 modules run PyTorch's own
    forward), ``train/loss``, the LR schedule and the schemes in checkpoints are those of the
    base, :class:`~mxprobe.models.lit_base.MxLitModule`.

    Raises:
        ValueError: for a non-positive lr, betas outside [0, 1), a negative eps or weight decay,
            a fraction outside [0, 1]; from ``configure_optimizers`` when the run has no
            finite length (``trainer.max_steps`` unset): the schedule needs one.

    Example::

        model = LLMModule(LLMConfig(size="tiny"), scheme="mxfp8_e4m3")
        trainer = pl.Trainer(max_steps=200, gradient_clip_val=1.0)
        trainer.fit(model, ByteTextDataModule(context=model.config.context))
    """

    def __init__(
        self,
        config: LLMConfig | None = None,
        scheme: str = "fp32",
        overrides: dict[str, str] | None = None,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-15,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.2,
        final_lr_fraction: float = 0.1,
    ):
        super().__init__()
        check_adam(
            lr,
            betas,
            eps,
            warmup_fraction=warmup_fraction,
            final_lr_fraction=final_lr_fraction,
        )
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.save_hyperparameters()
        self.config = config or LLMConfig()
        self.model = self.convert_network(LLM(self.config), scheme, overrides)
        self._val_totals: torch.Tensor | None = None

    @property
    def context(self) -> int:
        return self.config.context

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def compute_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean next-byte cross-entropy (nats) of a batch; no logging, no side effects."""
        inputs, targets = batch
        logits = self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def on_validation_epoch_start(self) -> None:
        self._val_totals = torch.zeros(2, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        tokens = batch[1].numel()
        self._val_totals += torch.stack(
            [
                self.compute_loss(batch).detach() * tokens,
                torch.tensor(float(tokens), device=self.device),
            ]
        )

    def on_validation_epoch_end(self) -> None:
        # A sum over all ranks' tokens, not a mean of per-rank means: ranks may hold different
        # numbers of validation windows.
        loss_sum, tokens = self.trainer.strategy.reduce(self._val_totals, reduce_op="sum")
        loss = loss_sum / tokens.clamp_min(1)
        # Already identical on every rank; sync_dist only keeps Lightning from warning about it.
        self.log_dict({"val/loss": loss, "val/bpb": loss / math.log(2)}, sync_dist=True)

    def make_optimizer(self) -> torch.optim.Optimizer:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        return torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
        )

    def lr_schedule(self) -> LrSchedule:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "the cosine schedule needs the run's length: set trainer.max_steps "
                "(the training stream is endless, so epochs never end)"
            )
        warmup = max(1, round(self.hparams.warmup_fraction * total))
        return LrSchedule("cosine", warmup, int(total), self.hparams.final_lr_fraction)


class ByteTextDataModule(pl.LightningDataModule):
    """Byte-level text from files/directories (default: the Python standard library's sources).

    Args:
        paths: files or directories; ``None`` is the standard library's ``.py`` files.
        suffixes: keep only files in directories ending with one of these (``None``: all).
        cache_dir: where the tokenised memmap lives (default ``$MXPROBE_CACHE`` or
            ``~/.cache/mxprobe``); keyed by the file list with sizes and mtimes.
        context: tokens per window; ``mxprobe llm`` links it to the model's context.
        batch_size: windows per batch on each rank (the global batch is ``batch_size *
            world_size``).
        val_fraction: tail of the byte stream held out for validation.
        val_windows: validation windows evaluated per pass (``None``: the whole split).
        max_bytes: truncate the corpus to this many bytes (``None``: all of it).
        seed: the sampling seed; batch ``i`` depends only on ``(seed, i)``.
        num_workers: DataLoader worker processes for the training stream.

    Nothing is downloaded: the corpus is read from local disk once, in ``prepare_data`` (rank 0
    only under DDP), and memory-mapped by every rank in ``setup``. Each rank draws its own slice
    of the global batch; after a resume the stream continues from the restored step.

    Raises:
        FileNotFoundError / ValueError: from ``prepare_data`` for a missing path, an empty
            corpus, or one too small to split.
    """

    def __init__(
        self,
        paths: list[str] | None = None,
        suffixes: list[str] | None = None,
        cache_dir: str | None = None,
        context: int = 64,
        batch_size: int = 16,
        val_fraction: float = 0.01,
        val_windows: int | None = 256,
        max_bytes: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.paths, self.suffixes, self.cache_dir = paths, suffixes, cache_dir
        self.context, self.batch_size, self.seed = context, batch_size, seed
        self.val_fraction, self.val_windows, self.max_bytes = val_fraction, val_windows, max_bytes
        self.num_workers = num_workers
        self.splits = None

    def _build(self) -> os.PathLike:
        return build_cache(
            self.paths,
            suffixes=self.suffixes,
            cache_dir=self.cache_dir,
            val_fraction=self.val_fraction,
            max_bytes=self.max_bytes,
        )

    def prepare_data(self) -> None:
        self._build()

    def setup(self, stage: str | None = None) -> None:
        # Builds only if prepare_data did not run (e.g. the datamodule used without a Trainer).
        self.splits = load_cache(self._build())

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        start = 0
        if self.trainer is not None:  # resume: batches already consumed by restored steps
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        dataset = TrainWindows(
            self.splits.train,
            self.context,
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            start_batch=start,
        )
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        dataset = ValWindows(
            self.splits.val,
            self.context,
            self.batch_size,
            max_windows=self.val_windows,
            rank=rank,
            world_size=world,
        )
        return DataLoader(dataset, batch_size=None)
