"""RL fine-tuning: a short run on two tasks collects, updates, evaluates and exports; resume goes on at the
saved environment step with the replay intact; the IQL pieces checked by hand; bad input is one line."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluation import trained_policy  # noqa: F401  (fixture: RT-1-tiny cloned from 3 demos a task)

from lcbc.benchmark import load_benchmark
from lcbc.benchmarks.metaworld.augment import ActorStateAugmentation
from lcbc.benchmarks.metaworld.env import MetaWorldEnv, scene_of, split_goal
from lcbc.cli import main
from lcbc.policies.language_policy import LanguagePolicy
from lcbc.policies.rt1 import RT1
from lcbc.rl.collector import Collector, pink_noise
from lcbc.rl.iql import Critics, IQLConfig, actor_loss, awr_weights, critic_loss, expectile_loss
from lcbc.rl.pcgrad import pcgrad_backward
from lcbc.rl.replay import GOAL_RELABEL, ORIGINAL, Episode, RelabelConfig, ReplayBuffer
from lcbc.training.finetune import FineTuning, finetune_cli

ROOT = Path(__file__).resolve().parents[1]
TASKS = "reach-v3,drawer-open-v3"


def write_config(path: Path, demos: Path, total_env_steps: int, pcgrad: bool) -> Path:
    """A tiny run: 2 environments, updates from the 20th environment step, the actor from the 60th. The
    PCGrad run clones successful transitions only, with failure-weighted task sampling and pink noise; the
    other one every transition, row-uniform sampling and white noise."""
    path.write_text(f"""
seed_everything: 0
trainer: {{accelerator: cpu, devices: 1, log_every_n_steps: 1, enable_progress_bar: false,
           enable_model_summary: false}}
checkpoint: {{save_last: true, save_top_k: 0, every_n_train_steps: 20}}
model:
  demos: [{demos}]
  total_env_steps: {total_env_steps}
  envs_per_task: 1
  max_episode_steps: 20
  relabel: {{goal_strategy: future, goal_relabels: 1}}
  replay_capacity: 2000
  learning_starts: 20
  actor_starts: 60
  batch_size: 32
  critic_hidden: 32
  eval_every: 100000
  eval_episodes: 1
  eval_envs_per_task: 1
  pcgrad: {str(pcgrad).lower()}
  imitate: {"successful" if pcgrad else "all"}
  task_sampling: {"failures" if pcgrad else "rows"}
  exploration_noise: {"pink" if pcgrad else "white"}
  policy_ema: 0.9
