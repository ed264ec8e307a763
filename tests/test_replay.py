"""The replay buffer: relabeled rewards equal what Meta-World reports for the same state under the new task
or goal, demos survive the ring, batches mix demos and online transitions as configured."""

from __future__ import annotations

import functools

import h5py
import numpy as np
import pytest

from lcbc.benchmark import load_benchmark
from lcbc.benchmarks.metaworld import SCENES
from lcbc.benchmarks.metaworld.env import (
    MetaWorldEnv,
    goal_in_scene,
    restore_simulator_state,
    scene_of,
    scripted_expert,
    simulator_state_size,
    split_goal,
)
from lcbc.benchmarks.metaworld.scorer import DENSE_REWARD_MAX
from lcbc.collect import STEPS_AFTER_SUCCESS
from lcbc.errors import UserError
from lcbc.rl.replay import (
    DEMO,
    GOAL_RELABEL,
    ONLINE,
    ORIGINAL,
    TASK_RELABEL,
    Episode,
    RelabelConfig,
    ReplayBuffer,
    discounted_return,
)
from tests.conftest import write_demo_file


@functools.cache
def expert_episode(task: str, steps: int = 500) -> dict:
    """The scripted expert on goal 0 of seed 0, for at most `steps` steps or until it succeeds."""
    goal = split_goal(task, "train", 0)
    env = MetaWorldEnv(task, goal=goal)
    expert = scripted_expert(task)
    obs, _ = env.reset()
    episode = {"states": [env.simulator_state()], "obs": [obs["state"]], "actions": [], "rewards": [],
               "successes": []}
    for _ in range(steps):
        action = np.clip(expert.get_action(obs["state"]), -1, 1).astype(np.float64)  # what MetaWorldEnv passes on
        obs, reward, _, _, info = env.step(action)
        for key, value in (("states", env.simulator_state()), ("obs", obs["state"]), ("actions", action),
                           ("rewards", reward), ("successes", info["success"])):
            episode[key].append(value)
        if info["success"]:
            break
    return {"goal": goal, **{key: np.array(value) for key, value in episode.items()}}


def mw(*tasks: str):
    return load_benchmark("metaworld:" + ",".join(tasks))


def as_episode(task: str, episode: dict, states: np.ndarray | None = None) -> Episode:
    """An `expert_episode` as the collector hands it to the buffer."""
    return Episode(task, episode["goal"], episode["obs"], episode["actions"], episode["successes"],
                   episode["states"] if states is None else states)


def added(buffer: ReplayBuffer, task: str, steps: int = 500) -> dict[str, np.ndarray]:
    episode = expert_episode(task, steps)
    number = buffer.add_episode(as_episode(task, episode))
    rows = buffer.transitions()
    return {key: column[rows["episode"] == number] for key, column in rows.items()}


