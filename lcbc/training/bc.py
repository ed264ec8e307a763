"""Behavior cloning of a LanguagePolicy as a LightningModule.

The network is built in `setup()` from what the DataModule found in the data (observation keys,
normalization statistics, instruction vocabulary), embeds the instructions once with the frozen text
model, and stores all of that in every checkpoint so a checkpoint alone rebuilds the policy.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lcbc.errors import UserError
from lcbc.policies.language_policy import LanguagePolicy
from lcbc.policies.rt1 import RT1Config
from lcbc.rl.pcgrad import pcgrad_backward, split_by_task
from lcbc.tasks.encoders import DEFAULT_TEXT_MODEL


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class BehaviorCloning(L.LightningModule):
    """Args:
        preset: RT-1 size preset ("rt1-tiny" or "rt1"); `rt1` overrides any of its fields.
        history, action_chunk: window sizes; `lcbc fit` passes them on to the DataModule.
        temporal_ensemble: with action_chunk > 1, act on the mean of the overlapping chunks' predictions
            for each step, weighted exp(-temporal_ensemble * age); null acts on each new chunk's first action.
        task_mode: "language" (frozen text embeddings), "onehot" (task id) or "goal" (hindsight goals).
        normalization: "dimension" (each observation dimension by its std) or "key" (one scale per key,
            which keeps the geometry of position vectors; see `Normalizer`).
        goal_keys: observation keys the goal encoder reads (task_mode "goal").
        instruction_noise: language mode: Gaussian noise of this norm (the instruction vectors' average norm
            is 1) added to each instruction vector in training, so unseen wordings near a trained one act like it.
        ema_decay: keep an exponential moving average of the weights for validation and export.
        pcgrad: gradient surgery between the tasks of each batch (lcbc.rl.pcgrad): every task's mean loss
            gets its own gradient, conflicting components are projected away, and the results are averaged.
            Tasks then weigh equally in a batch, whatever their share of the windows. It steps the optimizer
            itself, so clip with `gradient_clip` here instead of the trainer's `gradient_clip_val`.
    """

    def __init__(self, preset: str = "rt1-tiny", rt1: dict | None = None, history: int = 6,
                 action_chunk: int = 1, temporal_ensemble: float | None = None, task_mode: str = "language",
                 normalization: str = "dimension",
                 goal_keys: list[str] | None = None,
                 text_model: str = DEFAULT_TEXT_MODEL, lr: float = 3e-4, weight_decay: float = 0.01,
                 warmup_steps: int = 200, instruction_noise: float = 0.0, ema_decay: float | None = None,
                 pcgrad: bool = False,
                 gradient_clip: float | None = 1.0):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = not pcgrad
        self.rt1_config = RT1Config.preset(preset, **(rt1 or {}), history=history, action_chunk=action_chunk)
        self.policy: LanguagePolicy | None = None
        self.ema: AveragedModel | None = None

    # ---- building the policy from the data ---------------------------------------------------

    def _build(self, spec: dict) -> None:
        rt1 = self.rt1_config
        if spec.get("image_size"):  # the network takes the images at the size the data has them
            rt1 = RT1Config.from_dict({**rt1.to_dict(), "image_size": spec["image_size"]})
        self.policy = LanguagePolicy(rt1, spec["stats"], spec["low_dim_keys"], spec["image_keys"],
                                     spec["instructions"], spec["tasks"], self.hparams.task_mode,
                                     self.hparams.goal_keys, self.hparams.text_model, self.hparams.normalization,
                                     self.hparams.temporal_ensemble)
        self.policy.task_encoder.instruction_noise = self.hparams.instruction_noise
        if self.hparams.ema_decay:
            self.ema = AveragedModel(self.policy, multi_avg_fn=get_ema_multi_avg_fn(self.hparams.ema_decay),
                                     use_buffers=True).requires_grad_(False)

    def setup(self, stage: str) -> None:
        if self.policy is not None:
            return
        data = self.trainer.datamodule
        if data is None:
            raise UserError("behavior cloning needs a DemoDataModule (the `data:` section of the config)")
        data.setup(stage)
        dataset = data.train_set
        if self.hparams.task_mode == "language":
            dataset.require_instructions()
        if self.hparams.task_mode == "goal" and data.hparams.goal == "none":
            raise UserError("model.task_mode is 'goal' but data.goal is 'none': choose future, segment_end or final")
        spec = {"stats": dataset.statistics(), "low_dim_keys": list(dataset.low_dim),
                "image_keys": list(dataset.image_shapes), "instructions": dataset.instructions,
                "tasks": dataset.tasks, "image_size": max((shape[0] for shape in dataset.image_shapes.values()),
                                                           default=None)}
        self._build(spec)
        self.policy.task_encoder.embed_vocabulary()
        if self.ema is not None:
            self.ema.module.load_state_dict(self.policy.state_dict())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        p = self.policy
        checkpoint["lcbc_policy"] = {"stats": p.stats, "low_dim_keys": p.config["low_dim_keys"],
                                     "image_keys": p.config["image_keys"],
                                     "image_size": p.config["rt1"]["image_size"],
                                     "instructions": p.config["instructions"], "tasks": p.config["tasks"]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.policy is None:
            self._build(checkpoint["lcbc_policy"])

    def export_policy(self) -> LanguagePolicy:
        """The policy to deploy: the moving average of the weights when one is kept."""
        return (self.ema.module if self.ema is not None else self.policy).eval()

    # ---- training ---------------------------------------------------------------------------------

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Batches are dicts of tensors, nested once: move them directly (on the CPU there is nothing to
        move), skipping Lightning's generic collection walk, which costs ~4 ms a step here."""
        if device.type == "cpu":
            return batch
        return {key: ({k: v.to(device, non_blocking=True) for k, v in value.items()} if isinstance(value, dict)
                      else value.to(device, non_blocking=True)) for key, value in batch.items()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics = self._pcgrad_step(batch) if self.hparams.pcgrad else self.policy(batch)
        size = len(batch["actions"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        # Step metrics are written every log_every_n_steps; each self.log costs ~2 ms on CPU, so the
        # secondary metrics are only handed over on the steps that are written.
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=size)
        return loss

    def _pcgrad_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        results = [self.policy(task_batch) for task_batch in split_by_task(batch).values()]
        optimizer.zero_grad()
        pcgrad_backward([loss for loss, _ in results], [p for p in self.policy.parameters() if p.requires_grad])
        if self.hparams.gradient_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        schedule.step()
        mean = {key: torch.stack([metrics[key] for _, metrics in results]).mean() for key in results[0][1]}
        return torch.stack([loss for loss, _ in results]).mean().detach(), mean

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.policy)

    def _evaluate(self, batch: dict, prefix: str) -> None:
        policy = self.ema.module if self.ema is not None else self.policy
        loss, metrics = policy(batch)
        size = len(batch["actions"])
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, batch_size=size, sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, parameter in self.policy.named_parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 and "pos" not in name else no_decay).append(parameter)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.hparams.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def export_checkpoint(checkpoint_path: str, out_dir: str):
    """Lightning checkpoint -> exported policy folder (safetensors + JSON, loadable without pickle)."""
    import inspect
    from pathlib import Path

    if not Path(checkpoint_path).is_file():
        raise UserError(f"{checkpoint_path}: no such checkpoint")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable or foreign file
        raise UserError(f"{checkpoint_path}: not a readable checkpoint ({type(error).__name__})") from None
    if "lcbc_policy" not in checkpoint:
        raise UserError(f"{checkpoint_path}: not an lcbc behavior-cloning checkpoint (no lcbc_policy)")
    accepted = inspect.signature(BehaviorCloning.__init__).parameters
    module = BehaviorCloning(**{k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted})
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.export_policy().save_pretrained(out_dir)
