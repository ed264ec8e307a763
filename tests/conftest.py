"""Shared fixtures: tiny demonstration files written in tmp_path, and one small real collection."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest

from lcbc.data.hdf5 import DemoWriter


def write_demo_file(path, lengths=(5, 8, 3), state_dim=3, action_dim=2, image_size=0, instructions=None,
                    tasks=None, seed=0):
    """A synthetic file in the robomimic layout: obs/state[t] = t + 100 * demo index, so tests can
    tell which demo and step every value came from."""
    rng = np.random.default_rng(seed)
    with DemoWriter(path, {"env_name": "synthetic", "env_type": 0, "env_kwargs": {}}) as writer:
        for d, length in enumerate(lengths):
            steps = np.arange(length, dtype=np.float32) + 100 * d
            obs = {"state": np.repeat(steps[:, None], state_dim, axis=1)}
            if image_size:
                images = np.zeros((length, image_size, image_size, 3), dtype=np.uint8)
                images[:, 0, 0, 0] = np.arange(length) % 256
                images[:, 0, 0, 1] = d
                obs["agentview_image"] = images
            attrs = {}
            if instructions is not None:
                attrs["instruction"] = instructions[d % len(instructions)]
            if tasks is not None:
                attrs["task"] = tasks[d % len(tasks)]
            writer.add_demo(rng.uniform(-1, 1, (length, action_dim)).astype(np.float32), obs,
                            np.zeros(length, np.float32), np.eye(1, length, length - 1, dtype=np.int64)[0],
                            **attrs)
    return path


def file_digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def demo_file(tmp_path):
    return write_demo_file(tmp_path / "demos.hdf5", instructions=["open the drawer", "close the drawer"])


@pytest.fixture
def robomimic_file(tmp_path):
    """A file laid out the way robomimic writes it (no instruction, its own obs keys, masks)."""
    path = tmp_path / "lift_low_dim.hdf5"
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {}})
        total = 0
        for d, length in enumerate((10, 12, 7, 9)):
            g = data.create_group(f"demo_{d}")
            g.attrs["num_samples"] = length
            g.create_dataset("actions", data=rng.uniform(-1, 1, (length, 7)))
            g.create_dataset("rewards", data=np.zeros(length))
            g.create_dataset("dones", data=np.zeros(length, dtype=np.int64))
            g.create_dataset("states", data=rng.normal(size=(length, 32)))
            for key, dim in (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("object", 10)):
                g.create_dataset(f"obs/{key}", data=rng.normal(size=(length, dim)))
                g.create_dataset(f"next_obs/{key}", data=rng.normal(size=(length, dim)))
            total += length
        data.attrs["total"] = total
        f.create_dataset("mask/train", data=np.array([b"demo_0", b"demo_1", b"demo_2"]))
        f.create_dataset("mask/valid", data=np.array([b"demo_3"]))
    return path


@pytest.fixture
def libero_file(tmp_path):
    """A LIBERO-style file: instruction in problem_info, images and proprioception under obs."""
    path = tmp_path / "KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5"
    rng = np.random.default_rng(2)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"problem_name": "libero_kitchen_tabletop_manipulation",
                                                 "domain_name": "robosuite",
                                                 "language_instruction": "turn on the stove"})
        data.attrs["env_args"] = json.dumps({"env_name": "Libero_Kitchen_Tabletop_Manipulation", "type": 1})
        for d, length in enumerate((6, 9)):
            g = data.create_group(f"demo_{d}")
            g.attrs["num_samples"] = length
            g.create_dataset("actions", data=rng.uniform(-1, 1, (length, 7)))
            g.create_dataset("rewards", data=np.zeros(length, dtype=np.uint8))
            g.create_dataset("dones", data=np.zeros(length, dtype=np.uint8))
            g.create_dataset("obs/agentview_rgb", data=rng.integers(0, 255, (length, 16, 16, 3), dtype=np.uint8))
            g.create_dataset("obs/joint_states", data=rng.normal(size=(length, 7)))
            g.create_dataset("obs/gripper_states", data=rng.normal(size=(length, 2)))
    return path


@pytest.fixture(scope="session")
def metaworld_file(tmp_path_factory):
    """A small real collection: two MT10 tasks, three expert episodes each, state observations."""
    from lcbc.collect import collect

    path = tmp_path_factory.mktemp("metaworld") / "two_tasks.hdf5"
    collect(str(path), "metaworld:drawer-open-v3,reach-v3", episodes_per_task=3, workers=1)
    return path
