"""Collecting real Meta-World expert demonstrations, and surviving a kill mid-collection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_evaluation import trained_policy  # noqa: F401  (fixture: RT-1-tiny cloned from 3 demos a task)

from lcbc.benchmarks.metaworld import instruction_table
from lcbc.cli import main
from lcbc.data.dataset import DemoDataset
from lcbc.data.hdf5 import demo_names, open_demo_file, summarize, validate
from lcbc.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_small_real_collection(metaworld_file):
    summary = summarize(metaworld_file)
    assert summary["demos"] == 6
    assert summary["instructions"] == {"open the drawer": 3, "reach the goal": 3} or \
        summary["instructions"] == {instruction_table()["drawer-open-v3"][0]: 3, instruction_table()["reach-v3"][0]: 3}
    assert summary["obs"]["state"] == {"shape": [39], "dtype": "float32"}
    assert summary["action_dim"] == 4
    assert max(summary["action_max"]) <= 1.0 and min(summary["action_min"]) >= -1.0
    with h5py.File(metaworld_file) as f:
        episodes = {}
        for name in demo_names(f):
            demo = f["data"][name]
            episodes.setdefault(demo.attrs["task"], []).append(int(demo.attrs["episode"]))
            assert demo["dones"][-1] == 1 and demo["states"].shape[0] == demo["actions"].shape[0]
            assert demo.attrs["split"] == "train"
            # Sparse rewards, as robomimic writes them: 1 where the task holds, through the last step.
            assert set(np.unique(demo["rewards"][()])) <= {0.0, 1.0} and demo["rewards"][-1] == 1.0
        # A different goal variation for every episode of a task.
        assert all(len(set(e)) == len(e) == 3 for e in episodes.values())
        goals = {tuple(f["data"][name]["obs/state"][0, -3:]) for name in demo_names(f)}
        assert len(goals) == 6
    dataset = DemoDataset(metaworld_file, history=2)
    assert dataset.tasks == ["drawer-open-v3", "reach-v3"]


def test_collection_with_camera_images(tmp_path):
    from lcbc.collect import collect

    path = tmp_path / "pixels.hdf5"
    collect(str(path), "metaworld:reach-v3", episodes_per_task=1, cameras=("corner", "topview"), image_size=32)
    with h5py.File(path) as f:
        demo = f["data"][demo_names(f)[0]]
        images, robot = demo["obs/corner_rgb"][()], demo["obs/robot_state"][()]
        from_above = demo["obs/topview_rgb"][()]
        np.testing.assert_array_equal(robot, demo["obs/state"][:, :4])
        assert json.loads(f["data"].attrs["env_args"])["env_kwargs"]["cameras"] == ["corner", "topview"]
    assert images.shape == from_above.shape == (len(robot), 32, 32, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - from_above).mean() > 10  # two views of one scene, not one view twice
    moved = np.abs(images[-1].astype(int) - images[0]).sum(-1) > 30  # pixels the arm's reach changed
    assert 5 < moved.sum() < 32 * 32 / 2
    # Upright: the table (lower half) changes less than the arm above it.
    assert moved[:16].sum() > moved[16:].sum()


def test_steps_after_success_extend_the_same_episode():
    from lcbc.benchmark import load_benchmark
    from lcbc.collect import rollout_expert

    benchmark = load_benchmark("metaworld:reach-v3")
    env, goal = benchmark.make_env("reach-v3"), benchmark.goal("reach-v3", "train", 0)
    episodes = []
    for extra in (0, 7):
        episodes.append(rollout_expert(env, benchmark.expert("reach-v3"), goal, steps_after_success=extra))
    env.close()
    (short, short_success), (long, long_success) = episodes
    assert short_success and long_success
    assert len(long["actions"]) == len(short["actions"]) + 7
    np.testing.assert_array_equal(long["actions"][: len(short["actions"])], short["actions"])
    assert long["dones"].sum() == 1 and long["dones"][-1] == 1


def test_action_noise_moves_the_episode_off_the_expert_path_and_keeps_the_expert_labels():
    from lcbc.benchmark import load_benchmark
    from lcbc.collect import rollout_expert

    benchmark = load_benchmark("metaworld:reach-v3")
    env, expert = benchmark.make_env("reach-v3"), benchmark.expert("reach-v3")
    goal = benchmark.goal("reach-v3", "train", 0)
    clean, _ = rollout_expert(env, expert, goal, steps_after_success=0)
    noisy, success = rollout_expert(env, expert, goal, steps_after_success=0, action_noise=0.3,
                                    rng=np.random.default_rng(0))
    env.close()
    assert success
    steps = min(len(clean["actions"]), len(noisy["actions"]))
    assert not np.allclose(clean["obs/state"][1:steps], noisy["obs/state"][1:steps])
    # Every stored label is what the expert asks for in the state the noisy episode visited.
    relabelled = [np.clip(expert({"state": state}), -1, 1) for state in noisy["obs/state"]]
    np.testing.assert_allclose(noisy["actions"], relabelled, atol=1e-6)


def test_a_driving_policy_acts_while_the_expert_labels_and_every_episode_is_kept(trained_policy, tmp_path):  # noqa: F811
    from lcbc.benchmark import load_benchmark
    from lcbc.collect import collect
    from lcbc.policies.language_policy import LanguagePolicy

    path = tmp_path / "dagger.hdf5"
    report = collect(str(path), "metaworld:reach-v3", episodes_per_task=2, steps_after_success=0,
                     driver=str(trained_policy))
    assert report.attempts == report.kept == {"reach-v3": 2}  # failed episodes are kept too
    benchmark = load_benchmark("reach-v3")
    env, expert = benchmark.make_env("reach-v3"), benchmark.expert("reach-v3")
    policy = LanguagePolicy.from_pretrained(trained_policy)
    with h5py.File(path) as f:
        demos = [f["data"][name] for name in demo_names(f)]
        assert json.loads(f["data"].attrs["env_args"])["env_kwargs"]["driver"] == str(trained_policy)
        assert {int(demo.attrs["episode"]) for demo in demos} == {0, 1}
        for demo in demos:
            states, labels = demo["obs/state"][()], demo["actions"][()]
            # The states are the policy's own episode: its actions, replayed from the same start, visit them.
            obs, _ = env.reset(options={"goal": benchmark.goal("reach-v3", "train", int(demo.attrs["episode"]))})
            policy.reset()
            for state in states:
                np.testing.assert_allclose(obs["state"], state, atol=1e-5)
                obs, *_ = env.step(np.clip(policy.act(obs, demo.attrs["instruction"]), -1, 1))
            # The labels are the expert's, in those states, not what the policy did.
            np.testing.assert_allclose(labels, [np.clip(expert({"state": state}), -1, 1) for state in states],
                                       atol=1e-6)
    env.close()


@pytest.mark.parametrize("driver, message", [("nowhere", "not an exported policy"), (None, "reads corner_rgb")])
def test_a_driver_that_cannot_act_here_fails_in_one_line(driver, message, tmp_path, capsys):
    from types import SimpleNamespace

    from lcbc.collect import check_driver

    if driver is None:  # a pixel policy, in a state-only collection
        pixels = SimpleNamespace(config={"task_mode": "language", "tasks": [], "image_keys": ["corner_rgb"]})
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("lcbc.policies.language_policy.LanguagePolicy.from_pretrained", lambda path: pixels)
            with pytest.raises(UserError, match=message):
                check_driver("pixels", None, ["reach-v3"], ())
        return
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--benchmark", "reach-v3", "--out", str(tmp_path / "x.hdf5"), "--driver", driver])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "x.hdf5").exists()


def test_collect_resume_refuses_another_action_noise(metaworld_file, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy.hdf5"
    shutil.copy(metaworld_file, copy)
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--benchmark", "reach-v3", "--episodes-per-task", "4", "--out", str(copy),
              "--resume", "--workers", "1", "--action-noise", "0.1"])
    assert exit_info.value.code == 2 and "action_noise" in capsys.readouterr().err


def test_first_placement_moves_the_episodes_to_later_placements_and_is_kept_on_resume(tmp_path, capsys):
    out = tmp_path / "later.hdf5"
    main(["collect", "--benchmark", "reach-v3", "--episodes-per-task", "2", "--out", str(out), "--workers", "1",
          "--first-placement", "100", "--steps-after-success", "0"])
    with open_demo_file(out) as f:
        episodes = sorted(int(f["data"][name].attrs["episode"]) for name in validate(f, out))
    assert episodes == [100, 101]
    with pytest.raises(SystemExit) as exit_info:  # the same file from placement 0 on would mix two collections
        main(["collect", "--benchmark", "reach-v3", "--episodes-per-task", "3", "--out", str(out), "--resume",
              "--workers", "1", "--steps-after-success", "0"])
    assert exit_info.value.code == 2 and "first_placement" in capsys.readouterr().err


def test_collect_after_other_tasks_needs_tasks_that_can_come_first(tmp_path, capsys):
    """Meta-World's tasks each have a scene of their own: no task can be done before another in one episode."""
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--benchmark", "reach-v3", "--out", str(tmp_path / "x.hdf5"), "--after-tasks", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--after-tasks" in err and "reach-v3" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.hdf5").exists()