""")
    return path


def finetune(policy, config: Path, out: Path, *extra: str) -> None:
    main(["finetune", "--policy", str(policy), "--benchmark", TASKS, "--config", str(config), "--out", str(out),
          *extra])


def metrics(run: Path) -> dict[str, list[float]]:
    """The CSV logger's columns, empty cells left out."""
    with open(run / "csv" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    return {key: [float(row[key]) for row in rows if row[key] != ""] for key in rows[0]}


def saved_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def finetuned(trained_policy, metaworld_file, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("finetune")
    # PCGrad here, plain advantage-weighted updates in the resumed run: both actor updates run.
    finetune(trained_policy, write_config(out / "config.yaml", metaworld_file, 120, pcgrad=True), out / "run")
    return out / "run"


def test_finetune_collects_updates_evaluates_and_exports(finetuned, trained_policy):  # noqa: F811
    logged = metrics(finetuned)
    assert max(logged["env_steps"]) == 120 and 2 in logged["env_steps"]
    for key in ("collect/success", "critic/q_loss", "critic/value_loss", "advantage/mean", "advantage/std",
                "actor/loss", "actor/weight_mean", "eval/success", "eval/reach-v3", "eval/drawer-open-v3",
                "collect/reach-v3", "collect/drawer-open-v3", "critic/q_own_goal", "critic/return_own_goal"):
        assert logged[key] and all(math.isfinite(value) for value in logged[key]), key
    assert len(logged["eval/success"]) == 2  # the cloned policy before the first step, and the end
    assert len(logged["critic/q_loss"]) == (120 - 20) // 2 + 1 and len(logged["actor/loss"]) == (120 - 60) // 2 + 1

    state = saved_state(finetuned)
    assert state["lcbc_finetune"]["env_steps"] == 120 and state["global_step"] == (120 - 20) // 2 + 1
    replay = state["lcbc_finetune"]["replay"]
    online, demos = replay["online"], replay["demos"]
    assert len(demos["action"]) >= 6 * 40  # the 6 expert demos (reach with its goal relabels)
    episodes_steps = (online["relabel"] == ORIGINAL).sum().item()
    assert 120 - 2 * 20 < episodes_steps <= 120  # finished episodes only; the ones in flight are not stored
    assert (online["relabel"] == GOAL_RELABEL).any()  # HER copies of reach episodes

    exported = LanguagePolicy.from_pretrained(finetuned / "policy")
    before = LanguagePolicy.from_pretrained(trained_policy)
    assert exported.config == before.config
    averaged, trained = ({key.removeprefix(prefix): value for key, value in state["state_dict"].items()
                          if key.startswith(prefix)} for prefix in ("averaged_policy.", "policy."))
    for key, value in exported.state_dict().items():  # the export is the running average, not the last weights
        torch.testing.assert_close(value, averaged[key])
    assert any(not torch.equal(averaged[key], trained[key]) for key in averaged)
    assert any(not torch.equal(a, b) for a, b in zip(exported.net.parameters(), before.net.parameters()))
    assert torch.equal(exported.task_encoder.instruction_embeddings, before.task_encoder.instruction_embeddings)
    exported.reset()
    assert exported.act({"state": np.zeros(39, np.float32)}, "reach the goal").shape == (4,)


def test_resume_continues_at_the_saved_step_with_the_replay_intact(finetuned, trained_policy, metaworld_file,  # noqa: F811
                                                                   tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finetuned / "checkpoints", run / "checkpoints")
    saved = saved_state(run)
    finetune(trained_policy, write_config(tmp_path / "config.yaml", metaworld_file, 160, pcgrad=False), run, "--resume",
             "--", "--model.updates_per_step", "2")

    logged = metrics(run)
    assert min(logged["env_steps"]) == 122 and max(logged["env_steps"]) == 160  # not restarted at 0
    assert len(logged["eval/success"]) == 1  # only at the end: the start was evaluated before
    resumed = saved_state(run)
    assert resumed["global_step"] == saved["global_step"] + 2 * 20  # two updates per collection step
    before, after = saved["lcbc_finetune"]["replay"], resumed["lcbc_finetune"]["replay"]
    for key, column in before["demos"].items():
        assert torch.equal(after["demos"][key], column), key
    for key, column in before["online"].items():  # the ring has room: old rows stay, new ones follow
        assert torch.equal(after["online"][key][:len(column)], column), key
    assert len(after["online"]["action"]) > len(before["online"]["action"])
    assert LanguagePolicy.from_pretrained(run / "policy").rt1_config.history == 2


def test_expectile_loss_by_hand():
    diff = torch.tensor([2.0, -1.0])  # target - V
    assert expectile_loss(diff, 0.8).item() == pytest.approx((0.8 * 4 + 0.2 * 1) / 2)
    assert expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (4 + 1) / 2)  # half the squared error
    # Fit to targets 0 and 1 in equal numbers, V settles at the expectile: tau (1 - v) = (1 - tau) v, v = tau.
    value = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.SGD([value], lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        expectile_loss(torch.tensor([0.0, 1.0]) - value, 0.9).backward()
        optimizer.step()
    assert value.item() == pytest.approx(0.9, abs=1e-4)


@pytest.mark.parametrize("absorbing", [False, True])
def test_q_regresses_onto_reward_plus_discounted_next_value_or_an_absorbing_success(absorbing):
    """Q's target is r + gamma V(s') before a goal; at a terminal success it is r alone (sparse), or with
    `absorbing_success` r / (1 - gamma): the success reward held for ever, so ending there is worth the
    most a dense reward can give."""
    torch.manual_seed(0)
    critics, config = Critics(3, 2, hidden=8, layers=1), IQLConfig(gamma=0.9, absorbing_success=absorbing)
    state, next_state, action = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 2)
    reward, terminal = torch.tensor([0.3, 1.0]), torch.tensor([False, True])
    loss, _, _ = critic_loss(critics, config, state, action, reward, terminal, next_state)
    with torch.no_grad():
        target = torch.stack([0.3 + 0.9 * critics.value(next_state)[0], torch.tensor(10.0 if absorbing else 1.0)])
        q = critics.q_values(state, action)
        value = critics.value(state)
        expected = expectile_loss(critics.q_values(state, action, target=True).min(0).values - value, 0.9)
        expected = expected + (q - target).square().mean(1).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_return_bound_lifts_q_target_to_the_stored_return_and_never_lowers_it():
    """With `return_bound`, a row whose episode went on to collect more than r + gamma V(s') promises is
    regressed onto that return; a row whose TD target is already higher keeps it."""
    torch.manual_seed(0)
    critics = Critics(3, 2, hidden=8, layers=1)
    state, next_state, action = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 2)
    reward, terminal = torch.tensor([0.0, 0.0]), torch.tensor([False, False])
    with torch.no_grad():
        td = 0.9 * critics.value(next_state)
    returns = torch.stack([td[0] + 0.5, td[1] - 0.5])
    bounded, _, metrics = critic_loss(critics, IQLConfig(gamma=0.9, return_bound=True), state, action, reward,
                                      terminal, next_state, returns=returns)
    unbounded, _, _ = critic_loss(critics, IQLConfig(gamma=0.9), state, action, reward, terminal, next_state,
                                  returns=returns)
    with torch.no_grad():
        q, value = critics.q_values(state, action), critics.value(state)
        expected = expectile_loss(critics.q_values(state, action, target=True).min(0).values - value, 0.9)
        lifted = expected + (q - torch.stack([returns[0], td[1]])).square().mean(1).sum()
        plain = expected + (q - td).square().mean(1).sum()
    assert bounded.item() == pytest.approx(lifted.item(), rel=1e-6)
    assert unbounded.item() == pytest.approx(plain.item(), rel=1e-6)
    assert metrics["bound_active"].item() == 0.5


def test_rows_left_out_of_the_critics_losses_still_get_an_advantage():
    """`trains` (FineTuning's `critic_failed_relabels: false`) keeps rows out of the critics' losses, as if
    the batch held only the others; the actor's advantage still covers every row."""
    torch.manual_seed(0)
    critics, config = Critics(3, 2, hidden=8, layers=1), IQLConfig()
    state, next_state, action = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2)
    reward, terminal = torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([False, True, False, False])
    trains = torch.tensor([True, True, False, False])
    loss, advantage, _ = critic_loss(critics, config, state, action, reward, terminal, next_state, trains)
    kept, kept_advantage, _ = critic_loss(critics, config, state[:2], action[:2], reward[:2], terminal[:2],
                                          next_state[:2])
    assert loss.item() == pytest.approx(kept.item(), rel=1e-6) and len(advantage) == 4
    torch.testing.assert_close(advantage[:2], kept_advantage)
    everything, _, _ = critic_loss(critics, config, state, action, reward, terminal, next_state)
    assert everything.item() != pytest.approx(loss.item())


