"""The demonstration file: robomimic's HDF5 layout (which LIBERO also uses), read, validated and written.

Every reader here opens files read-only, so nothing a user owns is ever modified. Every problem a
user can cause is raised as one `UserError` line naming the file, demo and key.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from lcbc.errors import UserError

DEMO_PATTERN = re.compile(r"^demo_(\d+)$")


def open_demo_file(path: str | os.PathLike) -> h5py.File:
    """Open a demonstration file read-only, turning every way it can fail into one clear line. A LeRobot
    dataset folder opens as its HDF5 conversion, made once and cached."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        from lcbc.data.lerobot import cached_hdf5

        path = cached_hdf5(path)
    if not h5py.is_hdf5(path):
        raise UserError(f"{path}: not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise UserError(f"{path}: unreadable HDF5 file (truncated or corrupt?): {error}") from None


INCOMPLETE = "_incomplete"  # a demo being written; renamed to demo_N once complete


def demo_names(file: h5py.File) -> list[str]:
    """Demo group names under `data/`, in numeric order (demo_2 before demo_10)."""
    names = [name for name in file["data"] if name != INCOMPLETE and isinstance(file["data"].get(name), h5py.Group)]
    return sorted(names, key=lambda name: (0, int(m.group(1)), "") if (m := DEMO_PATTERN.match(name))
                  else (1, 0, name))


def _decode(value) -> str:
    if isinstance(value, bytes | np.bytes_):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _decode(value.item())
    return str(value)


def instruction_from_file_name(path: str | os.PathLike) -> str | None:
    """LIBERO names files `<SCENE_IN_CAPITALS>_<instruction words>_demo.hdf5`."""
    stem = Path(path).name
    if not stem.endswith("_demo.hdf5"):
        return None
    words = stem[: -len("_demo.hdf5")].split("_")
    while words and (words[0].isupper() or any(ch.isdigit() for ch in words[0])):
        words.pop(0)
    return " ".join(words) or None


def file_instruction(file: h5py.File, path: str | os.PathLike) -> str | None:
    """The instruction for a whole file: LIBERO's problem_info, else the LIBERO file name."""
    info = file["data"].attrs.get("problem_info")
    if info is not None:
        try:
            instruction = json.loads(_decode(info)).get("language_instruction")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UserError(f"{path}: data: attribute problem_info is not valid JSON") from None
        if instruction:
            return " ".join(str(instruction).split())
    return instruction_from_file_name(path)


def demo_instruction(file: h5py.File, demo: str, path, fallback: str | None = None) -> str | None:
    """A demo's instruction: its own attribute, then the file's (LIBERO), then the user's fallback."""
    value = file["data"][demo].attrs.get("instruction")
    if value is not None:
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if not isinstance(value, str | bytes | np.bytes_):
            raise UserError(f"{path}: {demo}: attribute 'instruction' is not text (it holds "
                            f"{type(value).__name__} {str(value)[:40]!r})")
        try:
            text = _decode(value)
            text.encode("utf-8")  # h5py hands undecodable bytes back as surrogates
        except UnicodeError:
            raise UserError(f"{path}: {demo}: attribute 'instruction' is not valid UTF-8") from None
        return text
    return file_instruction(file, path) or fallback


def _check_array(path, demo: str, key: str, dataset, length: int | None) -> int:
    """Check one per-step array of a demo; returns its length."""
    if not isinstance(dataset, h5py.Dataset):
        raise UserError(f"{path}: {demo}: {key} is not a dataset")
    if dataset.ndim == 0:
        raise UserError(f"{path}: {demo}: {key} has ndim 0, expected one row per step")
    kind = dataset.dtype.kind
    if kind not in "fiub":
        raise UserError(f"{path}: {demo}: {key} has dtype {dataset.dtype}, expected a number type")
    if length is not None and dataset.shape[0] != length:
        raise UserError(f"{path}: {demo}: {key} has {dataset.shape[0]} steps but actions has {length}")
    if kind == "f":
        values = dataset[()]
        if not np.isfinite(values).all():
            step = int(np.argwhere(~np.isfinite(values.reshape(len(values), -1)))[0, 0])
            raise UserError(f"{path}: {demo}: {key} has NaN or Inf (first at step {step})")
    return dataset.shape[0]


def _check_demo(path, file: h5py.File, demo: str) -> None:
    group = file["data"][demo]
    if "actions" not in group:
        raise UserError(f"{path}: {demo}: missing 'actions'")
    actions = group["actions"]
    length = _check_array(path, demo, "actions", actions, None)
    if length == 0:
        raise UserError(f"{path}: {demo}: empty demo (actions has 0 steps)")
    if actions.ndim != 2 or actions.dtype.kind != "f":
        raise UserError(f"{path}: {demo}: actions has shape {actions.shape} and dtype {actions.dtype}, "
                        "expected (T, A) float")
    for key in ("rewards", "dones"):
        if key in group:
            _check_array(path, demo, key, group[key], length)
    if "states" in group:
        _check_array(path, demo, "states", group["states"], length)
    if not isinstance(group.get("obs"), h5py.Group) or len(group["obs"]) == 0:
        raise UserError(f"{path}: {demo}: missing 'obs' group with at least one observation key")
    for obs_group in ("obs", "next_obs"):
        if obs_group not in group:
            continue
        for key, dataset in group[obs_group].items():
            name = f"{obs_group}/{key}"
            _check_array(path, demo, name, dataset, length)
            if dataset.dtype == np.uint8 and dataset.ndim != 4:
                raise UserError(f"{path}: {demo}: {name} is uint8 with shape {dataset.shape}, "
                                "expected images (T, H, W, C)")
            if dataset.dtype.kind == "f" and dataset.ndim != 2:
                raise UserError(f"{path}: {demo}: {name} is float with shape {dataset.shape}, "
                                "expected (T, D)")
    demo_instruction(file, demo, path)


def validate(file: h5py.File, path) -> list[str]:
    """Check that `file` is a usable demonstration file; returns its demo names or raises UserError."""
    try:
        if not isinstance(file.get("data"), h5py.Group):
            raise UserError(f"{path}: no 'data' group (not a robomimic/LIBERO demonstration file)")
        demos = demo_names(file)
        if not demos:
            raise UserError(f"{path}: data: no demos")
        for demo in demos:
            _check_demo(path, file, demo)
        first_keys = set(file["data"][demos[0]]["obs"].keys())
        for demo in demos[1:]:
            keys = set(file["data"][demo]["obs"].keys())
            if keys != first_keys:
                raise UserError(f"{path}: {demo}: obs keys {sorted(keys)} differ from {demos[0]}'s "
                                f"{sorted(first_keys)}")
        for name, members in masks(file, path).items():
            missing = sorted(set(members) - set(demos))
            if missing:
                raise UserError(f"{path}: mask/{name}: names missing demo {missing[0]}")
        file_instruction(file, path)
        return demos
    except (OSError, RuntimeError, KeyError) as error:
        raise UserError(f"{path}: unreadable HDF5 content (truncated or corrupt?): {error}") from None


def masks(file: h5py.File, path) -> dict[str, list[str]]:
    """Filter masks (`mask/train`, `mask/valid`, ...) as lists of demo names."""
    if "mask" not in file:
        return {}
    result = {}
    for name, dataset in file["mask"].items():
        try:
            result[name] = [_decode(value) for value in dataset[()]]
        except (UnicodeDecodeError, TypeError):
            raise UserError(f"{path}: mask/{name}: not a list of demo names") from None
    return result


def summarize(path: str | os.PathLike) -> dict:
    """Validate a file and describe it: demos, lengths, keys, action ranges, instructions, masks."""
    with open_demo_file(path) as file:
        demos = validate(file, path)
        data = file["data"]
        lengths = np.array([data[demo]["actions"].shape[0] for demo in demos])
        first = data[demos[0]]
        obs = {key: {"shape": list(ds.shape[1:]), "dtype": str(ds.dtype)} for key, ds in first["obs"].items()}
        actions = np.concatenate([data[demo]["actions"][()] for demo in demos])
        instructions = Counter(demo_instruction(file, demo, path) or "(none)" for demo in demos)
        env_args = data.attrs.get("env_args")
        return {
            "path": str(path),
            "demos": len(demos),
            "total_steps": int(lengths.sum()),
            "length": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                       "max": int(lengths.max())},
            "obs": obs,
            "action_dim": int(actions.shape[1]),
            "action_min": actions.min(axis=0).round(4).tolist(),
            "action_max": actions.max(axis=0).round(4).tolist(),
            "instructions": dict(instructions.most_common()),
            "masks": {name: len(members) for name, members in masks(file, path).items()},
            "env": json.loads(_decode(env_args)).get("env_name") if env_args is not None else None,
        }