def test_collect_cli_defaults_match_the_collector_and_reject_negative_steps(tmp_path, capsys):
    from lcbc.cli import build_parser
    from lcbc.collect import STEPS_AFTER_SUCCESS

    args = build_parser().parse_args(["collect", "--benchmark", "reach-v3", "--out", "x.hdf5"])
    assert args.steps_after_success == STEPS_AFTER_SUCCESS
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--benchmark", "reach-v3", "--out", str(tmp_path / "x.hdf5"), "--steps-after-success", "-1"])
    assert exit_info.value.code == 2 and "--steps-after-success" in capsys.readouterr().err
    assert not (tmp_path / "x.hdf5").exists()


def test_collect_refuses_to_overwrite_and_resumes(metaworld_file, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy.hdf5"
    shutil.copy(metaworld_file, copy)
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--benchmark", "reach-v3", "--episodes-per-task", "1", "--out", str(copy), "--workers", "1"])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    # Resume: reach-v3 already has 3 episodes; asking for 4 adds exactly one new goal.
    main(["collect", "--benchmark", "reach-v3", "--episodes-per-task", "4", "--out", str(copy), "--resume",
          "--workers", "1"])
    with open_demo_file(copy) as f:
        names = validate(f, copy)
        reach = sorted(int(f["data"][n].attrs["episode"]) for n in names if f["data"][n].attrs["task"] == "reach-v3")
    assert len(names) == 7 and len(reach) == 4 and len(set(reach)) == 4


def test_kill_during_collection_keeps_completed_episodes(tmp_path):
    out = tmp_path / "killed.hdf5"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "lcbc.cli", "collect", "--benchmark", "reach-v3,push-v3", "--episodes-per-task",
         "40", "--out", str(out), "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once a few demos have been flushed (the file grows by ~20 KB per demo).
    deadline = time.time() + 180
    while time.time() < deadline and (not out.exists() or out.stat().st_size < 120_000):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    with open_demo_file(out) as f:
        names = validate(f, out)
        assert len(names) >= 2
        for name in names:
            assert np.isfinite(f["data"][name]["actions"][()]).all()
