"""DemoDataModule: the Lightning wrapper that splits demos by episode and serves DemoDataset batches."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from lcbc.data.augment import StateGoalRelabeling, WindowAugmentation
from lcbc.data.dataset import DemoDataset, keep_batch, split_demos
from lcbc.errors import UserError


class DemoDataModule(L.LightningDataModule):
    """Demonstration files -> train/valid windows.

    Args:
        paths: one or more HDF5 demonstration files.
        weights: sampling weight per file (None: every step equally likely).
        obs_keys: observation keys to load (None: all of them).
        history, action_chunk: window sizes; `lcbc fit` links them to the policy's config.
        goal, goal_max_distance: hindsight goal relabeling (none, future, segment_end, final).
        benchmark: the benchmark whose paraphrases of each task's instruction training may sample, and
            whose goal interface `relabel_state_goals` uses (a `--benchmark` name, looked up in
            lcbc.benchmark's registry).
        train_paraphrases: how many of a task's paraphrases training samples from.
        relabel_state_goals: share of the training windows of the benchmark's goal tasks whose goal in the
            state becomes one a later step of the same demo achieved (StateGoalRelabeling).
        shift_images: move each training window's images by up to this many pixels (random shift).
        augmentation: a WindowAugmentation applied to training windows (a class path and its init_args
            in the config, e.g. a benchmark's own).
        image_size: resize every camera to this many pixels square (needed for cameras of different
            sizes or non-square ones).
        instruction: instruction for files that carry none (e.g. robomimic files).
        val_fraction: share of episodes held out when a file has no mask/train and mask/valid.
    """

    def __init__(self, paths: list[str] | str, weights: list[float] | None = None,
                 obs_keys: list[str] | None = None, history: int = 1, action_chunk: int = 1,
                 goal: str = "none", goal_max_distance: int | None = None, benchmark: str | None = None,
                 train_paraphrases: int = 0, relabel_state_goals: float = 0.0, shift_images: int = 0,
                 augmentation: WindowAugmentation | None = None,
                 image_size: int | None = None, instruction: str | None = None, val_fraction: float = 0.05,
                 batch_size: int = 256, num_workers: int = 0, cache_images: bool = False, seed: int = 0):
        super().__init__()
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        if weights is not None and len(weights) != len(self.paths):
            raise UserError(f"data.weights has {len(weights)} entries for {len(self.paths)} files")
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"data.{name}: {value!r} is not an integer of at least {least}")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise UserError(f"data.image_size: {image_size!r} is not a positive number of pixels")
        if not 0 <= val_fraction < 1:
            raise UserError(f"data.val_fraction: {val_fraction!r} is not in [0, 1)")
        if not 0 <= relabel_state_goals <= 1:
            raise UserError(f"data.relabel_state_goals: {relabel_state_goals!r} is not a share in [0, 1]")
        if relabel_state_goals and not benchmark:
            raise UserError("data.relabel_state_goals needs data.benchmark: its goal interface says where goals are")
        self.augmentation = augmentation
        self.save_hyperparameters(ignore=["augmentation"])  # the config keeps it; checkpoints hold plain data
        self.train_set: DemoDataset | None = None
        self.valid_set: DemoDataset | None = None

    def _benchmark(self):
        from lcbc.benchmark import load_benchmark

        return load_benchmark(self.hparams.benchmark)

    def _paraphrases(self) -> dict[str, list[str]]:
        if not self.hparams.benchmark or not self.hparams.train_paraphrases:
            return {}
        benchmark = self._benchmark()
        return {task: list(benchmark.instructions(task)[1:]) for task in benchmark.tasks}

    def _augmentations(self) -> list[WindowAugmentation]:
        """The general hindsight goals first, then the config's own augmentation (a benchmark's rules)."""
        augmentations = []
        if self.hparams.relabel_state_goals:
            augmentations.append(StateGoalRelabeling(self._benchmark(), self.hparams.relabel_state_goals))
        if self.augmentation is not None:
            augmentations.append(self.augmentation)
        return augmentations

    def _dataset(self, demos, train_paraphrases: int, augment: bool, vocabulary: DemoDataset | None) -> DemoDataset:
        hp = self.hparams
        return DemoDataset(self.paths, demos=demos, obs_keys=hp.obs_keys, history=hp.history,
                           action_chunk=hp.action_chunk, goal=hp.goal, goal_max_distance=hp.goal_max_distance,
                           instruction=hp.instruction, train_paraphrases=train_paraphrases,
                           paraphrases=self._paraphrases() if train_paraphrases else None,
                           cache_images=hp.cache_images, tasks=vocabulary and vocabulary.tasks,
                           instructions=vocabulary and vocabulary.instructions, image_size=hp.image_size,
                           shift_images=hp.shift_images if augment else 0,
                           augmentation=self._augmentations() if augment else None)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, valid = split_demos(self.paths, self.hparams.val_fraction, self.hparams.seed)
        self.valid_set = self._dataset(valid, 0, False, None) if valid else None
        self.train_set = self._dataset(train, self.hparams.train_paraphrases, True, self.valid_set)

    def _loader(self, dataset: DemoDataset, sampler) -> torch.utils.data.DataLoader:
        batch_sampler = torch.utils.data.BatchSampler(sampler, self.hparams.batch_size, drop_last=False)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=keep_batch,
                                           num_workers=self.hparams.num_workers,
                                           persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self):
        dataset = self.train_set
        if self.hparams.weights is None:
            sampler = torch.utils.data.RandomSampler(dataset)
        else:  # each file gets its weight's share of the samples, spread evenly over its steps
            file_of_step = np.array([dataset.demos[d].file_index for d in dataset.step_demo])
            steps_per_file = np.bincount(file_of_step, minlength=len(self.paths))
            weights = np.asarray(self.hparams.weights, dtype=np.float64)[file_of_step] / steps_per_file[file_of_step]
            sampler = torch.utils.data.WeightedRandomSampler(torch.from_numpy(weights), len(dataset))
        return self._loader(dataset, sampler)

    def val_dataloader(self):
        if self.valid_set is None:
            return []
        return self._loader(self.valid_set, torch.utils.data.SequentialSampler(self.valid_set))
