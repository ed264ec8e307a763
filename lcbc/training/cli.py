"""`lcbc fit | validate | test --config configs/x.yaml`: LightningCLI over BehaviorCloning and DemoDataModule."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lcbc.data.datamodule import DemoDataModule
from lcbc.errors import UserError
from lcbc.training.bc import BehaviorCloning


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their final name, synced, then renamed into place: a kill mid-write leaves
    the previous checkpoint whole, whatever filesystem TMPDIR is on (Lightning's own writer stages through a
    temporary file there, and a move across filesystems is a copy). The partial file's name holds no "last",
    so `--ckpt_path last` never picks it."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.parent / f".checkpoint-{os.getpid()}.partial"
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting the step budget when training runs for a number of steps
    (there the epoch count has no end: the stock bar reads "Epoch 56/-2" and restarts every epoch)."""

    @property
    def total_train_batches(self):
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_steps > 0 or not self.trainer.max_epochs or self.trainer.max_epochs < 0:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if trainer.max_steps > 0:
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # The bar's position is one past the batch index it is given: the optimizer steps taken so far.
        position = trainer.global_step - 1 if trainer.max_steps > 0 else batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, position)


def quiet_lightning() -> None:
    """Silence what a user cannot act on: Lightning's cloud-logger tip, a deprecation inside Lightning, the
    note that lcbc's LightningModule moves its own batches, and the hint that a first `--ckpt_path last`
    found no checkpoint (it then starts from scratch, as meant)."""
    import logging
    import warnings

    for message in (r".*isinstance\(treespec, LeafSpec\)", "You have overridden `transfer_batch_to_device`",
                    r".*ckpt_path=\"last\"\) is set, but there is no last checkpoint available",
                    "The number of training batches .* is smaller than the logging interval"):
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())


def check_checkpoint(path: Path) -> None:
    """A checkpoint that cannot be resumed from (truncated, or not one at all) is one line, not a traceback
    from deep in torch.load: torch writes checkpoints as zip archives, whose directory sits at the end."""
    if path.is_file() and not zipfile.is_zipfile(path):
        raise UserError(f"{path}: truncated or not a checkpoint; remove it to start afresh, or resume from another")


def config_error(config: str | None, error: Exception) -> UserError:
    """One line for a config that cannot be instantiated: jsonargparse nests a class's own complaint (an
    augmentation's bad init_args, say) under a union's listing; that complaint is the line worth showing."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line[2:] for line in lines if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line]
    message = reasons[0] if reasons else lines[0] if lines else type(error).__name__
    return UserError(f"{config}: {message}" if config else message)


class RunFolderCLI(LightningCLI):
    """A LightningCLI whose run lives in one folder, trainer.default_root_dir: checkpoints/ (set up by the
    config's `checkpoint:` section), and tensorboard/ and csv/ logs unless the config names loggers. A run
    then moves with one flag, --trainer.default_root_dir, and `--ckpt_path last` finds its checkpoint."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath",
                              compute_fn=lambda root: str(Path(root or ".") / "checkpoints"))

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer")
        root = trainer.get("default_root_dir") or "."
        if trainer.get("logger") in (None, True):
            kwargs["logger"] = [TensorBoardLogger(root, name="tensorboard"), CSVLogger(root, name="csv")]
        if not trainer.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


    def before_fit(self) -> None:
        """`--ckpt_path last` resolves to the run folder's last.ckpt only now; a named checkpoint is checked
        before the CLI is even built (run_lightning_cli), since LightningCLI reads its hyperparameters."""
        callback = self.trainer.checkpoint_callback
        if self._get(self.config, "ckpt_path") == "last" and callback is not None and callback.dirpath:
            check_checkpoint(Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")

    def after_fit(self) -> None:
        """`checkpoints/last.ckpt` holds the end of every fit, also of runs shorter than the checkpoint
        interval, so `lcbc export .../last.ckpt` and `--ckpt_path last` always find it."""
        callback = self.trainer.checkpoint_callback
        if callback is None or not callback.dirpath or self.trainer.interrupted:
            return
        last = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        if not last.is_file() or callback._last_global_step_saved != self.trainer.global_step:
            self.trainer.save_checkpoint(last, weights_only=False)


class LcbcCLI(RunFolderCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test: lcbc makes no predictions over a data module."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        # The policy declares the windows it needs; the data builds them.
        parser.link_arguments("model.history", "data.history")
        parser.link_arguments("model.action_chunk", "data.action_chunk")


def run_lightning_cli(argv: list[str]) -> LcbcCLI:
    # From the console, LightningCLI reads sys.argv itself (DDP relaunches the same command line).
    args = None if argv == sys.argv[1:] else argv
    quiet_lightning()
    for i, arg in enumerate(argv):
        named = arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else \
            argv[i + 1] if arg == "--ckpt_path" and i + 1 < len(argv) else None
        if named not in (None, "last", "best", "hpc", "null"):
            check_checkpoint(Path(named))
    try:
        return LcbcCLI(BehaviorCloning, DemoDataModule, args=args, save_config_kwargs={"overwrite": True},
                       auto_configure_optimizers=False)
    except MisconfigurationException as error:  # Lightning's word on a config that cannot run
        raise UserError(str(error).splitlines()[0]) from None
    except ValueError as error:  # a class in the config refused its arguments
        raise config_error(None, error) from None
