"""The benchmark interface: a benchmark a user writes (a point mass, below) runs through every stage, and the
generic stages import no benchmark."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

from lcbc.benchmark import SPLITS, Benchmark, load_benchmark, register_benchmark
from lcbc.cli import main
from lcbc.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("data", "policies", "training", "rl", "evaluation")

# ---- a user's own benchmark: a point mass that must reach the corner its instruction names -------------

CORNERS = {"red": (0.8, 0.8), "blue": (-0.8, -0.8)}


class PointMassEnv(gym.Env):
    def __init__(self, task: str):
        self.target, self.max_episode_steps = np.array(CORNERS[task.split("-")[1]]), 40
        self.observation_space = gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (4,), np.float32)})
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def _obs(self):
        return {"state": np.concatenate([self.position, self.target]).astype(np.float32)}

    def reset(self, *, seed=None, options=None):
        self.position, self.steps = np.array(options["goal"], dtype=np.float64), 0
        return self._obs(), {}

    def step(self, action):
        self.position = np.clip(self.position + 0.1 * np.clip(action, -1, 1), -1, 1)
        self.steps += 1
        success = bool(np.linalg.norm(self.position - self.target) < 0.1)
        return self._obs(), float(success), False, self.steps >= self.max_episode_steps, {"success": success}


class PointMass(Benchmark):
    name, tasks, goal_tasks, goal_dim = "pointmass", ["reach-red", "reach-blue"], ("reach-red", "reach-blue"), 2

    def instructions(self, task):
        return (f"go to the {task.split('-')[1]} corner", f"move to the {task.split('-')[1]} one")

    def goal(self, task, split, index):  # a goal variation: where the point starts
        return np.random.default_rng([SPLITS.index(self.check_split(split)), index]).uniform(-0.5, 0.5, 2)

    def make_env(self, task, cameras=(), image_size=64):
        return PointMassEnv(task)

    def expert(self, task):
        return lambda obs: np.clip(5 * (obs["state"][2:] - obs["state"][:2]), -1, 1)

    def achieved_goal(self, task, state):
        return state[..., :2]

    def desired_goal(self, state):
        return state[..., 2:]

    def with_goal(self, state, goal):
        state = np.array(state)
        state[..., 2:] = goal
        return state

    def goal_reached(self, task, achieved, goal):
        return np.linalg.norm(np.asarray(achieved) - goal, axis=-1) < 0.1


# ---- the same corners in one scene: the state shows no target, so only the words say which corner --------


class SharedCornersEnv(PointMassEnv):
    def __init__(self, task: str):
        super().__init__(task)
        self.max_episode_steps = 20  # a chain of both corners takes more: each request has its own limit

    def _obs(self):
        return {"state": np.concatenate([self.position, [0.0, 0.0]]).astype(np.float32)}

    def scene_success(self) -> dict[str, bool]:
        return {f"reach-{name}": bool(np.linalg.norm(self.position - corner) < 0.1) for name, corner in CORNERS.items()}

    def reset(self, *, seed=None, options=None):
        obs, _ = super().reset(options=options)
        return obs, {"scene_success": self.scene_success()}

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, dict(info, scene_success=self.scene_success())

    def restart_step_limit(self):
        self.steps = 0


class SharedCorners(PointMass):
    name = "pointmass-scene"

    def make_env(self, task, cameras=(), image_size=64):
        return SharedCornersEnv(task)

    def expert(self, task):
        corner = np.array(CORNERS[task.split("-")[1]])
        return lambda obs: np.clip(5 * (corner - obs["state"][:2]), -1, 1)

    def scene(self, task):
        return tuple(self.tasks)

    def can_follow(self, first, second):
        return first != second


# ---- the tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pointmass_run(tmp_path_factory):
    """Demonstrations of the point mass and a policy trained on them, as a user makes them."""
    register_benchmark("pointmass", lambda argument: PointMass())
    register_benchmark("pointmass-scene", lambda argument: SharedCorners())
    tmp_path = tmp_path_factory.mktemp("pointmass")
    demos, run = tmp_path / "pointmass.hdf5", tmp_path / "run"
    main(["collect", "--benchmark", "pointmass", "--episodes-per-task", "6", "--out", str(demos), "--workers", "1"])
    main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{demos}]",
          "--trainer.default_root_dir", str(run), "--trainer.max_steps", "30"])
    main(["export", str(run / "checkpoints" / "last.ckpt"), str(run / "policy")])
    return demos, run


def test_a_users_benchmark_runs_through_every_stage(pointmass_run, tmp_path, capsys):
    demos, run = pointmass_run
    main(["inspect", str(demos)])
    assert "go to the red corner" in capsys.readouterr().out
    policy_files = sorted(path.name for path in (run / "policy").iterdir())
    main(["eval", "--policy", str(run / "policy"), "--benchmark", "pointmass", "--episodes", "3", "--split", "test"])
    # With no --out the report goes beside the policy folder, named by benchmark and split; the policy is untouched.
    table = json.loads((run / "eval" / "pointmass_test" / "success.json").read_text())
    assert sorted(path.name for path in (run / "policy").iterdir()) == policy_files
    assert table["split"] == "test" and set(table["tasks"]) == {"reach-red", "reach-blue"}
    assert table["expert_mean"] == 1.0 and sum(row["episodes"] for row in table["tasks"].values()) == 6
    main(["act", "--policy", str(run / "policy"), "--benchmark", "pointmass", "--task", "reach-blue",
          "go to the blue corner"])
    out = capsys.readouterr().out
    assert "'go to the blue corner' asks for reach-blue" in out and "reach-blue's scene" in out
    config = tmp_path / "finetune.yaml"
    config.write_text(f"""trainer: {{accelerator: cpu, enable_progress_bar: false, enable_model_summary: false}}
