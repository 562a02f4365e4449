"""A callback the DDP test injects through the config: every rank dumps what it trained."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


class SaveTrainedWeights(pl.Callback):
    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.items: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.items += batch["image_index"].tolist()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "weights": {k: v.cpu() for k, v in pl_module.trained_state_dict().items()},
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "items": self.items,
            },
            self.folder / f"rank{trainer.global_rank}.pt",
        )
