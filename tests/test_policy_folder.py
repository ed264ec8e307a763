"""An exported policy folder: written whole, readable by others like its siblings, and every kind of damage
refused on load with one line (exit status 2 from the CLI), the folder left as it was."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from test_server import TASKS, _stats, onehot_dir  # noqa: F401  (fixture: a small one-hot policy folder)

from lcbc.cli import main
from lcbc.errors import UserError
from lcbc.policies.language_policy import LanguagePolicy
from lcbc.policies.rt1 import RT1Config
from tests.conftest import file_digest


def test_weights_are_readable_like_the_other_files_and_their_digest_is_recorded(onehot_dir):  # noqa: F811
    modes = {path.name: stat.S_IMODE(os.stat(path).st_mode) for path in os.scandir(onehot_dir)}
    assert set(modes) == {"config.json", "normalization.json", "model.safetensors", "weights.sha256"}
    assert len(set(modes.values())) == 1
    digest, name = (open(os.path.join(onehot_dir, "weights.sha256")).read().split())
    assert name == "model.safetensors" and digest == file_digest(os.path.join(onehot_dir, "model.safetensors"))


def damage(directory, how: str) -> None:
    weights, config = directory / "model.safetensors", directory / "config.json"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "flipped byte in the weights":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "garbled weights, digest rewritten":
        weights.write_bytes(b"\x00" * 5000)
        (directory / "weights.sha256").write_text(f"{file_digest(weights)}  model.safetensors\n")
    elif how == "invalid config.json":
        config.write_text("{not json")
    elif how == "config.json without its keys":
        config.write_text("{}")
    elif how == "config.json sizes disagree":
        value = json.loads(config.read_text())
        value["rt1"]["width"] *= 2
        config.write_text(json.dumps(value))
    elif how == "normalization.json sizes disagree":
        path = directory / "normalization.json"
        value = json.loads(path.read_text())
        value["state"] = {name: numbers + [0.0] for name, numbers in value["state"].items()}
        path.write_text(json.dumps(value))


CASES = ["truncated weights", "flipped byte in the weights", "garbled weights, digest rewritten",
         "invalid config.json", "config.json without its keys", "config.json sizes disagree",
         "normalization.json sizes disagree"]


@pytest.mark.parametrize("how", CASES)
def test_a_damaged_policy_folder_is_one_line_and_exit_2(onehot_dir, tmp_path, how, capsys):  # noqa: F811
    folder = tmp_path / "policy"
    shutil.copytree(onehot_dir, folder)
    damage(folder, how)
    before = {path.name: file_digest(path) for path in folder.iterdir()}
    for argv in (["act", "--policy", str(folder), "--task", "drawer-open-v3", "open the drawer"],
                 ["eval", "--policy", str(folder), "--benchmark", "drawer-open-v3", "--episodes", "1"],
                 ["serve", "--policy", str(folder), "--port", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and str(folder) in error[0], error
    assert {path.name: file_digest(path) for path in folder.iterdir()} == before


def test_an_undamaged_copy_loads(onehot_dir, tmp_path):  # noqa: F811
    folder = tmp_path / "policy"
    shutil.copytree(onehot_dir, folder)
    assert LanguagePolicy.from_pretrained(folder).config["task_mode"] == "onehot"


def _chunked_policy(directory, temporal_ensemble):
    """A one-hot policy predicting chunks of 3 actions, saved and loaded back (the setting must travel)."""
    rt1 = RT1Config.preset("rt1-tiny", history=2, action_chunk=3, dropout=0.0)
    LanguagePolicy(rt1, _stats({"actions": 2, "state": 4}), ["state"], [], ["open", "close"], TASKS, "onehot",
                   temporal_ensemble=temporal_ensemble).save_pretrained(directory)
    return LanguagePolicy.from_pretrained(directory)


def test_temporal_ensemble_acts_on_the_weighted_mean_of_the_overlapping_chunks(tmp_path, monkeypatch):
    policy = _chunked_policy(tmp_path / "policy", temporal_ensemble=0.5)
    assert policy.config["temporal_ensemble"] == 0.5
    # Chunk predicted at step t for two environments: env 0 plans t*10 + k for step t + k, env 1 its negative.
    step = {"t": 0}

    def predict(batch):
        plan = torch.tensor([[step["t"] * 10.0 + k] * 2 for k in range(3)])
        return torch.stack([plan, -plan])
    monkeypatch.setattr(policy, "predict", predict)
    obs = {"state": np.zeros((2, 4), np.float32)}

    def act(task_ids):
        action = policy.act_batch(obs, task_ids=task_ids)
        step["t"] += 1
        return action[:, 0]
    w = np.exp(-0.5 * np.arange(3))
    np.testing.assert_allclose(act([0, 0]), [0.0, -0.0])  # only the first chunk so far
    np.testing.assert_allclose(act([0, 0])[0], (w[0] * 10 + w[1] * 1) / w[:2].sum(), rtol=1e-6)
    np.testing.assert_allclose(act([0, 0])[0], (w[0] * 20 + w[1] * 11 + w[2] * 2) / w.sum(), rtol=1e-6)
    policy.reset_envs(np.array([False, True]))  # env 1's episode ended
    action = act([0, 1])  # ... and env 1 (re)starts, under a new task as well
    np.testing.assert_allclose(action, [(w[0] * 30 + w[1] * 21 + w[2] * 12) / w.sum(), -30.0], rtol=1e-6)
    np.testing.assert_allclose(act([1, 1]), [40.0, -(w[0] * 40 + w[1] * 31) / w[:2].sum()], rtol=1e-6)


def test_without_temporal_ensemble_each_chunks_first_action_is_taken(tmp_path):
    policy = _chunked_policy(tmp_path / "policy", temporal_ensemble=None)
    obs = {"state": np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)}
    with torch.no_grad():
        expected = policy.predict({"obs": {"state": torch.as_tensor(obs["state"])[:, None].repeat(1, 2, 1)},
                                   "obs_mask": torch.ones(2, 2, dtype=torch.bool),
                                   "task_id": torch.tensor([0, 1])})[:, 0].numpy()
    np.testing.assert_allclose(policy.act_batch(obs, task_ids=[0, 1]), expected, rtol=1e-5, atol=1e-6)


def test_a_negative_temporal_ensemble_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="temporal_ensemble must be at least 0"):
        _chunked_policy(tmp_path / "policy", temporal_ensemble=-1.0)