class DemoWriter:
    """Writes demos in the robomimic layout, flushing after each so a crash loses no finished demo.

    A new file (or one replacing an old file) is written under `<name>.partial` beside its final name and
    renamed into place once it holds its first demo: a kill before that leaves the old file, or none,
    never an empty or half-made one under the final name."""

    def __init__(self, path: str | os.PathLike, env_args: dict, mode: str = "create",
                 same_setup: tuple[str, ...] = ()):
        """mode: 'create' (fails if the file exists), 'overwrite', or 'append' (resume a collection; the
        file's env_kwargs named in `same_setup` must equal env_args' own)."""
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        if mode == "create" and self.path.exists():
            raise UserError(f"{self.path}: exists; pass --overwrite to replace it or --resume to extend it")
        if mode == "append" and self.path.exists():
            with open_demo_file(self.path) as file:  # one clear line for a file that is not a demo file
                validate(file, self.path)
                stored = json.loads(_decode(file["data"].attrs.get("env_args", "{}"))).get("env_kwargs", {})
            for key in same_setup:
                if stored.get(key) != env_args["env_kwargs"].get(key):
                    raise UserError(f"{self.path}: collected with {key} {stored.get(key)!r}, not "
                                    f"{env_args['env_kwargs'].get(key)!r}; resume with the same options")
            self.file = h5py.File(self.path, "a")
            if INCOMPLETE in self.file["data"]:  # left by a killed collection
                del self.file["data"][INCOMPLETE]
            self.next_index = 1 + max((int(m.group(1)) for name in self.file["data"]
                                       if (m := DEMO_PATTERN.match(name))), default=-1)
            self.renamed = True
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = h5py.File(self.partial, "w")
            self.file.create_group("data")
            self.next_index = 0
            self.renamed = False
        self.file["data"].attrs["env_args"] = json.dumps(env_args)
        self._update_total()

    def _update_total(self) -> None:
        data = self.file["data"]
        data.attrs["total"] = int(sum(data[name]["actions"].shape[0] for name in demo_names(self.file)))

    def existing_demo_attrs(self) -> list[dict]:
        """Attributes of the demos already in the file (used to resume a collection)."""
        return [dict(self.file["data"][name].attrs) for name in demo_names(self.file)]

    def add_demo(self, actions: np.ndarray, obs: dict[str, np.ndarray], rewards: np.ndarray,
                 dones: np.ndarray, states: np.ndarray | None = None, next_obs: dict[str, np.ndarray] | None = None,
                 **attrs) -> str:
        name = f"demo_{self.next_index}"
        group = self.file["data"].create_group(INCOMPLETE)
        group.create_dataset("actions", data=actions)
        group.create_dataset("rewards", data=rewards)
        group.create_dataset("dones", data=dones)
        if states is not None:
            group.create_dataset("states", data=states)
        for obs_group, arrays in (("obs", obs), ("next_obs", next_obs or {})):
            for key, value in arrays.items():
                chunks = (1, *value.shape[1:]) if value.dtype == np.uint8 else None
                group.create_dataset(f"{obs_group}/{key}", data=value, chunks=chunks)
        group.attrs["num_samples"] = len(actions)
        for key, value in attrs.items():
            group.attrs[key] = value
        data = self.file["data"]
        data.move(INCOMPLETE, name)
        self.next_index += 1
        data.attrs["total"] = int(data.attrs["total"]) + len(actions)
        self.file.flush()
        if not self.renamed:  # the first demo is in: the file takes its name (replacing an old one)
            os.replace(self.partial, self.path)
            self.renamed = True
        return name

    def write_masks(self, masks_by_name: dict[str, list[str]]) -> None:
        if "mask" in self.file:
            del self.file["mask"]
        for name, members in masks_by_name.items():
            self.file.create_dataset(f"mask/{name}", data=np.array(members, dtype="S"))
        self.file.flush()

    def close(self) -> None:
        """A file that never got a demo is removed: the old file, if any, stays as it was."""
        self.file.close()
        if not self.renamed:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> DemoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
