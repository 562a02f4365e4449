"""Lightning plugins and callbacks of a ViCo run: checkpoints, exports, previews, progress."""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from ldm.config_schema import ConfigError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import sample_prompt
from ldm.models.export import (
    EXPORT_FORMATS,
    available_formats,
    embedding_name,
    export_files,
    export_trained,
    method_formats,
    run_name,
)
from ldm.models.loading import save_adapter
from ldm.pictures import make_grid, save_png, to_uint8
from ldm.trust import confined_checkpoint_path
from ldm.util import read_checkpoint, write_atomically

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ writing files
class CheckpointWriteError(RuntimeError):
    """A checkpoint or export could not be written (full disk, lost mount); the previous file is intact."""


class NonFiniteTraining(RuntimeError):
    """The loss or the trained weights became NaN or infinite; nothing non-finite was saved."""


def write_file(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """:func:`ldm.util.write_atomically`, with an ``OSError`` turned into one line naming the file."""
    path = Path(path)
    existed = path.exists()
    try:
        write_atomically(path, write)
    except OSError as err:
        kept = f"; the previous {path.name} is unchanged" if existed else ""
        raise CheckpointWriteError(f"cannot write {path}: {err.strerror or err}{kept}") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic writes, reads through the project's safe reader.

    A checkpoint goes to a temporary file in its destination folder (a rename across
    filesystems would be a copy, not atomic), is flushed to disk, then renamed over the old
    one (:func:`ldm.util.write_atomically`): a kill or a full disk leaves the previous
    checkpoint whole. Reading goes through :func:`ldm.util.read_checkpoint`
    (``weights_only=True`` and the project's allow-list), so resuming unpickles nothing else.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_file(path, lambda temporary: torch.save(checkpoint, temporary))

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path)


# ------------------------------------------------------------------ checkpoints
class ViCoCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with ViCo's retention defaults, a final save and a save on Ctrl-C.

    By default only ``last.ckpt`` holds the full resumable state (optimizer included); the
    small trained-weights export is written at every save by :class:`TrainedWeightsExport`.
    ``save_top_k: -1`` also keeps a full ``step=NNNNNN.ckpt`` at every save.

    Lightning saves ``last.ckpt`` at the end of training only when nothing was saved before;
    here the final step is always saved, and a ``KeyboardInterrupt`` saves the state it
    interrupted (then :attr:`interrupted_at` holds the step).

    A save overwrites its file (no ``last-v1.ckpt`` beside a ``last.ckpt`` that a moved run's
    state does not know), and the file names restored from a checkpoint are re-rooted in this
    run's checkpoint folder (:func:`ldm.trust.confined_checkpoint_path`): Lightning deletes a
    "previous best" it reads from the state, and that state may come from someone else.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int = 50,
        save_top_k: int = 0,
        save_last: bool = True,
        filename: str = "step={step:06d}",
        auto_insert_metric_name: bool = False,
        enable_version_counter: bool = False,
        **kwargs: Any,
    ):
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_top_k=save_top_k,
            save_last=save_last,
            filename=filename,
            auto_insert_metric_name=auto_insert_metric_name,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )
        self.interrupted_at: int | None = None

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        step = trainer.global_step
        if not all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters() if p.requires_grad):
            raise NonFiniteTraining(f"the trained weights are not finite after step {step}; {Path(filepath).name} was not overwritten")
        super()._save_checkpoint(trainer, filepath)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def confined(path: Any) -> str:
            return confined_checkpoint_path(path, self.dirpath, self.FILE_EXTENSION)

        best_k_models = state_dict.get("best_k_models") or {}
        super().load_state_dict(
            {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": confined(state_dict.get("best_model_path")),
                "kth_best_model_path": confined(state_dict.get("kth_best_model_path")),
                "last_model_path": confined(state_dict.get("last_model_path")),
                "best_model_score": state_dict.get("best_model_score"),
                "best_k_models": {confined(k): v for k, v in best_k_models.items() if confined(k)},
            }
        )

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            super().on_exception(trainer, pl_module, exception)  # saves only with save_on_exception
            return
        self.interrupted_at = trainer.global_step
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            trainer.save_checkpoint(self.last_path, weights_only=False)  # resumable: optimizer and loops too
            self._last_global_step_saved = trainer.global_step