def test_exploration_goals_are_new_every_episode_and_train_goals():
    collector = Collector(load_benchmark("metaworld:reach-v3"))
    scenes = []
    for _ in range(60):
        collector._start(0)
        scenes.append(tuple(scene_of(collector._episodes[0].goal)))
    assert len(set(scenes)) == 60
    assert scenes == [tuple(scene_of(split_goal("reach-v3", "train", number))) for number in range(60)]


def test_failure_driven_collection_sends_environments_to_failing_tasks_and_reuses_them():
    collector = Collector(load_benchmark("metaworld:reach-v3,drawer-open-v3,drawer-close-v3"),
                          task_collection="failures", solved_task_weight=0.25)
    collector.task_successes["reach-v3"].extend([False] * 20)  # failure rate 1: weight 1.25
    for task in ("drawer-open-v3", "drawer-close-v3"):  # solved: weight 0.25 each
        collector.task_successes[task].extend([True] * 20)
    started = [collector._next_task("reach-v3") for _ in range(3000)]
    shares = [started.count(task) / len(started) for task in collector.tasks]
    np.testing.assert_allclose(shares, [1.25 / 1.75, 0.25 / 1.75, 0.25 / 1.75], atol=0.03)
    # A slot switching task parks its environment and takes a parked one of the new task when there is one.
    first, second = collector.envs[0], collector.envs[1]
    assert collector._env_for(0, "drawer-open-v3").task == "drawer-open-v3" and collector.envs[0] is not first
    assert collector.slot_tasks[:2] == ["drawer-open-v3", "drawer-open-v3"]
    assert collector._env_for(1, "reach-v3") is first and collector._parked["drawer-open-v3"] == [second]
    reach = load_benchmark("metaworld:reach-v3")
    assert Collector(reach)._next_task("reach-v3") == "reach-v3"  # uniform: a slot keeps its task
    with pytest.raises(ValueError, match="task_collection"):
        Collector(reach, task_collection="hardest")


def run_expert(env, expert, obs, steps: int = 300) -> tuple[dict, bool]:
    for _ in range(steps):
        obs, _, _, _, info = env.step(expert(obs))
        if info["success"]:
            return obs, True
    return obs, False


def test_switch_task_goes_on_from_the_same_physical_state_as_the_task_that_undoes_it():
    benchmark = load_benchmark("metaworld:drawer-open-v3,drawer-close-v3")
    assert benchmark.reverse("drawer-open-v3") == "drawer-close-v3" and benchmark.reverse("reach-v3") is None
    env, goal = benchmark.make_env("drawer-open-v3"), benchmark.goal("drawer-open-v3", "train", 3)
    obs, opened = run_expert(env, benchmark.expert("drawer-open-v3"), env.reset(options={"goal": goal})[0])
    assert opened
    before, hand = env.simulator_state(), obs["state"][:4]
    obs = env.switch_task("drawer-close-v3")
    np.testing.assert_array_equal(env.simulator_state(), before)  # nothing moved
    np.testing.assert_allclose(obs["state"][:4], hand)  # the hand and gripper where they were
    assert env.task == "drawer-close-v3" and env.goal.env_name == "drawer-close-v3"
    np.testing.assert_array_equal(scene_of(env.goal), scene_of(goal))  # the same drawer
    fresh = MetaWorldEnv("drawer-close-v3")
    np.testing.assert_allclose(obs["state"][-3:], fresh.reset(options={"goal": env.goal})[0]["state"][-3:])
    obs, closed = run_expert(env, benchmark.expert("drawer-close-v3"), obs)
    assert closed
    assert env.reset(options={"goal": goal})[0]["state"][-3:].tolist() == env.switch_task("drawer-open-v3")[
        "state"][-3:].tolist() and env.task == "drawer-open-v3"  # a reset with a goal of the other task


@pytest.mark.parametrize("limit", [100_000, 1])
def test_reset_free_collection_alternates_tasks_that_undo_each_other_without_resets(limit):
    """The experts open and close the drawer in turn, each episode starting where the slot's last one ended;
    at the hard limit (every episode with limit 1) an environment is reset, and counted."""
    from lcbc.evaluation.rollout import ExpertActor

    benchmark = load_benchmark("metaworld:drawer-open-v3,drawer-close-v3")
    collector = Collector(benchmark, max_episode_steps=300, exploration_std=0.0, reset_free=True,
                          reset_free_steps=limit)
    resets = [0]
    for env in collector.envs:
        def counted(*args, reset=env.reset, **kwargs):
            resets[0] += 1
            return reset(*args, **kwargs)
        env.reset = counted
    replay = ReplayBuffer(benchmark, 20_000, RelabelConfig(task_strategy="high"))
    stored, add = [], replay.add_episode
    replay.add_episode = lambda episode, source="online": stored.append(episode) or add(episode, source)
    actor = ExpertActor(benchmark)
    while len(stored) < 8:
        collector.step(actor, replay)
    assert all(episode.success[-1] for episode in stored)
    ends = {episode.states[-1].tobytes(): episode.task for episode in stored}
    went_on = [ends.get(episode.states[0].tobytes()) for episode in stored[2:]]
    if limit == 1:
        in_flight = sum(episode is not None for episode in collector._episodes)
        assert collector.forced_resets == len(stored) and resets[0] == len(stored) + in_flight
        assert went_on == [None] * len(went_on)
    else:
        assert collector.forced_resets == 0 and resets[0] == 2  # the first episode of each environment
        assert went_on == [benchmark.reverse(episode.task) for episode in stored[2:]]
    assert replay.online_size == sum(len(episode.actions) for episode in stored)


