"""Callbacks the run tests inject through the config."""
from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl


class InterruptAt(pl.Callback):
    """Raise ``KeyboardInterrupt`` (what Ctrl-C raises) at the end of step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class RecordConsoleHandlers(pl.Callback):
    """Record the types of the root logger's handlers while training runs."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen |= {type(handler).__name__ for handler in logging.getLogger().handlers}
