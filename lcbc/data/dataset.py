"""DemoDataset: windows of demonstrations with padding masks, goal relabeling and task labels.

Sample i is global step g of one demo. It carries an observation history of `history` steps
ending at g (padded at the episode start by repeating the first step, with `obs_mask` False there),
an action chunk of `action_chunk` steps starting at g (padded at the end with `action_mask` False),
the task id, an instruction id, and optionally a goal: the observation at a later step of the same
demo (hindsight relabeling), so every intermediate state serves as a goal.

`shift_images` moves each window's images by up to that many pixels (random shift, Yarats et al. 2021):
a few demos' frames then cover more than their exact pixel positions. `augmentation` (a
lcbc.data.augment.WindowAugmentation, e.g. a benchmark's own, or a list of them applied in order) changes
the windows after that. Images of
other sizes than `image_size` (cameras of different sizes, non-square ones) are resized to it as read.

Low-dimensional arrays of all demos are read into memory once and concatenated; images stay on disk
and are read lazily, one contiguous slice per demo per batch, unless `cache_images` is set. A batch
is gathered with vectorized indexing through `__getitems__`, which torch's DataLoader calls with the
whole list of batch indices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from lcbc.data.augment import WindowAugmentation, shift_images
from lcbc.data.hdf5 import demo_instruction, masks, open_demo_file, validate
from lcbc.errors import UserError

GOAL_MODES = ("none", "future", "segment_end", "final")


@dataclass(frozen=True)
class DemoRef:
    file_index: int
    name: str


def statistics(values: np.ndarray) -> dict[str, list[float]]:
    """Per-dimension normalization statistics of an (N, D) array."""
    values = values.astype(np.float64)
    q01, q99 = np.percentile(values, [1, 99], axis=0)
    return {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(), "min": values.min(0).tolist(),
            "max": values.max(0).tolist(), "q01": q01.tolist(), "q99": q99.tolist()}


def resize_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """(N, H, W, C) uint8 images at size x size (area averaging down, bilinear up); unchanged for None."""
    if size is None or images.shape[1:3] == (size, size):
        return images
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    mode = "area" if images.shape[1] >= size and images.shape[2] >= size else "bilinear"
    resized = torch.nn.functional.interpolate(tensor, size=(size, size), mode=mode)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def split_demos(paths: list[str], val_fraction: float, seed: int) -> tuple[list[DemoRef], list[DemoRef]]:
    """Episode-level split: a file's `mask/train` and `mask/valid` when present, else a seeded shuffle."""
    train, valid = [], []
    for file_index, path in enumerate(paths):
        with open_demo_file(path) as file:
            names = validate(file, path)
            file_masks = masks(file, path)
        if "train" in file_masks and "valid" in file_masks:
            train += [DemoRef(file_index, name) for name in file_masks["train"]]
            valid += [DemoRef(file_index, name) for name in file_masks["valid"]]
            continue
        order = np.random.default_rng(seed).permutation(len(names))
        n_valid = int(round(val_fraction * len(names)))
        if val_fraction > 0 and len(names) > 1:
            n_valid = min(max(n_valid, 1), len(names) - 1)
        valid += [DemoRef(file_index, names[i]) for i in sorted(order[:n_valid])]
        train += [DemoRef(file_index, names[i]) for i in sorted(order[n_valid:])]
    return train, valid


class DemoDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str] | str, demos: list[DemoRef] | None = None,
                 obs_keys: list[str] | None = None, history: int = 1, action_chunk: int = 1,
                 goal: str = "none", goal_max_distance: int | None = None,
                 instruction: str | None = None, train_paraphrases: int = 0,
                 clip_actions: float | None = 1.0, cache_images: bool = False, filter_key: str | None = None,
                 tasks: list[str] | None = None, instructions: list[str] | None = None,
                 paraphrases: dict[str, list[str]] | None = None, shift_images: int = 0,
                 augmentation: WindowAugmentation | list[WindowAugmentation] | None = None,
                 image_size: int | None = None):
        """`demos` come from `split_demos` (which validates the files); without them every demo of the
        validated files is used. `tasks` and `instructions` start the id vocabularies, so a validation split and its
        training split (which extends the validation vocabulary) agree on ids. `paraphrases`: task name ->
        its paraphrases, of which training samples the first `train_paraphrases` beside each demo's own."""
        self.paths = [str(p) for p in ([paths] if isinstance(paths, str | os.PathLike) else paths)]
        if history < 1 or action_chunk < 1:
            raise UserError(f"history ({history}) and action_chunk ({action_chunk}) must be at least 1")
        if goal not in GOAL_MODES:
            raise UserError(f"goal: {goal!r} is not one of {', '.join(GOAL_MODES)}")
        if shift_images < 0:
            raise UserError(f"shift_images must be >= 0 pixels, got {shift_images}")
        if image_size is not None and image_size < 1:
            raise UserError(f"image_size must be at least 1 pixel, got {image_size}")
        self.shift_images, self.image_size = shift_images, image_size
        self.augmentations = [one for one in (augmentation if isinstance(augmentation, list) else [augmentation])
                              if one is not None]  # applied in order
        self.paraphrases = paraphrases or {}
        self.history, self.action_chunk = history, action_chunk
        self.goal, self.goal_max_distance = goal, goal_max_distance
        self.train_paraphrases, self.cache_images = train_paraphrases, cache_images
        self.demos = demos if demos is not None else self._all_demos(filter_key)
        if not self.demos:
            raise UserError(f"{', '.join(self.paths)}: no demos selected")
        self._files: dict[int, object] = {}
        self._image_datasets: dict[tuple[int, str], object] = {}
        self._files_pid = self._rng_pid = None
        self._rng = None
        self.tasks, self.instructions = list(tasks or []), list(instructions or [])
        self._load(obs_keys, instruction, clip_actions)

    def _all_demos(self, filter_key: str | None) -> list[DemoRef]:
        demos = []
        for file_index, path in enumerate(self.paths):
            with open_demo_file(path) as file:
                names = validate(file, path)
                if filter_key is not None:
                    file_masks = masks(file, path)
                    if filter_key not in file_masks:
                        raise UserError(f"{path}: no filter mask 'mask/{filter_key}'")
                    names = file_masks[filter_key]
            demos += [DemoRef(file_index, name) for name in names]
        return demos

    def _load(self, obs_keys: list[str] | None, fallback_instruction: str | None, clip: float | None) -> None:
        """Read every low-dimensional array once, and the layout of the image arrays."""
        low_dim: dict[str, list[np.ndarray]] = {}
        actions, lengths, tasks, instructions = [], [], [], []
        self.image_shapes: dict[str, tuple] = {}
        for file_index, path in enumerate(self.paths):
            names = [demo.name for demo in self.demos if demo.file_index == file_index]
            if not names:
                continue
            with open_demo_file(path) as file:  # validated already, by split_demos or _all_demos
                for name in names:
                    if name not in file["data"]:
                        raise UserError(f"{path}: no demo {name}")
                    group = file["data"][name]
                    keys = obs_keys if obs_keys is not None else sorted(group["obs"].keys())
                    for key in keys:
                        if key not in group["obs"]:
                            raise UserError(f"{path}: {name}: no observation key 'obs/{key}' "
                                            f"(has {', '.join(sorted(group['obs'].keys()))})")
                        dataset = group["obs"][key]
                        if dataset.dtype == np.uint8:
                            self.image_shapes[key] = self._check_image_shape(path, name, key, dataset.shape[1:])
                        else:
                            low_dim.setdefault(key, []).append(dataset[()].astype(np.float32))
                    actions.append(group["actions"][()].astype(np.float32))
                    lengths.append(len(actions[-1]))
                    text = demo_instruction(file, name, path, fallback_instruction)
                    instructions.append(text)
                    task = group.attrs.get("task")
                    tasks.append(task.decode() if isinstance(task, bytes) else task or text or path)
        self.obs_keys = list(low_dim) + list(self.image_shapes)
        self.low_dim = {key: np.concatenate(parts) for key, parts in low_dim.items()}
        self.actions = np.concatenate(actions)
        if clip is not None:
            np.clip(self.actions, -clip, clip, out=self.actions)
        self.lengths = np.array(lengths)
        self.demo_start = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.demo_end = self.demo_start + self.lengths  # exclusive
        self.step_demo = np.repeat(np.arange(len(self.demos)), self.lengths)

        self.tasks += sorted(set(tasks) - set(self.tasks))
        self.demo_task = np.array([self.tasks.index(task) for task in tasks])
        self.demo_instruction_text = instructions
        # The instruction vocabulary: each demo's own instruction plus, for tasks with known paraphrases,
        # the first `train_paraphrases` of them; held-out paraphrases never enter training.
        self.demo_instruction_choices: list[np.ndarray] = []
        for task, text in zip(tasks, instructions):
            choices = [text] if text is not None else []
            if self.train_paraphrases and task in self.paraphrases:
                choices += list(self.paraphrases[task][:self.train_paraphrases])
            ids = []
            for choice in choices:
                if choice not in self.instructions:
                    self.instructions.append(choice)
                ids.append(self.instructions.index(choice))
            self.demo_instruction_choices.append(np.array(ids or [-1]))
        self.demo_instruction = np.array([choices[0] for choices in self.demo_instruction_choices])
        self._image_cache = {key: self._read_all_images(key) for key in self.image_shapes} if \
            self.cache_images else {}
        for augmentation in self.augmentations:
            augmentation.bind(self)

    def _check_image_shape(self, path, demo: str, key: str, shape: tuple) -> tuple:
        """The (H, W, C) shape images of `key` come out in: resized to `image_size` when set; otherwise every
        camera must be square and of one size, which the image tokenizer needs."""
        if self.image_size is not None:
            return (self.image_size, self.image_size, shape[2])
        others = {tuple(other[:2]) for other in self.image_shapes.values()} - {tuple(shape[:2])}
        if shape[0] != shape[1] or others:
            sizes = {**{k: v[:2] for k, v in self.image_shapes.items()}, key: shape[:2]}
            raise UserError(f"{path}: {demo}: cameras must be square and of one size for the image tokenizer "
                            f"({', '.join(f'{k} {h}x{w}' for k, (h, w) in sizes.items())}); set "
                            "--data.image_size N to resize them all to N x N")
        return tuple(shape)

    # ---- description used by the model -------------------------------------------------------

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def low_dim_shapes(self) -> dict[str, int]:
        return {key: value.shape[1] for key, value in self.low_dim.items()}

    def statistics(self) -> dict[str, dict[str, list[float]]]:
        """Normalization statistics of actions and every low-dimensional observation key."""
        return {"actions": statistics(self.actions), **{key: statistics(v) for key, v in self.low_dim.items()}}

    def require_instructions(self) -> None:
        """Language conditioning needs an instruction for every demo; say which one lacks it."""
        for demo, text in zip(self.demos, self.demo_instruction_text):
            if text is None:
                raise UserError(f"{self.paths[demo.file_index]}: {demo.name}: no instruction (no 'instruction' "
                                "attribute, no LIBERO problem_info or file name); give one for the file with "
                                "--data.instruction \"...\"")

    # ---- sampling -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.actions)

    def _generator(self) -> np.random.Generator:
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = np.random.default_rng(torch.initial_seed() % 2**32)
            self._rng_pid = os.getpid()
        return self._rng

    def window_indices(self, steps: np.ndarray) -> dict[str, np.ndarray]:
        """Global step indices of each sample's history, action chunk and goal, with pad masks."""
        demo = self.step_demo[steps]
        start, last = self.demo_start[demo], self.demo_end[demo] - 1
        history = steps[:, None] + np.arange(-self.history + 1, 1)[None, :]
        chunk = steps[:, None] + np.arange(self.action_chunk)[None, :]
        result = {
            "history": np.maximum(history, start[:, None]), "obs_mask": history >= start[:, None],
            "chunk": np.minimum(chunk, last[:, None]), "action_mask": chunk <= last[:, None],
        }
        if self.goal != "none":
            horizon = last if self.goal_max_distance is None else np.minimum(last, steps + self.goal_max_distance)
            if self.goal == "final":
                goal = last
            elif self.goal == "segment_end":
                goal = horizon
            else:  # uniform over the later steps of the same demo, within the cap
                offset = self._generator().integers(1, np.maximum(horizon - steps, 1), endpoint=True)
                goal = np.minimum(steps + offset, horizon)
                goal = np.where(horizon > steps, goal, steps)
            result["goal"] = goal
        return result

    def _gather_obs(self, steps: np.ndarray) -> dict[str, np.ndarray]:
        obs = {key: np.take(values, steps, axis=0) for key, values in self.low_dim.items()}
        for key in self.image_shapes:
            obs[key] = (np.take(self._image_cache[key], steps, axis=0) if self.cache_images
                        else self._read_images(key, steps))
        return obs

    def __getitems__(self, indices) -> dict:
        steps = np.asarray(indices, dtype=np.int64)
        windows = self.window_indices(steps)
        demo = self.step_demo[steps]
        instruction = self.demo_instruction[demo]
        if self.train_paraphrases:
            rng = self._generator()
            instruction = np.array([choices[rng.integers(len(choices))]
                                    for choices in (self.demo_instruction_choices[d] for d in demo)])
        batch = {
            "obs": self._gather_obs(windows["history"]),
            "obs_mask": windows["obs_mask"],
            "actions": np.take(self.actions, windows["chunk"], axis=0),
            "action_mask": windows["action_mask"],
            "task_id": self.demo_task[demo],
            "instruction_id": instruction,
        }
        if "goal" in windows:
            batch["goal"] = self._gather_obs(windows["goal"])
        if self.shift_images:
            for key in self.image_shapes:
                batch["obs"][key] = shift_images(batch["obs"][key], self.shift_images, self._generator())
        for augmentation in self.augmentations:
            augmentation(batch, steps, self._generator())
        return to_torch(batch)

    def __getitem__(self, index: int) -> dict:
        return unbatch(self.__getitems__([index]))

    # ---- images -------------------------------------------------------------------------------

    def _file(self, file_index: int):
        if self._files_pid != os.getpid():  # h5py handles must not cross a fork
            self._files, self._files_pid, self._image_datasets = {}, os.getpid(), {}
        if file_index not in self._files:
            self._files[file_index] = open_demo_file(self.paths[file_index])
        return self._files[file_index]

    def _image_dataset(self, demo: int, key: str):
        """One demo's h5py image dataset, looked up once per process."""
        ref = self.demos[demo]
        file = self._file(ref.file_index)  # first: it resets the handles after a fork
        if (demo, key) not in self._image_datasets:
            self._image_datasets[demo, key] = file["data"][ref.name]["obs"][key]
        return self._image_datasets[demo, key]

    def _read_images(self, key: str, steps: np.ndarray) -> np.ndarray:
        """Images for any array of global steps: only the frames needed, one read per run of
        consecutive steps, memory bounded by the batch."""
        flat = steps.ravel()
        unique, inverse = np.unique(flat, return_inverse=True)
        frames = np.empty((len(unique), *self.image_shapes[key]), dtype=np.uint8)
        demos = self.step_demo[unique]
        breaks = (np.flatnonzero((np.diff(unique) != 1) | (np.diff(demos) != 0)) + 1).tolist()
        for begin, end in zip([0, *breaks], [*breaks, len(unique)]):
            demo = int(demos[begin])
            low = int(unique[begin] - self.demo_start[demo])
            frames[begin:end] = resize_images(self._image_dataset(demo, key)[low:low + end - begin], self.image_size)
        return frames[inverse].reshape(*steps.shape, *self.image_shapes[key])

    def _read_all_images(self, key: str) -> np.ndarray:
        return np.concatenate([resize_images(self._image_dataset(demo, key)[()], self.image_size)
                               for demo in range(len(self.demos))])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_files_pid"], state["_rng"], state["_rng_pid"] = {}, None, None, None
        state["_image_datasets"] = {}
        return state


def to_torch(tree):
    if isinstance(tree, dict):
        return {key: to_torch(value) for key, value in tree.items()}
    return torch.from_numpy(np.ascontiguousarray(tree))


def unbatch(tree):
    if isinstance(tree, dict):
        return {key: unbatch(value) for key, value in tree.items()}
    return tree[0]


def keep_batch(batch):
    """DataLoader collate_fn for a dataset whose `__getitems__` already returns a batch."""
    return batch