class StopOnNonFiniteLoss(pl.Callback):
    """Stop before a NaN or infinite loss reaches the weights (a NaN learning rate, an fp16
    overflow), so the last checkpoint on disk stays the last finite one."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise NonFiniteTraining(f"the loss is {loss.detach().float().sum().item()} at step {trainer.global_step}")


class TrainedWeightsExport(pl.Callback):
    """At every checkpoint save, write the trained weights alone, small and shareable.

    In ``<logdir>/checkpoints/``, for each saved step ``N``: the files of
    :func:`ldm.models.export.export_trained` in ``formats``, by default the community formats
    of the method (:func:`ldm.models.export.method_formats`: for ViCo the authors'
    ``cross_attention-N.pt`` / ``embeddings_gs-N.pt`` pair and S* for Textual Inversion tools,
    named after the run; DreamBooth's whole model; Custom Diffusion's diffusers folder); and
    ``adapter.safetensors``, the latest step in this project's format. The exports of the last
    ``keep_last`` saves stay (the paper notes an earlier step may follow prompts better), older
    ones are removed, as ``save_top_k`` does for checkpoints: at Stable Diffusion's size each
    ViCo save adds about 205 MB. Runs wherever a checkpoint is written, so an interrupted run
    leaves an export too.

    Args:
        logdir: run folder.
        formats: any of :data:`ldm.models.export.EXPORT_FORMATS` that the model has (checked
            when training starts); empty: the latest adapter only; ``None``: the method's.
        keep_last: how many saves keep their exports (the latest always does); -1: all.
    """

    def __init__(self, logdir: str, formats: Sequence[str] | None = None, keep_last: int = 3):
        super().__init__()
        unknown = [name for name in formats or () if name not in EXPORT_FORMATS]
        if unknown:
            raise ConfigError(f"unknown export format '{unknown[0]}'; choose from {', '.join(EXPORT_FORMATS)}")
        if keep_last < -1 or keep_last == 0:
            raise ConfigError(
                f"lightning.callbacks.export.params.keep_last must be -1 (all) or at least 1, got {keep_last}"
            )
        self.folder = Path(logdir) / "checkpoints"
        self.run_name = run_name(logdir)
        self.formats = None if formats is None else tuple(formats)
        self.keep_last = keep_last
        self.exported_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse, before the first step, formats asked for that the model has nothing for."""
        missing = [name for name in self.formats or () if name not in available_formats(pl_module)]
        if missing:
            raise ConfigError(
                f"lightning.callbacks.export.params.formats: this model has nothing to write as '{missing[0]}'; "
                f"its formats: {', '.join(available_formats(pl_module))}"
            )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            self.export(pl_module, int(checkpoint["global_step"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(pl_module, trainer.global_step)

    def export(self, model: pl.LightningModule, step: int) -> None:
        if step == self.exported_step:
            return
        config = model.run_config or {}
        try:
            formats = method_formats(model) if self.formats is None else self.formats
            export_trained(model, config, self.folder, step, formats, self.run_name)
            save_adapter(model, config, self.folder / "adapter.safetensors", step)
        except OSError as err:
            raise CheckpointWriteError(f"cannot write the export of step {step} in {self.folder}: {err.strerror or err}") from None
        self.exported_step = step
        self.remove_old_exports(model)

    def remove_old_exports(self, model: pl.LightningModule) -> None:
        """Remove the exports of all but the last ``keep_last`` saved steps."""
        if self.keep_last < 0:
            return
        exports = export_files(self.folder, embedding_name(self.run_name, model))
        for step in sorted(exports)[: -self.keep_last]:
            for path in exports[step]:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)


# ------------------------------------------------------------------ monitoring
class StepTime(pl.Callback):
    """Logs ``train/step_time``: seconds of compute per optimisation step (all its micro-batches).

    Measured from the start of the step's first batch to the end of its last (forward,
    backward, optimiser), so data loading, previews and checkpoints are not counted. On CUDA
    the step is bracketed by two events read only once the GPU has passed them (no host
    synchronisation per step): the value logged at a step is the time of the latest step the
    GPU has finished, usually that step or one a few steps earlier.
    """

    def __init__(self) -> None:
        super().__init__()
        self._start: Any = None
        self._pending: list[tuple[Any, Any]] = []

    @staticmethod
    def _mark(pl_module: pl.LightningModule) -> Any:
        if pl_module.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._start = self._mark(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._start is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        end, start, self._start = self._mark(pl_module), self._start, None
        if not isinstance(end, torch.cuda.Event):
            pl_module.log("train/step_time", end - start, on_step=True, on_epoch=False, batch_size=1)
            return
        self._pending.append((start, end))
        seconds = None
        while self._pending and self._pending[0][1].query():  # query() does not wait for the GPU
            first, last = self._pending.pop(0)
            seconds = first.elapsed_time(last) / 1e3
        if seconds is not None:
            pl_module.log("train/step_time", seconds, on_step=True, on_epoch=False, batch_size=1)


class StepProgressBar(TQDMProgressBar):
    """Progress in optimisation steps out of ``max_steps``.

    A run is one endless epoch bounded by ``max_steps``; Lightning's bars count the batches of
    an epoch and show ``Epoch 0/-2``.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step
        bar.set_description("step")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the session's time stamp, cut to its last characters
        return metrics

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and self._should_update(trainer.global_step, trainer.max_steps):
            bar.n = trainer.global_step
            if trainer.global_step % trainer.log_every_n_steps == 0 or trainer.global_step >= trainer.max_steps:
                # the loss lives on the device: read it only when Lightning logs (and reads it) anyway
                bar.set_postfix(self.get_metrics(trainer, pl_module))
            else:
                bar.refresh()


class ImageLogger(pl.Callback):
    """Every ``batch_frequency`` steps, preview fixed prompts with a fixed seed and reference.

    The same prompts, noise and reference (the first training photo, unflipped) at every
    preview make the images comparable across steps. Writes
    ``<logdir>/images/train/step-XXXXXX.png`` (:mod:`ldm.pictures`, as ``sample.py``'s grids),
    one row per prompt: the reference photo as it was read (not its autoencoder round trip,
    which on a small autoencoder is a smudge), then ``max_images`` guided DDIM samples; the
    prompts go to the ``.txt`` beside it. The grid also goes to every logger that takes images
    (TensorBoard, Weights & Biases).

    Args:
        logdir: run folder.
        batch_frequency: steps between previews (0: never).
        max_images: samples per prompt.
        ddim_steps, guidance_scale: sampler settings (few steps keep previews cheap).
        prompts: fixed prompts; each must contain the placeholder. Default: ``a photo of <S*>``.
        seed: seed of the preview noise.
    """

    def __init__(
        self,
        logdir: str,
        batch_frequency: int = 50,
        max_images: int = 2,
        ddim_steps: int = 20,
        guidance_scale: float = 7.5,
        prompts: Sequence[str] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.folder = Path(logdir) / "images" / "train"
        self.batch_frequency = batch_frequency
        self.max_images = max_images
        self.ddim_steps = ddim_steps
        self.guidance_scale = guidance_scale
        self.prompts = list(prompts) if prompts else None
        self.seed = seed

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        end_of_step = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if self.batch_frequency <= 0 or step % self.batch_frequency or not end_of_step:
            return
        dataset = getattr(getattr(trainer, "datamodule", None), "train_dataset", None)
        concepts = list(getattr(dataset, "placeholder_tokens", None) or [placeholder_string(pl_module)])
        prompts = self.prompts or [f"a photo of {placeholder}" for placeholder in concepts]
        with torch.no_grad(), _eval_mode(pl_module):
            rows = [self.sample(pl_module, prompt, concepts, dataset) for prompt in prompts]
        grid = make_grid(rows)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:06d}.png"
        save_png(grid, path)
        path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")
        log_grid(trainer, torch.from_numpy(grid).permute(2, 0, 1).float() / 255, step, " | ".join(prompts))
        logger.info("logged samples of %s to %s", prompts, path)

    def sample(self, model: pl.LightningModule, prompt: str, concepts: Sequence[str], dataset: Any) -> list[np.ndarray]:
        """One row of the preview: the reference photo(s), then guided samples of ``prompt``.

        With several concepts the references are the first photo of each concept the prompt
        names, each masked by its own placeholder's map (one concept: its first photo).
        """
        generator = torch.Generator(device=model.device).manual_seed(self.seed)
        named = [p for p in model.embedding_manager.placeholders_in(model.tokenize([prompt])[0]) if p in concepts]
        placeholders = None
        first_photos = [0]
        if len(concepts) > 1 and named:
            placeholders = named
            first_photos = [dataset.concept_images(concepts.index(p))[0] for p in named]
        reference_index = torch.tensor(first_photos, dtype=torch.long, device=model.device)
        reference_flip = torch.zeros(len(first_photos), dtype=torch.bool, device=model.device)
        reference_latent = model.cached_latent(reference_index, reference_flip, generator)
        samples, _ = sample_prompt(
            model,
            DDIMSampler(model),
            prompt,
            reference_latent,
            n_samples=self.max_images,
            latent_shape=tuple(reference_latent.shape[1:]),
            steps=self.ddim_steps,
            scale=self.guidance_scale,
            generator=generator,
            reference_placeholders=placeholders,
        )
        return [*(dataset.images[i] for i in first_photos), *to_uint8(samples)]


def placeholder_string(model: pl.LightningModule) -> str:
    """The model's (first) placeholder string, S*."""
    return next(iter(model.embedding_manager.string_to_token_dict))


def log_grid(trainer: pl.Trainer, grid: torch.Tensor, step: int, caption: str) -> None:
    """Send a preview grid (``[3, H, W]`` in [0, 1]) to the loggers that take images."""
    for run_logger in trainer.loggers:
        if isinstance(run_logger, TensorBoardLogger):
            run_logger.experiment.add_image("previews", grid, step)
            run_logger.experiment.add_text("previews/prompts", caption, step)
        elif hasattr(run_logger, "log_image"):
            run_logger.log_image(key="previews", images=[grid], step=step, caption=[caption])


class _eval_mode:
    """Switch a module to eval for the duration of a block, then restore its mode."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.was_training = module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)
