"""The LIBERO plug-in: tasks and instructions, an environment on a train placement and on an official initial
state, and the scripted experts on a few placements. One state environment serves every test that steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lcbc.benchmark import load_benchmark
from lcbc.errors import UserError

pytest.importorskip("libero.libero")

TASK = "turn-on-the-stove"


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("libero:goal")


@pytest.fixture(scope="module")
def env(benchmark):
    env = benchmark.make_env(TASK)
    yield env
    env.close()


def test_goal_suite_names_ten_tasks_with_libero_sentences_first(benchmark):
    assert len(benchmark.tasks) == 10 and TASK in benchmark.tasks
    assert benchmark.instructions(TASK)[0] == "turn on the stove" and len(benchmark.instructions(TASK)) >= 3
    assert all(len(benchmark.instructions(task)) >= 3 for task in benchmark.tasks)
    every = [text for task in benchmark.tasks for text in benchmark.instructions(task)]
    assert len(set(every)) == len(every)  # no phrasing asks for two tasks, or twice for one
    with pytest.raises(UserError, match="official initial states"):
        benchmark.goal(TASK, "test", 50)
    with pytest.raises(UserError, match="suites"):
        load_benchmark("libero:nope")
    some = load_benchmark(f"libero:goal:{TASK},put-the-bowl-on-the-plate")
    assert some.tasks == [TASK, "put-the-bowl-on-the-plate"] and some.name == f"libero:goal:{','.join(some.tasks)}"
    with pytest.raises(UserError, match="not a task"):
        load_benchmark("libero:goal:turn-off-the-stove")


def test_train_placements_are_seeded_and_test_goals_are_official_initial_states(benchmark, env):
    def start(split, index):
        obs, _ = env.reset(options={"goal": benchmark.goal(TASK, split, index)})
        return obs

    first, again, other = start("train", 0), start("train", 0), start("train", 1)
    # The same goal gives the same start, to rounding: the controller keeps ~1e-12 m from the last episode.
    assert np.allclose(first["state"], again["state"], atol=1e-9)
    assert not np.allclose(first["state"], other["state"], atol=1e-4)
    assert not np.allclose(first["state"], start("validation", 0)["state"], atol=1e-4)
    # The robot starts off its home pose as in the official initial states, differently per placement.
    joints = benchmark.layout(TASK).slices["joint_pos"]
    assert 0.005 < np.abs(first["state"][joints] - other["state"][joints]).max() < 0.2
    official = start("test", 3)
    assert np.allclose(official["state"], start("test", 3)["state"], atol=1e-9)
    assert not np.allclose(official["state"], start("test", 4)["state"], atol=1e-4)
    assert env.observation_space["state"].shape == official["state"].shape == (benchmark.layout(TASK).size,)
    assert env.simulator_state().shape == benchmark.goal(TASK, "test", 3).init_state.shape


def test_a_step_reports_success_as_a_bool_and_the_robot_state_leads_the_state(benchmark, env):
    obs, _ = env.reset(options={"goal": benchmark.goal(TASK, "train", 2)})
    obs, reward, terminated, truncated, info = env.step(np.zeros(7))
    assert info["success"] is False and reward == 0.0 and not terminated and not truncated
    assert np.array_equal(obs["robot_state"], obs["state"][:benchmark.layout(TASK).robot_size])
    assert env.max_episode_steps == 300


def test_camera_environments_add_an_image_from_each_camera(benchmark):
    env = benchmark.make_env(TASK, cameras=("agentview", "robot0_eye_in_hand"), image_size=32)
    obs, _ = env.reset(options={"goal": benchmark.goal(TASK, "train", 0)})
    env.close()
    scene, wrist = obs["agentview_rgb"], obs["robot0_eye_in_hand_rgb"]
    assert scene.shape == wrist.shape == (32, 32, 3) and scene.dtype == wrist.dtype == np.uint8
    assert scene.std() > 10 and wrist.std() > 10  # rendered scenes, not blank frames
    assert np.abs(scene.astype(int) - wrist).mean() > 10  # two views, not one view twice
    with pytest.raises(UserError, match="wrist"):
        benchmark.make_env(TASK, cameras=("agentview", "wrist"))


def run_expert(benchmark, env, task, goal) -> bool:
    from lcbc.collect import rollout_expert

    return rollout_expert(env, benchmark.expert(task), goal, steps_after_success=0)[1]


def test_the_stove_expert_succeeds_on_train_placements_and_official_initial_states(benchmark, env):
    goals = [benchmark.goal(TASK, "train", 0), benchmark.goal(TASK, "validation", 1), benchmark.goal(TASK, "test", 0)]
    assert all(run_expert(benchmark, env, TASK, goal) for goal in goals)


@pytest.mark.parametrize("task", ["open-the-middle-drawer-of-the-cabinet", "put-the-bowl-on-the-plate",
                                  "open-the-top-drawer-and-put-the-bowl-inside",
                                  "push-the-plate-to-the-front-of-the-stove", "put-the-wine-bottle-on-the-rack"])
def test_drawer_pick_and_place_and_push_experts_succeed(benchmark, task):
    env = benchmark.make_env(task)
    try:
        assert all(run_expert(benchmark, env, task, benchmark.goal(task, "train", index)) for index in (7, 8))
    finally:
        env.close()


def test_the_scene_reports_which_of_its_ten_goals_hold(benchmark, env):
    """Every LIBERO-Goal BDDL file names the same objects and regions, so one environment scores all ten goals."""
    obs, info = env.reset(options={"goal": benchmark.goal(TASK, "train", 0)})
    assert set(info["scene_success"]) == set(benchmark.tasks) and not any(info["scene_success"].values())
    expert = benchmark.expert(TASK)
    for _ in range(env.max_episode_steps):
        obs, _, _, _, info = env.step(expert(obs))
        assert info["scene_success"][TASK] == info["success"]
        if info["success"]:
            break
    assert [task for task, held in info["scene_success"].items() if held] == [TASK]


def test_tasks_can_follow_each_other_when_their_goals_involve_disjoint_objects(benchmark):
    drawer, bowl_on_stove = "open-the-middle-drawer-of-the-cabinet", "put-the-bowl-on-the-stove"
    assert benchmark.can_follow(TASK, drawer) and benchmark.can_follow(drawer, TASK)
    assert not benchmark.can_follow(TASK, bowl_on_stove)  # both involve the stove
    assert not benchmark.can_follow(drawer, "put-the-wine-bottle-on-top-of-the-cabinet")  # the cabinet
    assert not benchmark.can_follow(TASK, TASK)
    assert not load_benchmark("libero:spatial").can_follow(*load_benchmark("libero:spatial").tasks[:2])


def test_experts_do_two_chained_requests_in_one_episode(benchmark):
    """Open the middle drawer, then, with no reset, turn on the stove: the second request starts once the first
    goal holds, and each request's reached goals are its own."""
    from lcbc.evaluation.rollout import ExpertActor, Job, run_jobs

    drawer = "open-the-middle-drawer-of-the-cabinet"
    job = Job(drawer, "open the middle drawer of the cabinet", 0, start=TASK, then=((TASK, "turn on the stove"),))
    result = run_jobs(ExpertActor(benchmark), benchmark, [job], "train", progress=False)
    (outcome,) = result.outcomes
    assert outcome.completed == 2 and outcome.reached == [[drawer], [TASK]]
    assert result.successes == {(drawer, "open the middle drawer of the cabinet"): [True]}


