"""DemoDataModule: the Lightning wrapper that splits demos by episode and serves DemoDataset batches."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

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
        train_paraphrases: how many of a Meta-World task's paraphrases training samples from.
        relabel_state_goals: share of training windows of Meta-World reach, push and pick-place whose
            goal is replaced by a position the demo reaches later (see DemoDataset).
        shuffle_ignored_objects: give Meta-World reach's training windows the puck of another demo.
        shift_state_xy: move hand, puck and goal of reach, push and pick-place windows together by up to
            this many metres in x and y.
        shift_images: move each training window's images by up to this many pixels (random shift).
        instruction: instruction for files that carry none (e.g. robomimic files).
        val_fraction: share of episodes held out when a file has no mask/train and mask/valid.
    """

    def __init__(self, paths: list[str] | str, weights: list[float] | None = None,
                 obs_keys: list[str] | None = None, history: int = 1, action_chunk: int = 1,
                 goal: str = "none", goal_max_distance: int | None = None, train_paraphrases: int = 0,
                 relabel_state_goals: float = 0.0, shuffle_ignored_objects: bool = False,
                 shift_state_xy: float = 0.0, shift_images: int = 0,
                 instruction: str | None = None, val_fraction: float = 0.05, batch_size: int = 256,
                 num_workers: int = 0, cache_images: bool = False, seed: int = 0):
        super().__init__()
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        if weights is not None and len(weights) != len(self.paths):
            raise UserError(f"data.weights has {len(weights)} entries for {len(self.paths)} files")
        self.save_hyperparameters()
        self.train_set: DemoDataset | None = None
        self.valid_set: DemoDataset | None = None

    def _dataset(self, demos, train_paraphrases: int, augment: bool, vocabulary: DemoDataset | None) -> DemoDataset:
        hp = self.hparams
        return DemoDataset(self.paths, demos=demos, obs_keys=hp.obs_keys, history=hp.history,
                           action_chunk=hp.action_chunk, goal=hp.goal, goal_max_distance=hp.goal_max_distance,
                           instruction=hp.instruction, train_paraphrases=train_paraphrases,
                           cache_images=hp.cache_images, tasks=vocabulary and vocabulary.tasks,
                           instructions=vocabulary and vocabulary.instructions,
                           relabel_state_goals=hp.relabel_state_goals if augment else 0.0,
                           shuffle_ignored_objects=hp.shuffle_ignored_objects and augment,
                           shift_state_xy=hp.shift_state_xy if augment else 0.0,
                           shift_images=hp.shift_images if augment else 0)

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
