"""A tiny proxy LightningCLI config shared by the proxy CLI and sweep tests."""


def tiny_config(max_steps: int, batch_size: int) -> dict:
    """A config that trains a one-block, width-32 proxy for ``max_steps`` steps, no validation."""
    return {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
        },
        "model": {"depth": 1, "width": 32, "lr": 1e-3},
        "data": {"batch_size": batch_size, "val_batches": 0},
    }