model: {{demos: [{demos}], total_env_steps: 120, envs_per_task: 2, max_episode_steps: 20, learning_starts: 20,
        actor_starts: 40, batch_size: 16, critic_hidden: 16, eval_episodes: 1, imitate: successful,
        relabel: {{goal_strategy: future, goal_relabels: 2}}, replay_capacity: 5000}}
""")
    main(["finetune", "--policy", str(run / "policy"), "--benchmark", "pointmass", "--config", str(config),
          "--out", str(tmp_path / "finetune")])
    assert (tmp_path / "finetune" / "policy" / "model.safetensors").exists()
    with h5py.File(demos) as file:  # sparse rewards and the goal variation each demo ran on
        demo = file["data/demo_0"]
        assert demo.attrs["split"] == "train" and demo["rewards"][-1] == 1.0 and "states" not in demo


def test_the_replay_stores_a_users_episodes_as_observed_with_hindsight_goals(tmp_path):
    from lcbc.rl.replay import GOAL_RELABEL, ORIGINAL, Episode, RelabelConfig, ReplayBuffer

    benchmark = PointMass()
    buffer = ReplayBuffer(benchmark, 1000, RelabelConfig(goal_strategy="future", goal_relabels=2,
                                                         task_strategy="all"))
    obs = np.array([[0, 0, 0.8, 0.8], [0.1, 0, 0.8, 0.8], [0.2, 0, 0.8, 0.8]], dtype=np.float32)
    buffer.add_episode(Episode("reach-red", None, obs, np.ones((2, 2)), np.array([False, False])))
    rows = buffer.transitions()
    original, relabeled = rows["relabel"] == ORIGINAL, rows["relabel"] == GOAL_RELABEL
    assert original.sum() == 2 and relabeled.sum() == 4 and len(rows["action"]) == 6  # no scene: no task relabels
    np.testing.assert_array_equal(rows["reward"][original], 0.0)
    # A hindsight goal is where the point was after a later step; reaching it is the reward.
    np.testing.assert_allclose(rows["obs"][relabeled][:, 2:], rows["goal"][relabeled], atol=1e-6)
    reached = np.linalg.norm(rows["next_obs"][relabeled][:, :2] - rows["goal"][relabeled], axis=-1) < 0.1
    np.testing.assert_array_equal(rows["reward"][relabeled], reached)
    with pytest.raises(UserError, match="dense"):
        ReplayBuffer(benchmark, 10, RelabelConfig(reward="dense"))


def test_benchmarks_are_found_by_name_and_bad_names_are_one_line():
    assert load_benchmark("MT10").tasks == load_benchmark("metaworld:MT10").tasks
    assert len(load_benchmark("metaworld:MT50").tasks) == 50
    assert load_benchmark("reach-v3,push-v3").tasks == ["reach-v3", "push-v3"]
    for spec, named in (("Lift", "Lift"), ("no_such.module:x", "no_such.module"), ("  ", "empty")):
        with pytest.raises(UserError, match=named):
            load_benchmark(spec)
    with pytest.raises(UserError, match="--split"):
        load_benchmark("MT10").goal("reach-v3", "dev", 0)


def test_generic_stages_import_no_benchmark():
    """`lcbc/data`, `policies`, `training`, `rl` and `evaluation` name no simulator; a benchmark is looked up
    by name through lcbc.benchmark."""
    for package in GENERIC:
        for path in (ROOT / "lcbc" / package).glob("*.py"):
            text = path.read_text()
            assert "metaworld" not in text and "lcbc.envs" not in text, path
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ImportFrom | ast.Import):
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    assert not any(name.startswith(("lcbc.benchmarks", "metaworld", "libero")) for name in names), path


def test_importing_the_generic_stages_changes_no_environment_variable():
    modules = [f"lcbc.{package}.{path.stem}" for package in GENERIC
               for path in sorted((ROOT / "lcbc" / package).glob("*.py")) if path.stem != "__init__"]
    code = (f"import os, sys; before = dict(os.environ)\nfor m in {modules!r}: __import__(m)\n"
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
            "assert not [m for m in sys.modules if m.startswith(('metaworld', 'lcbc.benchmarks'))]\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_chained_requests_are_scored_from_the_scene_and_each_gets_the_step_limit():
    from lcbc.evaluation.rollout import ExpertActor, Job, run_jobs

    class ForgetfulExpert(ExpertActor):
        def reset(self, done):
            self.forgotten = getattr(self, "forgotten", 0) + int(done.sum())

    benchmark, actor = SharedCorners(), ForgetfulExpert(SharedCorners())
    jobs = [Job("reach-red", "go to the red corner", e, then=(("reach-blue", "go to the blue corner"),))
            for e in range(3)]
    result = run_jobs(actor, benchmark, jobs, "test", envs_per_task=2, progress=False)
    assert actor.forgotten == 2 + 3  # the history of 2 environments at the start and after each episode, not link
    assert [outcome.completed for outcome in result.outcomes] == [2, 2, 2]
    assert all(outcome.reached == [["reach-red"], ["reach-blue"]] for outcome in result.outcomes)
    assert result.steps > 3 * SharedCornersEnv("reach-red").max_episode_steps  # past the limit of one request


def test_obedience_chains_and_several_instructions_from_the_command_line(pointmass_run, tmp_path, capsys):
    policy = str(pointmass_run[1] / "policy")
    main(["eval", "--policy", policy, "--benchmark", "pointmass-scene", "--obedience", "--blind", "go somewhere",
          "--episodes", "2", "--instructions", "unseen", "--out", str(tmp_path)])
    table = json.loads((tmp_path / "obedience.json").read_text())
    assert list(table["rows"]) == ["reach-red", "reach-blue", "blind: 'go somewhere'"]  # a task's phrasings pooled
    assert list(table["by_instruction"]) == ["move to the red one", "move to the blue one", "go somewhere"]
    assert table["episodes"] == {row: 2 for row in table["rows"]} and table["split"] == "validation"
    assert (tmp_path / "obedience.png").stat().st_size > 1000
    assert "| 0 reach-red |" in (tmp_path / "obedience.md").read_text()
    main(["eval", "--policy", policy, "--benchmark", "pointmass-scene", "--chain", "2", "--episodes", "3",
          "--instructions", "unseen", "--out", str(tmp_path)])
    chains = json.loads((tmp_path / "chains.json").read_text())
    assert list(chains["success_by_length"]) == ["1", "2"] and len(chains["episodes"]) == 3
    assert chains["success_by_length"]["1"] >= chains["success_by_length"]["2"]
    assert chains["expert_success_by_length"] == {"1": 1.0, "2": 1.0}  # the experts on the same chains
    assert all(text.startswith("move to") for chain in chains["episodes"] for text in chain["instructions"])
    assert (tmp_path / "chains.png").exists() and "| 2 |" in (tmp_path / "chains.md").read_text()
    capsys.readouterr()
    main(["act", "--policy", policy, "--benchmark", "pointmass-scene", "--task", "reach-red", "go to the red corner",
          "go to the blue corner"])
    out = capsys.readouterr().out
    assert "'go to the blue corner' asks for reach-blue" in out and "'go to the red corner': reached" in out
    assert "'go to the blue corner': " in out
