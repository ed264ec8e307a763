"""Multi-task RL fine-tuning of an exported policy as a LightningModule: `lcbc finetune`.

The policy's frozen task encoder turns each task's canonical instruction into the task vector, which
makes the tasks one MDP. The benchmark (`--benchmark`, any plug-in) gives the environments, the train
split's goals, its goal interface and, where it has one, its scorer. Every training step steps all
environments once (lcbc.rl.collector, noisy policy actions on the training goals), then makes one IQL
update (lcbc.rl.iql) on a replay batch that mixes demonstrations and online experience (lcbc.rl.replay).
The run ends at the environment-step budget; the fine-tuned policy is exported in the format it came in.

Lightning gives logging, checkpoints and resume as in behavior cloning. A checkpoint holds the replay
buffer and the collector's position, so a resumed run goes on at the saved environment step with the same
data; only the episodes in flight at the save are dropped.
"""

from __future__ import annotations

import copy
import math
import warnings
from argparse import ArgumentError
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lcbc.benchmark import load_benchmark
from lcbc.data.augment import ActorAugmentation
from lcbc.errors import UserError
from lcbc.evaluation.rollout import PolicyActor, rollout
from lcbc.policies.language_policy import LanguagePolicy
from lcbc.rl.collector import NOISE, NOISE_SCALE, TASK_COLLECTION, Collector
from lcbc.rl.iql import CriticInputs, Critics, IQLConfig, actor_loss, awr_weights, critic_loss, q_gradient_loss
from lcbc.rl.pcgrad import pcgrad_backward
from lcbc.rl.replay import DEMO, ORIGINAL, RelabelConfig, ReplayBuffer
from lcbc.training.cli import RunFolderCLI, check_checkpoint, config_error, quiet_lightning

# What the actor imitates: every replay transition, weighted by its advantage; or only those that reach
# their goal (original or relabeled), still advantage-weighted: failures are never cloned, and the
# hindsight relabels of failed episodes supply successes even on tasks the policy rarely solves (filtered
# self-imitation); or, at every replay state, the action the critics rank highest among the stored one, the
# policy's own and `ranked_samples` noisy variants of it ("ranked"): the critics, trained on every
# transition and relabel, zero rewards included, decide what the actor learns; or the transitions whose
# advantage is positive, from successful and failed episodes alike ("advantage", CRR's binary filter, Wang et
# al. 2020): the critics' judgement of each action replaces the episode's outcome.
IMITATE = ("all", "successful", "ranked", "advantage")
# How a batch divides among the tasks: every stored transition equally likely ("rows": tasks with goal and
# task relabels fill more of it), or each task in proportion to `solved_task_weight` plus the share of its
# recent training episodes that failed ("failures": updates go where the policy still fails), or that for the
# online part only, the demonstrations' part by rows ("online_failures": solved tasks keep their demos' share).
TASK_SAMPLING = ("rows", "failures", "online_failures")


class CollectionSteps:
    """The training "data": one item per collection step, as many as the environment-step budget needs.
    Its length gives the progress bar a total, and its state lets Lightning resume it mid-epoch."""

    def __init__(self, count: int):
        self.count, self.done = count, 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        while self.done < self.count:
            self.done += 1
            yield self.done - 1

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]