def test_reset_free_environment_stuck_in_failures_is_reset():
    """An actor that never moves fails every 5-step episode: each second failure in a row resets."""
    benchmark = load_benchmark("metaworld:drawer-open-v3,drawer-close-v3")
    collector = Collector(benchmark, max_episode_steps=5, exploration_std=0.0, reset_free=True,
                          reset_free_failures=2)
    still = type("Still", (), {"reset": lambda self, done: None,
                               "__call__": lambda self, obs, jobs: np.zeros((len(jobs), 4))})()
    replay = ReplayBuffer(benchmark, 2000)
    for _ in range(30):  # six episodes per environment
        collector.step(still, replay)
    assert collector.stuck_resets == 2 * 3 and collector.forced_resets == 0


def test_reset_free_failure_count_starts_again_after_a_forced_reset():
    """Two 5-step failures fill the 10-step limit: the forced reset clears the count, so the next
    goal variation gets its own two tries and no stuck reset ever comes first."""
    benchmark = load_benchmark("metaworld:drawer-open-v3,drawer-close-v3")
    collector = Collector(benchmark, max_episode_steps=5, exploration_std=0.0, reset_free=True,
                          reset_free_steps=10, reset_free_failures=2)
    still = type("Still", (), {"reset": lambda self, done: None,
                               "__call__": lambda self, obs, jobs: np.zeros((len(jobs), 4))})()
    replay = ReplayBuffer(benchmark, 2000)
    for _ in range(30):  # six episodes per environment
        collector.step(still, replay)
    assert collector.forced_resets == 2 * 3 and collector.stuck_resets == 0


def test_reset_free_run_counts_its_forced_resets_and_resumes_the_count(trained_policy, tmp_path):  # noqa: F811
    """Two environments, episodes of at most 10 steps, a reset once 25 steps on one goal variation are done:
    within 40 steps each, every environment was forced to reset once (at the end of the episode that passes
    25 steps), whatever it succeeded at; a resumed run starts new episodes (reset, not counted) and goes on
    counting from the saved number."""
    config = tmp_path / "config.yaml"
    config.write_text("""
seed_everything: 0
trainer: {accelerator: cpu, devices: 1, log_every_n_steps: 1, enable_progress_bar: false, enable_model_summary: false}
checkpoint: {save_last: true, save_top_k: 0, every_n_train_steps: 10}
model: {envs_per_task: 1, max_episode_steps: 10, reset_free_steps: 25, replay_capacity: 2000, learning_starts: 20,
        actor_starts: 40, batch_size: 16, critic_hidden: 16, eval_every: 100000, eval_episodes: 1}
""")
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    command = ["finetune", "--policy", str(trained_policy), "--benchmark", "metaworld:drawer-open-v3,drawer-close-v3",
               "--config", str(config), "--reset-free"]
    main([*command, "--out", str(run), "--", "--model.total_env_steps", "80"])
    assert max(metrics(run)["collect/forced_resets"]) == 2
    assert saved_state(run)["lcbc_finetune"]["collector"]["forced_resets"] == 2
    shutil.copytree(run / "checkpoints", resumed / "checkpoints")
    main([*command, "--out", str(resumed), "--resume", "--", "--model.total_env_steps", "160"])
    counted = metrics(resumed)["collect/forced_resets"]
    assert min(counted) == 2 and max(counted) == 4


@pytest.mark.parametrize("scale", ["fixed", "uniform"])
def test_exploration_scale_is_the_same_every_episode_or_drawn_for_each(scale):
    collector = Collector(load_benchmark("metaworld:reach-v3"), max_episode_steps=200, exploration_scale=scale)
    sizes = []
    for _ in range(60):
        collector._start(0)
        sizes.append(collector._episodes[0].noise.std())  # in units of exploration_std
    if scale == "fixed":
        np.testing.assert_allclose(sizes, 1.0, atol=0.1)
    else:  # uniform in [0, 1]: some quiet episodes, some at full scale, none above
        assert min(sizes) < 0.1 and 0.9 < max(sizes) < 1.1 and 0.35 < np.mean(sizes) < 0.65


def test_pink_noise_drifts_where_white_noise_averages_out():
    rng = np.random.default_rng(0)
    pink = np.stack([pink_noise(rng, 200, 4) for _ in range(200)])  # 200 episodes of 200 steps
    white = rng.standard_normal(pink.shape)
    np.testing.assert_allclose(pink.std(axis=1), 1.0, rtol=1e-6)  # unit variance in every episode and dim
    lag_one = np.mean([np.corrcoef(episode[:-1, 0], episode[1:, 0])[0, 1] for episode in pink])
    assert lag_one > 0.4
    # Summed over an episode (the hand's displacement), pink noise goes about 3.4 times as far.
    assert np.abs(pink.sum(axis=1)).mean() > 2.5 * np.abs(white.sum(axis=1)).mean()


def test_awr_weights_are_exponentiated_advantages_over_their_spread_clipped():
    advantage = torch.tensor([0.0, 0.1, -0.2, 5.0, 1e4])
    std = advantage.std().item()
    weights = awr_weights(advantage, beta=3.0, max_weight=100.0)  # exp(3 * 1e4 / std) ~ 800: clipped
    expected = [1.0, math.exp(3 * 0.1 / std), math.exp(-3 * 0.2 / std), math.exp(3 * 5.0 / std), 100.0]
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5)
    # Only the spread matters: the same advantages at a hundredth of the scale weigh the same.
    np.testing.assert_allclose(awr_weights(advantage / 100, 3.0, 100.0).numpy(), weights.numpy(), rtol=1e-4)


def test_log_likelihood_is_the_cloning_loss_per_sample(trained_policy):  # noqa: F811
    policy = LanguagePolicy.from_pretrained(trained_policy)
    generator = torch.Generator().manual_seed(0)
    batch = {"obs": {"state": torch.randn(5, 2, 39, generator=generator)}, "obs_mask": torch.ones(5, 2, dtype=bool),
             "actions": torch.rand(5, 1, 4, generator=generator) * 2 - 1, "action_mask": torch.ones(5, 1, dtype=bool),
             "instruction_id": torch.tensor([0, 1, 0, 1, 0])}
    with torch.no_grad():
        log_likelihood = policy.log_likelihood(batch)
        loss = RT1.loss(policy.logits(batch), policy.action_tokenizer.targets(batch["actions"]), batch["action_mask"])
    assert log_likelihood.shape == (5,)
    assert (-log_likelihood.mean() / 4).item() == pytest.approx(loss.item(), rel=1e-5)  # mean over 4 action dims