def test_experts_obey_every_instruction_from_the_same_starts():
    """The obedience table of two experts is the identity: each reaches its own goal and not the other's."""
    from lcbc.evaluation.rollout import ExpertActor, run_jobs
    from lcbc.evaluation.scene import obedience_jobs, obedience_table

    drawer = "open-the-middle-drawer-of-the-cabinet"
    pair = load_benchmark(f"libero:goal:{TASK},{drawer}")
    jobs = obedience_jobs(pair.tasks, 2, {task: [pair.canonical_instruction(task)] for task in pair.tasks})
    assert {(job.start, job.episode) for job in jobs} == {(TASK, 0), (drawer, 1)}  # the same starts for each
    table = obedience_table(pair.tasks, run_jobs(ExpertActor(pair), pair, jobs, "train", progress=False).outcomes)
    assert table["rows"] == {TASK: {TASK: 1.0, drawer: 0.0}, drawer: {TASK: 0.0, drawer: 1.0}}
    assert table["obedience"] == 1.0 and table["episodes"] == {TASK: 2, drawer: 2}


def test_demos_collected_after_another_task_start_where_it_ended(tmp_path):
    """--after-tasks 1: the stove is turned on first, unrecorded; the drawer demo starts with the knob on, its
    attribute names the stove task, and it ends with the drawer open."""
    import h5py

    from lcbc.collect import collect
    from lcbc.data.hdf5 import demo_names

    drawer = "open-the-middle-drawer-of-the-cabinet"
    out = tmp_path / "after.hdf5"
    report = collect(str(out), f"libero:goal:{TASK},{drawer}", 1, tasks=[drawer], action_noise=0.1, after_tasks=1)
    assert report.kept == {drawer: 1}
    layout = load_benchmark("libero:goal").layout(drawer)
    with h5py.File(out) as file:
        (name,) = demo_names(file)
        demo = file["data"][name]
        assert demo.attrs["task"] == drawer and demo.attrs["after"] == TASK
        first_state = demo["obs/state"][0]
        assert first_state[layout.slices["flat_stove_1_button"]][0] > 0.5  # the knob is on from the first step
        assert demo["rewards"][0] == 0 and demo["rewards"][-1] == 1
        assert json.loads(file["data"].attrs["env_args"])["env_kwargs"]["after_tasks"] == 1