class FineTuning(L.LightningModule):
    """IQL fine-tuning of an exported LanguagePolicy on a benchmark's tasks. The YAML config
    (configs/finetune_mt10.yaml) documents every argument."""

    def __init__(self, policy: str, benchmark: str, demos: list[str] | None = None,
                 total_env_steps: int = 200_000, envs_per_task: int = 2, updates_per_step: int = 1,
                 max_episode_steps: int = 200,
                 exploration_std: float = 0.1, exploration_noise: str = "white", exploration_scale: str = "fixed",
                 reward: str = "sparse", relabel: dict[str, int | float | str] | None = None,
                 task_sampling: str = "rows", task_collection: str = "uniform", solved_task_weight: float = 0.25,
                 replay_capacity: int = 400_000, demo_fraction: float = 0.5, learning_starts: int = 2_000,
                 actor_starts: int = 10_000, batch_size: int = 256, gamma: float = 0.99, expectile: float = 0.9,
                 beta: float = 1.0, max_weight: float = 100.0, polyak: float = 0.005, critic_hidden: int = 256,
                 critic_layers: int = 2, critic_failed_relabels: bool = True, return_bound: bool = False,
                 goal_offset_scale: float | None = None, imitate: str = "all", ranked_samples: int = 8,
                 q_gradient: float = 0.0,
                 actor_lr: float = 1e-4, critic_lr: float = 3e-4, gradient_clip: float | None = 1.0,
                 pcgrad: bool = False,
                 actor_augmentation: ActorAugmentation | None = None, demo_goal_weights: dict[str, float] | None = None,
                 policy_ema: float = 0.0, eval_every: int = 25_000, eval_episodes: int = 5,
                 eval_envs_per_task: int = 1, reset_free: bool = False, reset_free_steps: int = 2000,
                 reset_free_failures: int = 0, seed: int = 0):
        super().__init__()
        self.actor_augmentation = actor_augmentation
        self.save_hyperparameters(ignore=["actor_augmentation"])  # the config keeps it; checkpoints hold plain data
        for name in ("total_env_steps", "envs_per_task", "updates_per_step", "max_episode_steps", "replay_capacity",
                     "batch_size", "eval_every", "eval_episodes", "eval_envs_per_task", "ranked_samples",
                     "reset_free_steps"):
            value = self.hparams[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name}: {value!r} is not a positive integer")
        choices = (("imitate", IMITATE), ("task_sampling", TASK_SAMPLING), ("task_collection", TASK_COLLECTION),
                   ("exploration_noise", NOISE), ("exploration_scale", NOISE_SCALE))
        for name, allowed in choices:
            if self.hparams[name] not in allowed:
                raise UserError(f"model.{name}: {self.hparams[name]!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= policy_ema < 1.0:
            raise UserError(f"model.policy_ema: {policy_ema!r} is not in [0, 1)")
        self.benchmark = load_benchmark(benchmark)
        for task, weight in (demo_goal_weights or {}).items():
            if task not in self.benchmark.tasks:
                raise UserError(f"model.demo_goal_weights: {task!r} is not a task of {self.benchmark.name}")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
                raise UserError(f"model.demo_goal_weights: {task}: {weight!r} is not a non-negative number")
        tasks = self.benchmark.tasks
        if reset_free and not any(self.benchmark.reverse(task) in tasks for task in tasks):
            raise UserError(f"model.reset_free: no task of {self.benchmark.name} has the task that undoes it among "
                            "the tasks (Benchmark.reverse), so nothing can practise without resets")
        if isinstance(reset_free_failures, bool) or not isinstance(reset_free_failures, int) or reset_free_failures < 0:
            raise UserError(f"model.reset_free_failures: {reset_free_failures!r} is not a non-negative integer")
        if isinstance(q_gradient, bool) or not isinstance(q_gradient, int | float) or not q_gradient >= 0:
            raise UserError(f"model.q_gradient: {q_gradient!r} is not a non-negative number")
        if q_gradient and pcgrad:
            raise UserError("model.q_gradient and model.pcgrad: the critics' term is not split by task; use one")
        if not solved_task_weight > 0:
            raise UserError(f"model.solved_task_weight: {solved_task_weight!r} is not a positive number")
        self.automatic_optimization = False
        self.iql = IQLConfig(gamma, expectile, beta, max_weight, polyak, critic_hidden, critic_layers,
                             absorbing_success=reward == "dense", return_bound=return_bound)
        try:
            self.relabel = RelabelConfig(reward=reward, **(relabel or {}))
        except (TypeError, ValueError) as error:  # an unknown key or a bad value
            raise UserError(f"model.relabel: {error}") from None
        self.env_steps = 0
        self.policy: LanguagePolicy | None = None

    # ---- building ------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.tasks = list(self.benchmark.tasks)
        self.policy = LanguagePolicy.from_pretrained(hp.policy)
        self.policy.task_encoder.requires_grad_(False)
        # The policy keeps the mode it was exported in (no dropout): its decoded actions are the ones
        # evaluation sees, and the advantage weights, not noise, decide what it learns.
        self.policy.eval()
        # What evaluation and export see: the trained policy, or with `policy_ema` a running average of its
        # weights (the collector keeps acting with the trained one).
        self.averaged_policy = copy.deepcopy(self.policy).requires_grad_(False) if hp.policy_ema else None
        # What the policy's task encoder takes for each task: the cached embedding of its canonical
        # instruction (language) or its task id (onehot); `self.task_key` names that batch entry.
        mode = self.policy.config["task_mode"]
        if mode == "language":
            self.task_key = "instruction_vectors"
            encoder = self.policy.task_encoder
            inputs = torch.stack([encoder.instruction_vector(self.benchmark.canonical_instruction(task))
                                  for task in self.tasks])
        elif mode == "onehot":
            self.task_key = "task_id"
            inputs = torch.tensor([self.policy.task_encoder.task_index(task) for task in self.tasks])
        else:
            raise UserError("fine-tuning conditions on tasks; this policy is goal-conditioned")
        self.register_buffer("task_inputs", inputs, persistent=False)
        self.register_buffer("demo_goal_weight", torch.tensor([(hp.demo_goal_weights or {}).get(task, 1.0)
                                                               for task in self.tasks]), persistent=False)
        self.replay = ReplayBuffer(self.benchmark, hp.replay_capacity, self.relabel, hp.demo_fraction, hp.seed,
                                   hp.gamma)
        self.inputs = CriticInputs(self.policy, self.benchmark, self.replay.columns["obs"][0][0], self.tasks,
                                   hp.goal_offset_scale)
        self.critics = Critics(*self.inputs.dims(), self.iql.hidden, self.iql.layers)
        self.collector = Collector(self.benchmark, hp.envs_per_task, hp.max_episode_steps, hp.exploration_std,
                                   hp.exploration_noise, hp.exploration_scale, hp.seed,
                                   task_collection=hp.task_collection, solved_task_weight=hp.solved_task_weight,
                                   reset_free=hp.reset_free, reset_free_steps=hp.reset_free_steps,
                                   reset_free_failures=hp.reset_free_failures)
        self.actor = PolicyActor(self.policy)

    def on_fit_start(self) -> None:
        """A fresh run's replay starts with the demonstrations (a resumed one has them in its checkpoint)."""
        if len(self.replay) == 0:
            for path in self.hparams.demos or []:
                self.replay.load_demos(path)

    def on_train_start(self) -> None:
        if self.env_steps >= self.hparams.total_env_steps:  # resumed with its budget already spent
            self.trainer.should_stop = True

    def train_dataloader(self) -> CollectionSteps:
        return CollectionSteps(math.ceil(self.hparams.total_env_steps / len(self.collector.envs)))

    def configure_optimizers(self):
        """One optimizer, one step per update (so Lightning's global step counts updates): the policy at a
        fine-tuning rate without weight decay, which would pull the behavior-cloned weights to zero, and
        the critics at the usual actor-critic rate."""
        critics = [p for p in self.critics.parameters() if p.requires_grad]
        return torch.optim.Adam([{"params": self._actor_parameters(), "lr": self.hparams.actor_lr},
                                 {"params": critics, "lr": self.hparams.critic_lr}])

    def _actor_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    # ---- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lcbc_finetune"] = _tensors({"env_steps": self.env_steps, "replay": self.replay.state_dict(),
                                                "collector": self.collector.state_dict()})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = _arrays(checkpoint["lcbc_finetune"])
        self.env_steps = state["env_steps"]
        self.replay.load_state_dict(state["replay"])
        self.collector.load_state_dict(state["collector"])

    # ---- one training step: collect, update, evaluate ------------------------------------------------

    def training_step(self, batch: int, batch_idx: int) -> None:
        hp = self.hparams
        if self.env_steps == 0:
            self._evaluate()  # the behavior-cloned policy's success: the baseline of the curve
        self.env_steps += self.collector.step(self.actor, self.replay)
        self.log("env_steps", float(self.env_steps), prog_bar=True)
        # Lightning writes step metrics every `log_every_n_steps` only; handing it the others costs more than
        # an update's critic step (about 1 ms a metric), so they are handed over on the steps it writes.
        written = self.trainer._logger_connector.should_update_logs
        if self.collector.recent_successes:
            self.log("collect/success", self.collector.success_rate, prog_bar=True)
            if written:
                self.log_dict({f"collect/{task}": 1.0 - rate
                               for task, rate in zip(self.tasks, self.collector.failure_rates())})
                if hp.reset_free:
                    self.log_dict({"collect/forced_resets": float(self.collector.forced_resets),
                                   "collect/stuck_resets": float(self.collector.stuck_resets)})
        if self.env_steps >= hp.learning_starts:
            for _ in range(hp.updates_per_step):
                metrics = self._update()
            if written:
                self.log_dict(metrics)
        done = self.env_steps >= hp.total_env_steps
        if done or self.env_steps // hp.eval_every > (self.env_steps - len(self.collector.envs)) // hp.eval_every:
            self._evaluate()
        if done:
            self.trainer.should_stop = True

    def _update(self) -> dict[str, torch.Tensor]:
        """One IQL update of the critics and, once `actor_starts` env steps are in, the actor."""
        hp = self.hparams
        weights = self.collector.task_weights() if hp.task_sampling != "rows" else None
        sample = self.replay.sample(hp.batch_size, history=self.policy.rt1_config.history, task_weights=weights,
                                    weigh_demos=hp.task_sampling == "failures")
        if self.actor_augmentation is not None:
            self.actor_augmentation(sample["obs_window"], sample["task"], self.tasks, self.replay.rng)
        batch = {key: torch.as_tensor(value) for key, value in sample.items()}
        task = {self.task_key: self.task_inputs[batch["task"]]}
        state = self.inputs.state(batch["obs"], task, batch["task"])
        next_state = self.inputs.state(batch["next_obs"], task, batch["task"])
        action = self.inputs.action(batch["action"])
        # Without `critic_failed_relabels`, relabels that do not reach their goal (zero return) are left out
        # of the critics' losses: an ablation of what the zero rewards teach them.
        trains = None if hp.critic_failed_relabels else (batch["relabel"] == ORIGINAL) | batch["reaches_goal"]
        loss, advantage, metrics = critic_loss(self.critics, self.iql, state, action, batch["reward"],
                                               batch["terminal"], next_state, trains, batch["return"])
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        metrics = {f"critic/{key}": value for key, value in metrics.items()}
        metrics.update(self._calibration(batch, state, action))
        metrics.update({"advantage/mean": advantage.mean(), "advantage/std": advantage.std(),
                        "advantage/max": advantage.max()})
        if self.env_steps >= hp.actor_starts:
            if hp.imitate == "ranked":
                batch["action"], ranked = self._ranked_actions(batch, task, state)
                metrics.update(ranked)
            metrics.update(self._actor_backward(batch, task, advantage, state))
        if hp.gradient_clip:
            for group in optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], hp.gradient_clip)
        optimizer.step()
        self.critics.update_target(self.iql.polyak)
        if self.averaged_policy is not None and self.env_steps >= hp.actor_starts:
            self._average_policy()
        return metrics

    @torch.no_grad()
    def _calibration(self, batch: dict, state: torch.Tensor, action: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the critics think the batch's own-goal online transitions are worth, beside the discounted
        return their episodes went on to collect: critics that rate failing tasks as nearly solved (trained
        mostly on hindsight successes) cannot tell the actor which of its actions fail."""
        own = (batch["relabel"] == ORIGINAL) & (batch["source"] != DEMO)
        if not own.any():
            return {}
        q = self.critics.q_values(state[own], action[own], target=True).min(0).values
        return {"critic/q_own_goal": q.mean(), "critic/return_own_goal": batch["return"][own].mean()}

    @torch.no_grad()
    def _average_policy(self) -> None:
        """averaged <- policy_ema * averaged + (1 - policy_ema) * policy, after every actor update: the
        advantage-weighted updates of a small, shifting replay make the policy's success swing by several
        points between evaluations; the average follows its trend without the swings."""
        for averaged, trained in zip(self.averaged_policy.parameters(), self.policy.parameters()):
            averaged.lerp_(trained, 1.0 - self.hparams.policy_ema)

    @torch.no_grad()
    def _ranked_actions(self, batch: dict, task: dict, state: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """For each replay state, the action the target critics value highest (min of the twin Qs) among the
        stored action, the policy's decoded action and `ranked_samples` of it with exploration noise (the
        distribution the replay's online actions come from, so the critics have seen such actions)."""
        policy_action = self.policy.predict({"obs": self.inputs.observation(batch["obs_window"]),
                                             "obs_mask": batch["window_mask"], **task})[:, 0]
        noise = torch.randn(len(policy_action), self.hparams.ranked_samples, policy_action.shape[-1])
        low, high = self.policy.action_tokenizer.low, self.policy.action_tokenizer.high
        candidates = torch.cat([batch["action"][:, None], policy_action[:, None],
                                policy_action[:, None] + self.hparams.exploration_std * noise], dim=1)
        candidates = torch.minimum(torch.maximum(candidates, low), high)
        count = candidates.shape[1]
        values = self.critics.q_values(state.repeat_interleave(count, 0),
                                       self.inputs.action(candidates.flatten(0, 1)), target=True).min(0).values
        values = values.view(-1, count)
        best = values.argmax(1)
        chosen = candidates[torch.arange(len(best)), best]
        return chosen, {"actor/ranked_stored": (best == 0).float().mean(),
                        "actor/ranked_policy": (best == 1).float().mean(),
                        "actor/ranked_gain": (values.max(1).values - values[:, 0]).mean()}

    def _actor_backward(self, batch: dict, task: dict, advantage: torch.Tensor,
                        state: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gradients of the advantage-weighted log-likelihood of the batch's actions (PCGrad: per task): the
        replay's, or under `imitate: ranked` the critics' choice; with `imitate: successful`, of the transitions
        that reach their goal only, with `imitate: advantage` of those with a positive advantage;
        `demo_goal_weights` scales the named tasks' demonstration rows that keep their own goal. With
        `q_gradient`, plus the critics' term on every row (`_q_gradient_loss`)."""
        hp = self.hparams
        weights = awr_weights(advantage, self.iql.beta, self.iql.max_weight)
        if hp.imitate == "successful":
            weights = weights * batch["reaches_goal"]
        elif hp.imitate == "advantage":
            weights = weights * (advantage > 0)
        own_goal_demo = (batch["source"] == DEMO) & (batch["relabel"] == ORIGINAL)
        weights = torch.where(own_goal_demo, weights * self.demo_goal_weight[batch["task"]], weights)
        metrics = {"actor/weight_mean": weights.mean(), "actor/imitated": (weights > 0).float().mean(),
                   "actor/weight_clipped": (weights >= self.iql.max_weight * (1 - 1e-6)).float().mean()}
        # RT-1 runs on the rows with a weight only: a zero-weight row adds nothing to the loss or its gradient,
        # and under `imitate: successful` a fifth to a half of a batch has none (the actor is 70% of an update).
        if hp.q_gradient:
            loss, q_metrics = self._q_gradient_loss(batch, task, state, weights)
            self.manual_backward(loss)
            return {"actor/loss": loss.detach(), **metrics, **q_metrics}
        rows = torch.nonzero(weights > 0).squeeze(1)
        if len(rows) == 0:
            return metrics
        if hp.pcgrad:
            # One RT-1 pass per task, on its own rows: a task's backward then runs through those rows only,
            # where one pass over the batch would run the whole batch's backward once per task (2.2x slower).
            tasks = torch.unique(batch["task"])
            losses = []
            for t in tasks:
                task_rows = rows[batch["task"][rows] == t]
                if len(task_rows):  # each task's loss is the mean over all its rows, the unimitated weighing 0
                    losses.append(actor_loss(self._log_likelihood(batch, task, task_rows), weights[task_rows])
                                  * len(task_rows) / (batch["task"] == t).sum())
            # A task with nothing to imitate adds a zero gradient to the mean over all tasks, which PCGrad
            # leaves unprojected and projects nothing off: the same as scaling the others' mean.
            pcgrad_backward([loss * len(losses) / len(tasks) for loss in losses], self._actor_parameters())
            loss = torch.stack(losses).sum() / len(tasks)
        else:
            log_likelihood = torch.zeros(len(weights)).index_put((rows,), self._log_likelihood(batch, task, rows))
            loss = actor_loss(log_likelihood, weights)
            self.manual_backward(loss)
        return {"actor/loss": loss.detach(), **metrics}

    def _q_gradient_loss(self, batch: dict, task: dict, state: torch.Tensor,
                         weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted cloning loss plus iql.q_gradient_loss of min Q(s, z, pi(s, z)) over the whole batch:
        pi(s, z) is the policy's mean action under its bin probabilities, so the critics' gradient reaches the
        actor at every replay state, failed ones and zero-reward relabels included, and can move its most
        likely bin anywhere. The critics are constants here: only the actor moves."""
        rows = torch.arange(len(weights))
        policy_batch = self._policy_batch(batch, task, rows)
        logits = self.policy.logits(policy_batch)
        log_likelihood = self.policy.log_likelihood(policy_batch, logits)
        taken = self.inputs.action(self.policy.action_tokenizer.expectation(logits[:, 0]))
        self.critics.requires_grad_(False)
        try:
            q = self.critics.q_values(state, taken).min(0).values
        finally:
            self.critics.requires_grad_(True)
        loss = actor_loss(log_likelihood, weights) + q_gradient_loss(q, self.hparams.q_gradient)
        return loss, {"actor/q_policy_action": q.mean().detach()}

    def _log_likelihood(self, batch: dict, task: dict, rows: torch.Tensor) -> torch.Tensor:
        """RT-1's log-likelihood of the replay's action at these rows of the batch, as their chunk's first step."""
        return self.policy.log_likelihood(self._policy_batch(batch, task, rows))

    def _policy_batch(self, batch: dict, task: dict, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The policy's view of these rows of the batch, the replay's action as their chunk's first step."""
        chunk = self.policy.rt1_config.action_chunk
        actions = torch.zeros(len(rows), chunk, batch["action"].shape[-1])
        actions[:, 0] = batch["action"][rows]  # later chunk steps are masked out
        action_mask = torch.zeros(len(rows), chunk, dtype=torch.bool)
        action_mask[:, 0] = True
        return {"obs": self.inputs.observation(batch["obs_window"][rows]), "obs_mask": batch["window_mask"][rows],
                "actions": actions, "action_mask": action_mask, **{key: value[rows] for key, value in task.items()}}

    def _evaluate(self) -> None:
        """Success on the validation goals with the decoded actions, no noise. A copy of the policy runs it,
        so the collector's per-environment observation history stays intact."""
        hp = self.hparams
        result = rollout(PolicyActor(copy.deepcopy(self.evaluated_policy)), self.benchmark, hp.eval_episodes,
                         split="validation", envs_per_task=hp.eval_envs_per_task, progress=False)
        rates = {f"eval/{task}": result.success_rate(task) for task in self.tasks}
        rates["eval/success"] = float(np.mean(list(rates.values())))
        rates["env_steps"] = float(self.env_steps)
        for logger in self.loggers:  # written now: step metrics only reach loggers every log_every_n_steps
            logger.log_metrics(rates, step=self.global_step)
        self.log("eval/success", rates["eval/success"], prog_bar=True, logger=False)

    @property
    def evaluated_policy(self) -> LanguagePolicy:
        return self.policy if self.averaged_policy is None else self.averaged_policy

    def export_policy(self, directory: str | Path) -> Path:
        return self.evaluated_policy.save_pretrained(directory)


def _tensors(tree):
    """numpy arrays -> tensors, through nested dicts: a checkpoint then loads with torch's weights-only
    unpickler, which refuses numpy arrays."""
    if isinstance(tree, dict):
        return {key: _tensors(value) for key, value in tree.items()}
    return torch.from_numpy(np.ascontiguousarray(tree)) if isinstance(tree, np.ndarray) else tree


def _arrays(tree):
    if isinstance(tree, dict):
        return {key: _arrays(value) for key, value in tree.items()}
    return tree.numpy() if isinstance(tree, torch.Tensor) else tree


# ---- the command ------------------------------------------------------------------------------------


class FinetuneCLI(RunFolderCLI):
    """LightningCLI over FineTuning, for a run folder: checkpoints/, logs and the exported policy/."""


def finetune_cli(config: str, policy: str, benchmark: str, out: str | None = None,
                 overrides: list[str] | None = None) -> FinetuneCLI:
    """The configured module and trainer (nothing runs yet); `overrides` are LightningCLI arguments."""
    args = ["--config", config, "--model.policy", policy, "--model.benchmark", benchmark]
    if out:
        args += ["--trainer.default_root_dir", out]
    args += overrides or []
    # Lightning warnings that do not apply: these arguments are lcbc's translation of its own command line,
    # the policy runs in eval mode on purpose (see FineTuning.setup), and a checkpoint is meant to hold the
    # state after an update, the one to resume from.
    quiet_lightning()
    for message in ("LightningCLI's args parameter", r"Found \d+ module\(s\) in eval mode",
                    "Using ModelCheckpoint with manual optimization"):
        warnings.filterwarnings("ignore", message=message)
    try:
        # The environment-step budget ends the run (FineTuning.training_step), not a number of epochs.
        return FinetuneCLI(FineTuning, args=args, run=False, save_config_kwargs={"overwrite": True},
                           auto_configure_optimizers=False, trainer_defaults={"max_epochs": -1},
                           parser_kwargs={"exit_on_error": False})
    except (ArgumentError, MisconfigurationException, ValueError) as error:  # a config that cannot run
        raise config_error(config, error) from None


def run_finetune(config: str, policy: str, benchmark: str, out: str | None = None, resume: bool = False,
                 overrides: list[str] | None = None) -> Path:
    """Fine-tune, then export the policy to <run folder>/policy; `resume` continues from checkpoints/last.ckpt."""
    torch.set_num_threads(1)  # small batched forward passes and MLPs: one thread is fastest on few cores
    load_benchmark(benchmark)  # a bad benchmark name or policy folder fails before anything is built
    LanguagePolicy.from_pretrained(policy)
    if not Path(config).is_file():
        raise UserError(f"{config}: no such config file")
    cli = finetune_cli(config, policy, benchmark, out, overrides)
    root = Path(cli.trainer.default_root_dir)
    checkpoint = root / "checkpoints" / "last.ckpt"
    if resume and not checkpoint.is_file():
        raise UserError(f"{checkpoint}: no checkpoint to resume from")
    if resume:
        check_checkpoint(checkpoint)
    # Checkpoints hold tensors and plain data only, so they load without unpickling code.
    cli.trainer.fit(cli.model, ckpt_path=str(checkpoint) if resume else None, weights_only=True)
    cli.trainer.save_checkpoint(checkpoint, weights_only=False)  # the end state, for --resume with a larger budget
    return cli.model.export_policy(root / "policy")