def select(rows: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {key: column[mask] for key, column in rows.items()}


def fresh_env(task: str, goal):
    """A Meta-World env of `task`, reset into the goal variation, separate from the buffer's own."""
    from metaworld import env_dict

    env = env_dict.ALL_V3_ENVIRONMENTS[task]()
    env.set_task(goal)
    env.reset()
    return env


def env_reports(env, state: np.ndarray, action: np.ndarray, target: np.ndarray) -> tuple[float, bool, np.ndarray]:
    """Reward, success and observation Meta-World reports at a restored state (the buffer's rows pad it)."""
    restore_simulator_state(env, state[:simulator_state_size(env)])
    env._target_pos = target
    obs = env._get_obs()
    reward, info = env.evaluate_state(obs, action)
    return reward, bool(info["success"]), obs


@pytest.mark.parametrize("task", ["reach-v3", "push-v3", "pick-place-v3"])
def test_final_goal_relabels_equal_env_step_with_that_goal(task):
    """The episode stops before the expert succeeds; relabeled with its final achieved position as the goal,
    each step's reward equals env.step's in an env given that goal, and the last step succeeds."""
    episode = expert_episode(task, steps=30)
    assert not episode["successes"].any()
    config = {"goal_strategy": "final", "goal_relabels": 3}
    dense = added(ReplayBuffer(mw(task), 1000, RelabelConfig(reward="dense", **config)), task, steps=30)
    sparse = added(ReplayBuffer(mw(task), 1000, RelabelConfig(reward="sparse", **config)), task, steps=30)
    original, relabeled = (select(dense, dense["relabel"] == kind) for kind in (ORIGINAL, GOAL_RELABEL))
    assert len(original["reward"]) == len(relabeled["reward"]) == 30  # 'final' relabels each step once
    np.testing.assert_array_equal(original["reward"], np.float32(episode["rewards"] / DENSE_REWARD_MAX))
    np.testing.assert_array_equal(original["next_obs"], episode["obs"][1:].astype(np.float32))  # rebuilt from states
    goal = relabeled["goal"][0]
    assert (relabeled["goal"] == goal).all() and (relabeled["obs"][:, -3:] == goal.astype(np.float32)).all()
    assert (relabeled["next_obs"][:, -3:] == goal.astype(np.float32)).all()

    env = fresh_env(task, episode["goal"])
    env._target_pos = goal  # after reset: the goal moves nothing, so the same actions give the same states
    rewards, successes = [], []
    for action in episode["actions"]:
        _, reward, _, _, info = env.step(action)
        rewards.append(reward)
        successes.append(info["success"] > 0.5)
    np.testing.assert_array_equal(relabeled["reward"], np.float32(np.array(rewards) / DENSE_REWARD_MAX))
    np.testing.assert_array_equal(relabeled["terminal"], successes)
    sparse_relabeled = select(sparse, sparse["relabel"] == GOAL_RELABEL)
    np.testing.assert_array_equal(sparse_relabeled["reward"], np.float32(successes))
    assert sparse_relabeled["reward"][-1] == 1.0 and sparse_relabeled["terminal"][-1]
    assert (select(sparse, sparse["relabel"] == ORIGINAL)["reward"] == 0).all()


@pytest.mark.parametrize("task, steps", [("reach-v3", 30), ("push-v3", 30), ("push-v3", 500)])
def test_reaches_goal_marks_transitions_followed_by_success(task, steps):
    """Original rows reach their goal from the start up to the success (none for a cut-off episode);
    'final' relabels reach theirs when the hand or object moved off its start, and 'episode' relabels
    only those whose goal step is not behind them."""
    rows = added(ReplayBuffer(mw(task), 5000, RelabelConfig(goal_strategy="final", goal_relabels=1)), task, steps)
    original, relabeled = (select(rows, rows["relabel"] == kind) for kind in (ORIGINAL, GOAL_RELABEL))
    succeeded = expert_episode(task, steps)["successes"].any()
    assert (original["reaches_goal"] == succeeded).all()
    start = (original["obs"][0, :3] if task == "reach-v3" else original["obs"][0, 4:7])
    moved = np.linalg.norm(relabeled["goal"][0] - start) > 0.06  # beyond the radius and the fingertip offset
    stayed = np.linalg.norm(relabeled["goal"][0] - start) < 0.04
    assert moved or stayed
    assert (relabeled["reaches_goal"] == moved).all()
    if task == "reach-v3":
        assert moved  # 30 steps take the hand well away from its start, though not yet to the goal
    final_goal = relabeled["goal"][0]
    rows = added(ReplayBuffer(mw(task), 5000, RelabelConfig(goal_strategy="episode", goal_relabels=4)), task, steps)
    relabeled = select(rows, rows["relabel"] == GOAL_RELABEL)
    last = relabeled["step"] == len(original["action"]) - 1  # the final goal is the only one not behind it
    is_final = (relabeled["goal"] == final_goal).all(axis=1)
    assert (relabeled["reaches_goal"][last] == (is_final[last] & moved)).all()
    assert relabeled["reaches_goal"].any() == moved


def test_discounted_return_stops_at_each_terminal_step():
    """A terminal step's return is its reward alone (nothing after a success counts, as in Q's target); the
    steps before add their own rewards to the discounted rest; an episode cut off gets what it collected."""
    reward = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.5])
    terminal = np.array([False, False, True, True, False, False])
    np.testing.assert_allclose(discounted_return(reward, terminal, 0.5), [0.25, 0.5, 1.0, 1.0, 0.25, 0.5])


