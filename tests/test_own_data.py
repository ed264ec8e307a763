"""Files lcbc did not write train with the README's commands: fit with configs/debug.yaml, export, then
`LanguagePolicy.from_pretrained(...).act(...)`; what cannot work fails with one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from lcbc import DemoDataset, LanguagePolicy
from lcbc.cli import main
from tests.conftest import file_digest

ROOT = Path(__file__).resolve().parents[1]


def error_line(capsys) -> str:
    """The one error line, the last one written (Lightning's INFO lines may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("lcbc: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def fit_and_export(path, run, *extra: str) -> LanguagePolicy:
    main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{path}]",
          "--trainer.default_root_dir", str(run), *extra])
    main(["export", str(run / "checkpoints" / "last.ckpt"), str(run / "policy")])
    return LanguagePolicy.from_pretrained(run / "policy")


def observation(policy: LanguagePolicy, rng) -> dict[str, np.ndarray]:
    obs = {key: rng.normal(size=len(policy.stats[key]["mean"])).astype(np.float32)
           for key in policy.config["low_dim_keys"]}
    size = policy.config["rt1"]["image_size"]
    obs.update({key: rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for key in policy.config["image_keys"]})
    return obs


def robomimic_image_file(path, sizes: dict[str, tuple[int, int]]):
    """robomimic's image layout: `<camera>_image` uint8 arrays, proprioception, no instruction, masks."""
    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as file:
        data = file.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {}})
        for d, length in enumerate((12, 9, 10)):
            group = data.create_group(f"demo_{d}")
            group.attrs["num_samples"] = length
            group.create_dataset("actions", data=rng.uniform(-1, 1, (length, 7)))
            group.create_dataset("rewards", data=np.zeros(length))
            group.create_dataset("dones", data=np.zeros(length, dtype=np.int64))
            group.create_dataset("obs/robot0_eef_pos", data=rng.normal(size=(length, 3)))
            for camera, (height, width) in sizes.items():
                group.create_dataset(f"obs/{camera}_image",
                                     data=rng.integers(0, 255, (length, height, width, 3), dtype=np.uint8))
        data.attrs["total"] = 31
        file.create_dataset("mask/train", data=np.array([b"demo_0", b"demo_1"]))
        file.create_dataset("mask/valid", data=np.array([b"demo_2"]))
    return path


def test_robomimic_low_dim_file_trains_with_an_instruction_for_the_file(robomimic_file, tmp_path, capsys):
    digest = file_digest(robomimic_file)
    with pytest.raises(SystemExit) as exit_info:  # no instruction anywhere in the file: the error names the fix
        main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{robomimic_file}]",
              "--trainer.default_root_dir", str(tmp_path / "no_instruction")])
    assert exit_info.value.code == 2
    error = error_line(capsys)
    assert "--data.instruction" in error and "demo_0" in error
    policy = fit_and_export(robomimic_file, tmp_path / "run", "--data.instruction", "lift the cube")
    policy.reset()
    assert policy.act(observation(policy, np.random.default_rng(0)), "lift the cube").shape == (7,)
    assert file_digest(robomimic_file) == digest


def test_robomimic_image_file_with_cameras_of_different_sizes_trains_when_resized(tmp_path, capsys):
    path = robomimic_image_file(tmp_path / "image.hdf5", {"agentview": (16, 16), "robot0_eye_in_hand": (24, 24)})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{path}]",
              "--data.instruction", "lift the cube", "--trainer.default_root_dir", str(tmp_path / "mixed")])
    assert exit_info.value.code == 2
    error = error_line(capsys)
    assert "--data.image_size" in error and "robot0_eye_in_hand_image 24x24" in error
    policy = fit_and_export(path, tmp_path / "run", "--data.instruction", "lift the cube", "--data.image_size", "16")
    assert sorted(policy.config["image_keys"]) == ["agentview_image", "robot0_eye_in_hand_image"]
    policy.reset()
    assert policy.act(observation(policy, np.random.default_rng(0)), "lift the cube").shape == (7,)


def test_a_non_square_camera_is_resized_to_a_square(tmp_path):
    path = robomimic_image_file(tmp_path / "wide.hdf5", {"agentview": (12, 20)})
    dataset = DemoDataset(path, instruction="lift the cube", image_size=8)
    assert dataset[0]["obs"]["agentview_image"].shape == (1, 8, 8, 3)
    with h5py.File(path) as file:  # averaged down from the stored frame, not cropped
        stored = file["data/demo_0/obs/agentview_image"][0].astype(float)
    assert abs(dataset[0]["obs"]["agentview_image"].float().mean().item() - stored.mean()) < 2


def test_libero_file_trains_with_its_own_instruction(libero_file, tmp_path):
    policy = fit_and_export(libero_file, tmp_path / "run")
    assert policy.config["instructions"] == ["turn on the stove"]
    policy.reset()
    assert policy.act(observation(policy, np.random.default_rng(0)), "turn on the stove").shape == (7,)


@pytest.mark.parametrize("value", [np.void(b"\x00\x01\x02"), 5, np.arange(3), b"\xff\xfe"])
def test_an_instruction_that_is_not_text_is_refused(demo_file, tmp_path, value, capsys):
    with h5py.File(demo_file, "a") as file:
        file["data/demo_1"].attrs["instruction"] = value
    for argv in (["inspect", str(demo_file)],
                 ["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{demo_file}]",
                  "--trainer.default_root_dir", str(tmp_path / "run")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "demo_1: attribute 'instruction'" in error_line(capsys)


def test_bad_data_arguments_stop_before_anything_is_built(demo_file, tmp_path, capsys):
    for flag, value in (("--data.batch_size", "0"), ("--data.batch_size", "-5"), ("--data.image_size", "0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{demo_file}]",
                  flag, value, "--trainer.default_root_dir", str(tmp_path / "run")])
        assert exit_info.value.code == 2
        assert flag.removeprefix("--") in error_line(capsys)