@pytest.mark.parametrize(("pcgrad", "reaches_goal", "demo_goal_weights", "imitate"), [
    (False, [1, 0, 1, 1, 0, 0, 1, 0], None, "successful"),
    (True, [1, 0, 1, 1, 0, 0, 1, 0], None, "successful"),
    (True, [1, 0, 1, 0, 0, 0, 1, 0], None, "successful"),  # task 1 imitates nothing, yet counts in the mean
    (False, [1, 1, 1, 1, 0, 0, 1, 0], {"reach-v3": 0.0}, "successful"),  # rows 0, 6: reach demos, own goal
    (True, [1, 1, 1, 1, 0, 0, 1, 0], {"reach-v3": 0.5, "drawer-open-v3": 0.0}, "successful"),
    (False, [1, 0, 1, 1, 0, 0, 1, 0], None, "advantage"),  # the rows with a positive advantage, not these
])
def test_actor_gradient_is_the_whole_batchs_with_unimitated_rows_left_out(pcgrad, reaches_goal, demo_goal_weights,
                                                                          imitate, trained_policy):  # noqa: F811
    """Under `imitate: successful` (and `advantage`) the actor runs RT-1 on the rows it imitates only (under
    PCGrad, one pass per task); its gradient must equal that of the weighted loss over one pass of the whole
    batch, where the other rows weigh zero (per task under PCGrad), and the demonstration rows that keep their
    own goal weigh what `demo_goal_weights` gives their task."""
    module = FineTuning(policy=str(trained_policy), benchmark=TASKS, imitate=imitate, pcgrad=pcgrad,
                        demo_goal_weights=demo_goal_weights)
    module.setup("fit")
    module.manual_backward = lambda loss: loss.backward()
    generator = torch.Generator().manual_seed(0)
    history = module.policy.rt1_config.history
    batch = {"obs_window": torch.randn(8, history, 39, generator=generator),
             "window_mask": torch.ones(8, history, dtype=torch.bool),
             "action": torch.rand(8, 4, generator=generator) * 2 - 1,
             "reaches_goal": torch.tensor(reaches_goal, dtype=torch.bool),
             "task": torch.tensor([0, 1, 0, 1, 0, 1, 0, 0]),
             "source": torch.tensor([1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.uint8),  # DEMO 1, ONLINE 0
             "relabel": torch.tensor([0, 0, 0, 0, 1, 0, 0, 2], dtype=torch.uint8)}  # ORIGINAL 0
    task = {module.task_key: module.task_inputs[batch["task"]]}
    advantage = torch.randn(8, generator=generator)
    parameters = module._actor_parameters()

    torch.manual_seed(0)  # PCGrad's task order
    metrics = module._actor_backward(batch, task, advantage, state=None)  # the critics' state: only q_gradient reads it
    skipped = [p.grad.clone() for p in parameters]
    own_goal_weight = torch.ones(8)
    for row, task_name in ((0, "reach-v3"), (6, "reach-v3"), (1, "drawer-open-v3")):
        own_goal_weight[row] = (demo_goal_weights or {}).get(task_name, 1.0)
    imitated = batch["reaches_goal"] if imitate == "successful" else advantage > 0
    assert metrics["actor/imitated"].item() == ((own_goal_weight * imitated) > 0).sum().item() / 8

    module.policy.zero_grad()
    weights = awr_weights(advantage, module.iql.beta, module.iql.max_weight) * imitated * own_goal_weight
    actions = torch.zeros(8, module.policy.rt1_config.action_chunk, 4)
    actions[:, 0] = batch["action"]
    action_mask = torch.zeros(actions.shape[:2], dtype=torch.bool)
    action_mask[:, 0] = True
    log_likelihood = module.policy.log_likelihood({
        "obs": {"state": batch["obs_window"]}, "obs_mask": batch["window_mask"], "actions": actions,
        "action_mask": action_mask, **task})
    torch.manual_seed(0)
    if pcgrad:
        pcgrad_backward([actor_loss(log_likelihood[batch["task"] == t], weights[batch["task"] == t]) for t in (0, 1)],
                        parameters)
    else:
        actor_loss(log_likelihood, weights).backward()
    assert any(grad.abs().max() > 0 for grad in skipped)
    for grad, parameter in zip(skipped, parameters):
        torch.testing.assert_close(grad, parameter.grad, rtol=1e-4, atol=1e-6)


def test_policy_average_moves_toward_the_trained_weights_by_one_minus_its_decay(trained_policy):  # noqa: F811
    module = FineTuning(policy=str(trained_policy), benchmark=TASKS, policy_ema=0.75)
    module.setup("fit")
    parameter = next(module.policy.net.parameters())
    start = parameter.detach().clone()
    with torch.no_grad():
        parameter += 1.0
    module._average_policy()
    torch.testing.assert_close(next(module.averaged_policy.net.parameters()), start + 0.25)
    assert module.evaluated_policy is module.averaged_policy


def test_replay_windows_are_the_episode_frames_with_the_row_goal():
    goal = split_goal("reach-v3", "train", 0)
    env = MetaWorldEnv("reach-v3", goal=goal)
    obs, _ = env.reset()
    states, actions = [env.simulator_state()], np.random.default_rng(0).uniform(-1, 1, (12, 4))
    observations, successes = [obs["state"]], []
    for action in actions:
        obs, _, _, _, info = env.step(action)
        states.append(env.simulator_state())
        observations.append(obs["state"])
        successes.append(info["success"])
    buffer = ReplayBuffer(load_benchmark("metaworld:reach-v3"), 100, RelabelConfig(goal_strategy="future",
                                                                                  goal_relabels=1))
    buffer.add_episode(Episode("reach-v3", goal, np.array(observations), actions, np.array(successes),
                               np.array(states)))
    batch = buffer.sample(64, history=3)
    original = buffer.transitions()["obs"][:12]  # the episode's own rows, steps 0-11
    assert batch["obs_window"].shape == (64, 3, 39) and batch["window_mask"].shape == (64, 3)
    np.testing.assert_array_equal(batch["obs_window"][:, -1], batch["obs"])
    for row in range(64):
        step = batch["step"][row]
        np.testing.assert_array_equal(batch["window_mask"][row], [step >= 2, step >= 1, True])
        for k in (1, 2):
            frame = batch["obs_window"][row, -1 - k]
            expected = original[max(step - k, 0)]
            np.testing.assert_array_equal(frame[:-3], expected[:-3])
            np.testing.assert_allclose(frame[-3:], batch["obs"][row, -3:])  # the row's goal, relabeled or not


def test_metaworld_actor_augmentation_moves_what_its_experts_allow():
    """Reach's puck comes from another reach row in every frame; pick-place's goal from another pick-place row
    while the gripper is open; hand, puck and goal of reach and push move by one x, y offset per window,
    peg-insert-side's in x only while it approaches the peg; reach's hand and goal, and pick-place's while it
    holds the puck up, rise by one height; drawer-open and every other number stay as stored."""
    tasks = ["reach-v3", "push-v3", "drawer-open-v3"]
    task = np.array([0, 0, 0, 0, 1, 2])
    stored = np.random.default_rng(0).normal(size=(6, 2, 39)).astype(np.float32)
    stored[:, 1, 4:18] = stored[:, 0, 4:18]  # reach's puck never moves within a window

    def augmented(tasks=tasks, task=task, windows=stored, **options) -> np.ndarray:
        windows = windows.copy()
        ActorStateAugmentation(**options)(windows, task, tasks, np.random.default_rng(0))
        return windows

    shuffled = augmented(shuffle_ignored_objects=True)
    reach_pucks = {tuple(row) for row in stored[:4, -1, 4:18]}
    for row in range(4):
        assert tuple(shuffled[row, 0, 4:18]) in reach_pucks
        np.testing.assert_array_equal(shuffled[row, 0, 4:18], shuffled[row, 1, 4:18])
    assert not np.array_equal(shuffled[:4, :, 4:18], stored[:4, :, 4:18])
    np.testing.assert_array_equal(shuffled[4:], stored[4:])
    np.testing.assert_array_equal(np.delete(shuffled, np.r_[4:18, 22:36], axis=2),
                                  np.delete(stored, np.r_[4:18, 22:36], axis=2))

    # Pick-place rows with the gripper open (state[3] > 0.73) take another pick-place row's goal; closed ones
    # keep theirs, and nothing else changes.
    pick_tasks, pick_task = ["pick-place-v3", "drawer-open-v3"], np.array([0, 0, 0, 0, 0, 1])
    pick_windows = stored.copy()
    pick_windows[:, :, 36:39] = pick_windows[:, :1, 36:39]  # a window's goal is the same in all its frames
    pick_windows[:, -1, 3] = [1.0, 0.9, 1.0, 0.5, 0.4, 1.0]
    goal_shuffled = augmented(pick_tasks, pick_task, pick_windows, shuffle_ignored_goals=True)
    goals = goal_shuffled[..., 36:39]
    pick_goals = {tuple(row) for row in pick_windows[:5, -1, 36:39]}
    for row in range(3):
        assert tuple(goals[row, 0]) in pick_goals
        np.testing.assert_array_equal(goals[row, 0], goals[row, 1])
    assert not np.array_equal(goals[:3], pick_windows[:3, :, 36:39])
    np.testing.assert_array_equal(goal_shuffled[3:], pick_windows[3:])
    np.testing.assert_array_equal(goal_shuffled[..., :36], pick_windows[..., :36])

    moved = augmented(shift_xy=0.05)
    offset = moved - stored
    positions = [0, 4, 18, 22, 36]
    for row in range(5):
        xy = np.stack([offset[row, :, start:start + 2] for start in positions])
        np.testing.assert_allclose(xy, np.broadcast_to(xy[0, 0], xy.shape), atol=1e-6)
        assert 0 < np.abs(xy[0, 0]).max() <= 0.05
    np.testing.assert_array_equal(moved[5], stored[5])
    untouched = np.ones(39, dtype=bool)
    untouched[[start + axis for start in positions for axis in (0, 1)]] = False
    np.testing.assert_array_equal(moved[..., untouched], stored[..., untouched])

    # Reach's hand (now and a step earlier) and goal rise by one height in [0, 0.1] per window; its puck,
    # push and drawer-open stay.
    raised = augmented(shift_z=0.1)
    rise = raised - stored
    for row in range(4):
        np.testing.assert_allclose(rise[row, :, [2, 20, 38]], np.full((3, 2), rise[row, 0, 2]), atol=1e-6)
        assert 0 <= rise[row, 0, 2] <= 0.1
    assert len({round(float(rise[row, 0, 2]), 6) for row in range(4)}) == 4
    np.testing.assert_array_equal(np.delete(raised, [2, 20, 38], axis=2), np.delete(stored, [2, 20, 38], axis=2))
    np.testing.assert_array_equal(raised[4:], stored[4:])

    # Pick-place's hand, puck and goal rise only in windows that hold the puck off the table in every frame.
    held = stored.copy()
    held[:, :, 3], held[:, :, 6] = 0.5, 0.1  # gripper closed, puck 10 cm up
    held[1, 0, 3] = 0.9  # one frame with the gripper open
    held[2, 1, 6] = 0.02  # one frame with the puck on the table
    raised = augmented(pick_tasks, pick_task, held, shift_z=0.1)
    rise = raised - held
    for row in (0, 3, 4):
        np.testing.assert_allclose(rise[row, :, [2, 6, 20, 24, 38]], np.full((5, 2), rise[row, 0, 2]), atol=1e-6)
        assert 0 < rise[row, 0, 2] <= 0.1
    np.testing.assert_array_equal(np.delete(raised, [2, 6, 20, 24, 38], axis=2),
                                  np.delete(held, [2, 6, 20, 24, 38], axis=2))
    np.testing.assert_array_equal(raised[[1, 2, 5]], held[[1, 2, 5]])

    # Peg-insert-side moves in x as well as y while it approaches the resting peg (hand 4 cm or more away
    # from it), in y only once the hand is at the peg or the peg is off the table.
    peg_tasks, peg_task = ["peg-insert-side-v3", "drawer-open-v3"], np.array([0, 0, 0, 0, 0, 1])
    peg = np.zeros((6, 2, 39), np.float32)
    peg[:, :, 0:3], peg[:, :, 4:7] = (0.0, 0.6, 0.2), (0.1, 0.6, 0.03)  # hand 10 cm from the resting peg
    peg[1, 1, 0:3] = (0.1, 0.6, 0.045)  # at the peg in the last frame
    peg[2, :, 6] = 0.1  # the peg lifted
    peg[3, :, 0:3] = (0.1, 0.6, 0.1)  # right above the peg, 7 cm up: still approaching
    offset = augmented(peg_tasks, peg_task, peg, shift_xy=0.05) - peg
    assert all(offset[row, 0, 0] != 0 and offset[row, 0, 1] != 0 for row in (0, 3, 4))
    assert all(offset[row, 0, 0] == 0 and offset[row, 0, 1] != 0 for row in (1, 2))
    np.testing.assert_array_equal(offset[5], 0)


def test_every_finetune_config_instantiates(tmp_path):
    for config in sorted((ROOT / "configs").glob("finetune_*.yaml")):
        cli = finetune_cli(str(config), "runs/some_policy", "MT10", str(tmp_path))
        assert isinstance(cli.model, FineTuning) and cli.model.hparams.benchmark == "MT10", config
        assert cli.model.benchmark.tasks[0] == "reach-v3"
        assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")
        assert {type(logger).__name__ for logger in cli.trainer.loggers} == {"CSVLogger", "TensorBoardLogger"}
    overridden = finetune_cli(str(config), "runs/some_policy", "MT10", str(tmp_path),
                              overrides=["--model.total_env_steps", "1234"])
    assert overridden.model.hparams.total_env_steps == 1234


@pytest.mark.parametrize("policy, benchmark, config, message", [
    ("missing", "reach-v3", None, "not an exported policy"),
    (None, "reach-v3,fly-v3", None, "'fly-v3' is neither a benchmark"),
    (None, "reach-v3", "model: {eval_evry: 5}", "does not accept option 'eval_evry'"),
    (None, "reach-v3", "model: {eval_every: 0}", "model.eval_every: 0 is not a positive integer"),
    (None, "reach-v3", "model: {imitate: best}",
     "model.imitate: 'best' is not one of all, successful, ranked, advantage"),
    (None, "reach-v3", "model: {ranked_samples: 0}", "model.ranked_samples: 0 is not a positive integer"),
    (None, "reach-v3", "model: {task_sampling: tasks}",
     "model.task_sampling: 'tasks' is not one of rows, failures, online_failures"),
    (None, "reach-v3", "model: {exploration_noise: red}", "model.exploration_noise: 'red' is not one of white, pink"),
    (None, "reach-v3", "model: {relabel: {goal_relabels: 0}}",
     "model.relabel: RelabelConfig.goal_relabels: 0 is not a positive integer"),
    (None, "reach-v3", "model: {relabel: {goal_relabel: 3}}", "unexpected keyword argument 'goal_relabel'"),
    (None, "reach-v3", "model: {exploration_scale: wide}",
     "model.exploration_scale: 'wide' is not one of fixed, uniform"),
    (None, "reach-v3", "model: {solved_task_weight: 0}", "model.solved_task_weight: 0.0 is not a positive number"),
    (None, "reach-v3", "model: {policy_ema: 1}", "model.policy_ema: 1.0 is not in [0, 1)"),
    (None, "reach-v3", "model: {actor_augmentation: {class_path: "
     "lcbc.benchmarks.metaworld.augment.ActorStateAugmentation, init_args: {shift_z: -0.1}}}",
     "shift_z: -0.1 is not a non-negative number"),
    (None, "reach-v3", "model: {demo_goal_weights: {reach-v3: -1}}",
     "model.demo_goal_weights: reach-v3: -1.0 is not a non-negative number"),
    (None, "reach-v3", "model: {demo_goal_weights: {fly-v3: 0}}",
     "model.demo_goal_weights: 'fly-v3' is not a task of metaworld:reach-v3"),
    (None, "reach-v3,drawer-open-v3", "model: {reset_free: true}",
     "model.reset_free: no task of metaworld:reach-v3,drawer-open-v3 has the task that undoes it"),
    (None, "reach-v3", "model: {reset_free_steps: 0}", "model.reset_free_steps: 0 is not a positive integer"),
    (None, "reach-v3", "model: {goal_offset_scale: 0}", "model.goal_offset_scale: 0.0 is not a positive number"),
    (None, "drawer-open-v3", "model: {goal_offset_scale: 0.1}",
     "model.goal_offset_scale: no task of metaworld:drawer-open-v3 has a goal in its state"),
    (None, "reach-v3", "model: {reset_free_failures: -1}",
     "model.reset_free_failures: -1 is not a non-negative integer"),
    (None, "reach-v3", "model: {q_gradient: -1}", "model.q_gradient: -1.0 is not a non-negative number"),
    (None, "reach-v3", "model: {q_gradient: 1, pcgrad: true}", "model.q_gradient and model.pcgrad"),
])
def test_bad_inputs_exit_2_with_one_line(policy, benchmark, config, message, trained_policy,  # noqa: F811
                                         tmp_path, capsys):
    policy = str(tmp_path / policy) if policy else str(trained_policy)
    path = ROOT / "configs" / "finetune_mt10.yaml"
    if config:
        path = tmp_path / "config.yaml"
        path.write_text(config)
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--policy", policy, "--benchmark", benchmark, "--config", str(path),
              "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


def test_critics_see_how_far_each_rows_achieved_goal_is_from_its_goal(trained_policy):  # noqa: F811
    """Reach rows get (fingertip - goal) / scale beside the usual features, drawer rows (no goal interface)
    zeros; a row whose goal was rewritten to what it achieved (a hindsight copy) gets an offset of zero."""
    module = FineTuning(policy=str(trained_policy), benchmark=TASKS, goal_offset_scale=0.1)
    module.setup("fit")
    benchmark = module.benchmark
    states = []
    for task in module.tasks:
        env = benchmark.make_env(task)
        states.append(env.reset(seed=0, options={"goal": benchmark.goal(task, "train", 0)})[0]["state"])
        env.close()
    states = np.stack(states).astype(np.float32)
    task_id = torch.tensor([0, 1])
    task = {module.task_key: module.task_inputs[task_id]}
    features = module.inputs.state(torch.as_tensor(states), task, task_id)
    plain = FineTuning(policy=str(trained_policy), benchmark=TASKS)
    plain.setup("fit")
    assert features.shape[1] == sum(plain.inputs.dims()) - 4 + 3 == sum(module.inputs.dims()) - 4
    assert torch.equal(features[:, :-3], plain.inputs.state(torch.as_tensor(states), task, task_id))
    reach_offset = (benchmark.achieved_goal("reach-v3", states[0]) - states[0][-3:]) / 0.1
    assert np.linalg.norm(reach_offset) > 1.0  # the hand starts well away from reach's goal
    np.testing.assert_allclose(features[0, -3:].numpy(), reach_offset, rtol=1e-5)
    assert torch.equal(features[1, -3:], torch.zeros(3))
    hindsight = benchmark.with_goal(states[:1], benchmark.achieved_goal("reach-v3", states[:1]))
    reach = {key: value[:1] for key, value in task.items()}
    assert torch.allclose(module.inputs.state(torch.as_tensor(hindsight), reach, task_id[:1])[0, -3:], torch.zeros(3),
                          atol=1e-6)


@pytest.mark.parametrize("imitate, q_gradient", [("ranked", 0.0), ("successful", 0.0), ("successful", 2.5)])
def test_the_critic_decides_what_the_ranked_actor_learns(imitate, q_gradient, trained_policy):  # noqa: F811
    """Every stored action is a bad one and the critic values actions by their closeness to another: cloning
    the replay moves the actor toward the stored action; the ranked update, and cloning with the critics'
    gradient added (`q_gradient`), toward what the critic prefers."""
    torch.manual_seed(0)
    module = FineTuning(policy=str(trained_policy), benchmark=TASKS, imitate=imitate, beta=0.0, ranked_samples=16,
                        exploration_std=0.3, q_gradient=q_gradient)
    module.setup("fit")
    module.manual_backward = lambda loss: loss.backward()
    preferred, stored = torch.tensor([0.6, -0.6, 0.6, 0.0]), torch.tensor([-0.6, 0.6, -0.6, 0.0])
    module.critics.q_values = lambda state, action, target=False: torch.stack(
        [-(action - module.inputs.action(preferred[None])).square().sum(-1)] * 2)
    history, rows = module.policy.rt1_config.history, 64
    batch = {"obs_window": torch.randn(rows, history, 39), "window_mask": torch.ones(rows, history, dtype=torch.bool),
             # With the critics' term, no transition reached its goal: cloning alone would not move the actor.
             "action": stored.repeat(rows, 1), "reaches_goal": torch.full((rows,), not q_gradient),
             "task": torch.arange(rows) % 2, "source": torch.zeros(rows, dtype=torch.uint8),
             "relabel": torch.zeros(rows, dtype=torch.uint8)}
    task = {module.task_key: module.task_inputs[batch["task"]]}
    state = torch.zeros(rows, sum(module.inputs.dims()) - 4)

    def distance_to(action) -> float:
        decoded = module.policy.predict({"obs": module.inputs.observation(batch["obs_window"]),
                                         "obs_mask": batch["window_mask"], **task})[:, 0]
        return (decoded - action).norm(dim=-1).mean().item()

    before = distance_to(preferred), distance_to(stored)
    optimizer = torch.optim.Adam(module._actor_parameters(), lr=1e-3)
    for _ in range(40):
        optimizer.zero_grad()
        step = dict(batch)
        if imitate == "ranked":
            step["action"], metrics = module._ranked_actions(batch, task, state)
            assert metrics["actor/ranked_stored"] == 0.0 and metrics["actor/ranked_gain"] > 0
        module._actor_backward(step, task, torch.zeros(rows), state)
        optimizer.step()
    after = distance_to(preferred), distance_to(stored)
    if imitate == "ranked" or q_gradient:
        assert after[0] < 0.5 * before[0]
    else:
        assert after[1] < 0.5 * before[1] and after[0] > before[0]