def test_every_row_stores_its_return_under_its_own_goal():
    """The original rows of a successful expert episode are worth gamma ** (steps to the success); each
    hindsight row is worth the same toward its own goal, zero where it never gets there."""
    buffer = ReplayBuffer(mw("reach-v3"), 5000, RelabelConfig(goal_strategy="future", goal_relabels=2), gamma=0.9)
    rows = added(buffer, "reach-v3")
    for kind in (ORIGINAL, GOAL_RELABEL):
        part = select(rows, rows["relabel"] == kind)
        for copy in range(1 if kind == ORIGINAL else 2):
            one = select(part, np.arange(len(part["step"])) // len(np.unique(part["step"])) == copy)
            np.testing.assert_allclose(one["return"], discounted_return(one["reward"], one["terminal"], 0.9),
                                       rtol=1e-5)
    original = select(rows, rows["relabel"] == ORIGINAL)
    first_success = int(np.argmax(original["terminal"]))
    np.testing.assert_allclose(original["return"][:first_success + 1],
                               0.9 ** np.arange(first_success, -1, -1), rtol=1e-5)
    relabeled = select(rows, rows["relabel"] == GOAL_RELABEL)
    assert (relabeled["return"][~relabeled["reaches_goal"] & (relabeled["reward"] == 0)] >= 0).all()
    assert relabeled["return"][relabeled["reaches_goal"]].min() > 0


@pytest.mark.parametrize("task, strategy, reward", [
    ("reach-v3", "future", "dense"), ("pick-place-v3", "episode", "dense"),
    ("reach-v3", "future", "sparse"), ("push-v3", "episode", "sparse")])
def test_future_and_episode_goals_are_achieved_positions_scored_by_the_env(task, strategy, reward):
    """Dense rewards come from the simulator scorer; sparse ones from the goal interface's distance, which
    must agree with the success Meta-World's evaluate_state reports for every relabeled goal."""
    episode = expert_episode(task)
    rows = added(ReplayBuffer(mw(task), 5000, RelabelConfig(reward=reward, goal_strategy=strategy, goal_relabels=3),
                              seed=1), task)
    steps = len(episode["actions"])
    relabeled = select(rows, rows["relabel"] == GOAL_RELABEL)
    assert len(relabeled["reward"]) == 3 * steps
    env = fresh_env(task, episode["goal"])
    target = env._target_pos.copy()
    achieved = []  # reach: the fingertips' centre; pick-place: the object
    for state in episode["states"][1:]:
        obs = env_reports(env, state, np.zeros(4), target)[2]
        achieved.append(env.tcp_center.copy() if task == "reach-v3" else obs[4:7])
    achieved = np.array(achieved)
    for row in range(len(relabeled["reward"])):
        step, goal = relabeled["step"][row], relabeled["goal"][row]
        sources = np.flatnonzero((achieved == goal).all(axis=1))
        assert len(sources) and (strategy == "episode" or sources.max() >= step)
        dense, success, _ = env_reports(env, relabeled["sim_state"][row], episode["actions"][step], goal)
        assert relabeled["reward"][row] == np.float32(dense / DENSE_REWARD_MAX if reward == "dense" else success)
        assert relabeled["terminal"][row] == success
    assert 0 < relabeled["terminal"].sum() < len(relabeled["terminal"])  # zero-reward relabels are kept too


@pytest.mark.parametrize("task, others", [("drawer-open-v3", ["drawer-close-v3"]),
                                          ("push-v3", ["reach-v3", "pick-place-v3"])])
def test_task_relabels_equal_the_other_tasks_env(task, others):
    """Every task-relabeled transition's reward, success and observation equal what a fresh env of the
    other task, reset into the same goal variation, reports at the stored state."""
    episode = expert_episode(task)
    rows = added(ReplayBuffer(mw(task, *others), 5000, RelabelConfig(reward="dense", task_strategy="all")), task)
    scene = scene_of(episode["goal"])
    for index, other in enumerate(others, start=1):
        relabeled = select(rows, (rows["relabel"] == TASK_RELABEL) & (rows["task"] == index))
        assert (relabeled["step"] == np.arange(len(episode["actions"]))).all()
        env = fresh_env(other, goal_in_scene(other, scene))
        target = env._target_pos.copy()
        for row, action in enumerate(episode["actions"]):
            reward, success, obs = env_reports(env, relabeled["sim_state"][row], action, target)
            assert relabeled["reward"][row] == np.float32(reward / DENSE_REWARD_MAX)
            assert relabeled["terminal"][row] == success
            # The current frame (the previous frame of row 0 is the fresh env's own reset) and the goal, unclipped.
            np.testing.assert_array_equal(relabeled["next_obs"][row, :18], np.float32(obs[:18]))
            assert (relabeled["next_obs"][row, 36:] == np.float32(target)).all()
            assert (relabeled["goal"][row] == target).all()
        if other == "drawer-close-v3":
            # The drawer starts closed: drawer-close holds from the first step until the drawer opens, which
            # asks nothing of the actions, so none of them are imitated for it.
            assert relabeled["terminal"][0] and not relabeled["terminal"][-1] and not relabeled["reaches_goal"].any()
            # The drawer scenes load one model file, so the drawer-close env stepped from the episode's first
            # state follows the same trajectory, and its env.step reports the same rewards.
            restore_simulator_state(env, episode["states"][0])
            steps = [env.step(action) for action in episode["actions"]]
            rewards = [step[1] / DENSE_REWARD_MAX for step in steps]
            np.testing.assert_array_equal(relabeled["reward"], np.float32(rewards))
            np.testing.assert_array_equal(relabeled["terminal"], [step[4]["success"] > 0.5 for step in steps])


def test_high_and_random_task_strategies():
    """A push episode also moves the object onto pick-place's goal and the hand near reach's."""
    buffer = ReplayBuffer(mw("push-v3", "reach-v3", "pick-place-v3"), 50_000, RelabelConfig(task_strategy="all"))
    rows = added(buffer, "push-v3")
    returns = {task: rows["reward"][(rows["relabel"] == TASK_RELABEL) & (rows["task"] == task)].sum()
               for task in (1, 2)}
    assert returns[2] > returns[1] >= 1  # sparse: steps with the object at pick-place's goal, the hand at reach's
    for config, expected in ((RelabelConfig(task_strategy="high"), {2}),
                             (RelabelConfig(task_strategy="high", task_relabels=2), {1, 2}),
                             (RelabelConfig(task_strategy="high", high_return=returns[1] + 1, task_relabels=2), {2}),
                             (RelabelConfig(task_strategy="high", high_return=1e9), set())):
        buffer.config = config
        relabeled = added(buffer, "push-v3")
        assert set(relabeled["task"][relabeled["relabel"] == TASK_RELABEL]) == expected
    # A drawer-open episode starts with drawer-close holding until the drawer opens: that scores for `all`,
    # never for `high`, which counts no success the episode starts with.
    drawers = ReplayBuffer(mw("drawer-open-v3", "drawer-close-v3"), 50_000, RelabelConfig(task_strategy="all"))
    relabeled = added(drawers, "drawer-open-v3")
    assert relabeled["reward"][relabeled["relabel"] == TASK_RELABEL][0] == 1
    drawers.config = RelabelConfig(task_strategy="high")
    assert not (added(drawers, "drawer-open-v3")["relabel"] == TASK_RELABEL).any()
    buffer.config = RelabelConfig(task_strategy="random")
    picked = []
    for _ in range(6):
        relabeled = added(buffer, "push-v3")
        picked.append(set(relabeled["task"][relabeled["relabel"] == TASK_RELABEL]))
    assert all(len(tasks) == 1 for tasks in picked) and set.union(*picked) == {1, 2}


def test_demos_are_rescored_kept_apart_from_the_ring_and_sampled_in_proportion(metaworld_file):
    buffer = ReplayBuffer(mw("drawer-open-v3", "drawer-close-v3", "reach-v3"), 60,
                          RelabelConfig(goal_strategy="final", task_strategy="all"), demo_fraction=0.25)
    added_count = buffer.load_demos(metaworld_file)
    demos = {key: column.copy() for key, column in buffer.transitions("demo").items()}
    assert added_count == buffer.demo_size == len(demos["reward"]) and (demos["source"] == DEMO).all()
    with h5py.File(metaworld_file) as file:
        for number, name in enumerate(sorted(file["data"], key=lambda name: int(name.split("_")[1]))):
            group = file["data"][name]
            original = select(demos, (demos["episode"] == number) & (demos["relabel"] == ORIGINAL))
            assert buffer.tasks[original["task"][0]] == group.attrs["task"]
            # Rebuilt from the stored simulator states, the observations are the file's.
            np.testing.assert_allclose(original["obs"], group["obs/state"][()], atol=1e-3)
            # The expert's demos go on STEPS_AFTER_SUCCESS steps past their first success (the last state
            # simulated again from the file): success, and so the sparse reward, starts exactly there.
            first_success = np.flatnonzero(original["terminal"])[0]
            assert first_success == len(original["terminal"]) - 1 - STEPS_AFTER_SUCCESS and original["terminal"][-1]
            np.testing.assert_array_equal(original["reward"], original["terminal"])
            kinds = set(demos["relabel"][demos["episode"] == number])
            relabel = GOAL_RELABEL if group.attrs["task"] == "reach-v3" else TASK_RELABEL  # to drawer-close
            assert kinds == {ORIGINAL, relabel}

    for _ in range(4):  # 2 x 20 transitions each time: the 60-transition ring wraps
        added(buffer, "reach-v3", steps=20)
    assert buffer.online_size == 60 and len(buffer) == 60 + buffer.demo_size
    for key, column in buffer.transitions("demo").items():
        np.testing.assert_array_equal(column, demos[key])
    batch = buffer.sample(400)
    assert (batch["source"] == DEMO).sum() == 100 and (batch["source"] == ONLINE).sum() == 300
    assert batch["obs"].shape == (400, 39) and "sim_state" not in batch
    assert (buffer.sample(8)["source"] == DEMO).sum() == 2


def test_task_weights_set_each_tasks_share_of_the_batch():
    buffer = ReplayBuffer(mw("reach-v3", "drawer-close-v3", "door-open-v3"), 200,
                          RelabelConfig(goal_strategy="future", goal_relabels=2), demo_fraction=0.0)
    reach, drawer = added(buffer, "reach-v3", steps=20), added(buffer, "drawer-close-v3", steps=20)
    assert len(reach["task"]) == 60 and len(drawer["task"]) == 20  # reach's goal relabels triple its rows
    assert np.mean(buffer.sample(4000)["task"] == 0) == pytest.approx(0.75, abs=0.03)
    # door-open holds no rows: the weights of the tasks present set the shares, 1 : 3.
    batch = buffer.sample(4000, task_weights=np.array([1.0, 3.0, 5.0]))
    assert np.bincount(batch["task"], minlength=3) / 4000 == pytest.approx([0.25, 0.75, 0.0], abs=0.03)
    # Within a task every row stays equally likely: each of reach's 20 steps (3 rows each) 4000 / 20 times.
    reach_rows = buffer.sample(4000, task_weights=np.array([1.0, 0.0, 0.0]))
    assert (reach_rows["task"] == 0).all()
    assert np.bincount(reach_rows["step"], minlength=20) == pytest.approx(np.full(20, 200), abs=60)
    for bad in (np.zeros(3), np.array([1.0, -1.0, 1.0]), np.ones(2)):
        with pytest.raises(ValueError, match="task_weights"):
            buffer.sample(10, task_weights=bad)


def test_task_weights_can_leave_the_demonstrations_part_by_rows():
    buffer = ReplayBuffer(mw("reach-v3", "drawer-close-v3"), 200, demo_fraction=0.5)
    for task in buffer.tasks:
        episode = expert_episode(task, steps=20)
        buffer.add_episode(as_episode(task, episode), source="demo")
        buffer.add_episode(as_episode(task, episode))
    only_reach = np.array([1.0, 0.0])
    weighted, online_only = (buffer.sample(4000, task_weights=only_reach, weigh_demos=weigh)
                             for weigh in (True, False))
    for batch, demo_reach_share in ((weighted, 1.0), (online_only, 0.5)):
        demos, online = batch["source"] == DEMO, batch["source"] == ONLINE
        assert demos.sum() == online.sum() == 2000 and (batch["task"][online] == 0).all()
        assert np.mean(batch["task"][demos] == 0) == pytest.approx(demo_reach_share, abs=0.03)


def test_ring_overwrites_the_oldest_transitions():
    buffer = ReplayBuffer(mw("reach-v3"), 50)
    episode = expert_episode("reach-v3", steps=20)
    written = []  # (episode, step) in writing order: 20 transitions per episode, no relabels
    for _ in range(4):
        number = buffer.add_episode(as_episode("reach-v3", episode))
        written += [(number, step) for step in range(20)]
    stored = buffer.transitions()
    assert buffer.online_size == 50
    for position, expected in enumerate(written[-50:], start=len(written) - 50):
        assert (stored["episode"][position % 50], stored["step"][position % 50]) == expected
    assert (buffer.sample(10)["source"] == ONLINE).all()
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(mw("reach-v3"), 10).add_episode(as_episode("reach-v3", episode))
    with pytest.raises(ValueError, match="expected"):
        buffer.add_episode(as_episode("reach-v3", episode, episode["states"][1:]))


@pytest.mark.parametrize("make, field", [
    (lambda: RelabelConfig(goal_strategy="futur"), "goal_strategy"),
    (lambda: RelabelConfig(task_strategy="best"), "task_strategy"),
    (lambda: RelabelConfig(reward="shaped"), "reward"),
    (lambda: RelabelConfig(goal_relabels=0), "goal_relabels"),
    (lambda: RelabelConfig(task_relabels=1.5), "task_relabels"),
    (lambda: ReplayBuffer(mw("reach-v3"), 0), "capacity"),
    (lambda: ReplayBuffer(mw("reach-v3"), 10, demo_fraction=1.5), "demo_fraction"),
    (lambda: ReplayBuffer(mw("reach-v2"), 10), "reach-v2"),
])
def test_bad_configuration_is_one_clear_line(make, field):
    with pytest.raises((ValueError, UserError)) as error:
        make()
    assert field in str(error.value) and "\n" not in str(error.value)


def test_demo_files_without_states_or_of_other_tasks_are_refused(tmp_path):
    path = write_demo_file(tmp_path / "no_states.hdf5", lengths=(4,), state_dim=39, action_dim=4, tasks=["reach-v3"])
    with pytest.raises(UserError, match=r"no_states.hdf5: demo_0: no 'states'"):
        ReplayBuffer(mw("reach-v3"), 10).load_demos(path)
    with pytest.raises(UserError, match=r"demo_0: task 'reach-v3' is not one of this buffer's tasks"):
        ReplayBuffer(mw("push-v3"), 10).load_demos(path)


def test_scene_groups_share_their_physics():
    """Tasks relabeled into each other must simulate the same world: compare their compiled models."""
    from metaworld import env_dict

    fields = ("body_pos", "body_quat", "body_mass", "body_inertia", "geom_type", "geom_size", "geom_pos",
              "geom_quat", "geom_friction", "geom_contype", "geom_conaffinity", "jnt_type", "jnt_range",
              "jnt_qposadr", "dof_damping", "dof_armature", "actuator_gear", "actuator_ctrlrange", "qpos0", "eq_data")
    for scene in SCENES:
        models = [env_dict.ALL_V3_ENVIRONMENTS[task]().model for task in scene]
        for model in models[1:]:
            assert (model.nq, model.nv, model.nmocap) == (models[0].nq, models[0].nv, models[0].nmocap)
            for field in fields:
                np.testing.assert_array_equal(getattr(model, field), getattr(models[0], field), err_msg=field)
