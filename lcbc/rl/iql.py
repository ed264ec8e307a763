"""Implicit Q-learning (IQL) whose actor is the RT-1 policy, in one file.

Kostrikov et al. 2021, "Offline Reinforcement Learning with Implicit Q-Learning", used for fine-tuning
(offline-to-online): the replay mixes demonstrations and the policy's own experience. IQL never asks the
critic about actions the data does not contain, which is what keeps fine-tuning from a behavior-cloned
policy stable, and its actor update is a weighted behavior-cloning loss, so the RT-1 policy trains exactly
as it did in BC (cross-entropy of action bins) with each transition weighted by how good its action was.

Read top to bottom. Notation: s state, z task vector, a action, r reward, d terminal, s' next state.

1. ``CriticInputs`` -- what the critics see: the policy's normalized state and its frozen task vector (and
                       with `goal_offset_scale` how far each row's achieved goal is from its goal).
2. ``Critics``      -- twin Q(s, z, a), V(s, z), and a Polyak-averaged copy of the Q networks.
3. ``expectile_loss`` -- V regresses onto min_i Qtarget_i(s, a) with an asymmetric square (expectile tau):
                       with tau > 0.5 V approaches the best in-distribution action's value, not the mean.
4. ``critic_loss``  -- L_V = E[|tau - 1(u < 0)| u^2], u = min_i Qtarget_i(s, a) - V(s)
                       L_Q = sum_i E[(r + gamma (1 - d) V(s') + gamma d G - Q_i(s, a))^2]
                       G = 0, or r / (1 - gamma) with `absorbing_success` (see IQLConfig); with
                       `return_bound` the target is at least the transition's own discounted return
5. ``awr_weights``  -- w = min(exp(beta A / std(A)), max_weight), A = min_i Qtarget_i(s, a) - V(s), std over
                       the batch: beta is a temperature in units of the batch's advantage spread
6. ``actor_loss``   -- L_pi = -E[w log pi(a | s, z)] (per task when PCGrad takes the tasks apart);
   ``q_gradient_loss`` -- with `q_gradient` alpha, plus -alpha E[Q(s, z, pi(s, z))] / E|Q| (TD3+BC): the
                       critics' gradient at the policy's own action, on every row.
7. ``Critics.update_target`` -- Qtarget <- (1 - polyak) Qtarget + polyak Q after every update.

V(s') is the TD target, so no target V is needed; the Polyak-averaged Q networks give V and the
advantage a slowly moving regression target, as in the paper.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from lcbc.errors import UserError


@dataclass(frozen=True)
class IQLConfig:
    gamma: float = 0.99  # discount
    expectile: float = 0.9  # tau of the V regression; 0.5 = mean (SARSA-like), -> 1 = max over data actions
    beta: float = 1.0  # inverse temperature of the advantage weights, per batch standard deviation of A
    max_weight: float = 100.0  # clip of the weights, so one lucky transition cannot dominate
    polyak: float = 0.005  # rate of the target Q networks
    hidden: int = 256  # critic MLP width
    layers: int = 2  # critic MLP hidden layers
    # A terminal success keeps its reward forever after: its return is r / (1 - gamma). Needed with dense
    # rewards, where an episode that ends at success would otherwise be worth less than one that hovers
    # next to the goal collecting nearly the same reward every step; sparse rewards end at their only 1.
    absorbing_success: bool = False
    # Q's target is at least the return the stored episode went on to collect from the transition (a
    # Monte-Carlo lower bound, as Cal-QL bounds by a reference policy's return): a sparse success reaches
    # every earlier step of its episode at once instead of one TD backup per update.
    return_bound: bool = False


# ---------------------------------------------------------------------------------------------------------
# 1. What the critics see
# ---------------------------------------------------------------------------------------------------------


class CriticInputs:
    """Builds critic inputs with the policy's own pieces: its normalizer for the state, its frozen task
    encoder for the task vector, its action bounds to scale actions to [-1, 1]. The critics thus share the
    policy's view of the world and need no statistics of their own. The benchmark's `state_observation`
    rebuilds the policy's low-dimensional keys from the flat (state_dim,) states the replay stores.

    `goal_offset_scale`: the critics also see, for tasks of the benchmark's goal interface, the achieved
    goal minus the goal (divided by the scale, zero for other tasks), which is otherwise a few of several
    hundred inputs to work out. What it changed on MT10 (little): docs/RESULTS_LOG.md, nineteenth try."""

    def __init__(self, policy, benchmark, state_dim: int, tasks: list[str], goal_offset_scale: float | None = None):
        self.policy, self.benchmark, self.tasks = policy, benchmark, tasks
        available = set(benchmark.state_observation(np.zeros((1, state_dim))))
        unsupported = [key for key in policy.config["low_dim_keys"] if key not in available]
        if policy.config["image_keys"] or unsupported or not policy.config["low_dim_keys"]:
            raise UserError("fine-tuning needs a state-only policy whose observation keys the benchmark rebuilds "
                            f"from its states ({', '.join(sorted(available)) or 'state'}); this one reads "
                            f"{', '.join(policy.config['low_dim_keys'] + policy.config['image_keys'])}")
        goal_tasks = [i for i, task in enumerate(tasks) if task in benchmark.goal_tasks]
        if goal_offset_scale is not None and not goal_tasks:
            raise UserError(f"model.goal_offset_scale: no task of {benchmark.name} has a goal in its state "
                            "(Benchmark.goal_tasks); leave it null")
        if goal_offset_scale is not None and not goal_offset_scale > 0:
            raise UserError(f"model.goal_offset_scale: {goal_offset_scale!r} is not a positive number")
        self.goal_offset_scale, self.goal_task_ids = goal_offset_scale, goal_tasks

    def observation(self, state: Tensor) -> dict[str, Tensor]:
        """The policy's observation dict from flat states (..., D)."""
        observation = self.benchmark.state_observation(state)
        return {key: observation[key] for key in self.policy.config["low_dim_keys"]}

    @torch.no_grad()
    def state(self, state: Tensor, task: dict[str, Tensor], task_id: Tensor) -> Tensor:
        """(B, D) states, the task inputs of `policy.task_vector` and the (B,) task indices (into `tasks`)
        -> (B, state features + task dim [+ goal dim])."""
        features = [self.policy.normalizer(self.observation(state)), self.policy.task_vector(task)]
        if self.goal_offset_scale is not None:
            features.append(self.goal_offset(state, task_id))
        return torch.cat(features, dim=-1)

    def goal_offset(self, state: Tensor, task_id: Tensor) -> Tensor:
        """(B, goal_dim): achieved goal minus goal over `goal_offset_scale` for goal-interface tasks, else 0."""
        offset = torch.zeros(len(state), self.benchmark.goal_dim)
        states = state.numpy()
        for i in self.goal_task_ids:
            rows = (task_id == i).numpy()
            if rows.any():
                achieved = self.benchmark.achieved_goal(self.tasks[i], states[rows])
                offset[rows] = torch.as_tensor(achieved - self.benchmark.desired_goal(states[rows]),
                                               dtype=offset.dtype)
        return offset / self.goal_offset_scale

    def action(self, action: Tensor) -> Tensor:
        """Environment actions (B, A) -> [-1, 1] within the policy's action bounds (clipped to them)."""
        low, high = self.policy.action_tokenizer.low, self.policy.action_tokenizer.high
        return (torch.minimum(torch.maximum(action, low), high) - low) / (high - low).clamp_min(1e-6) * 2 - 1

    def dims(self) -> tuple[int, int]:
        """(state + task [+ goal offset] features, action dims)."""
        rt1 = self.policy.rt1_config
        offset = self.benchmark.goal_dim if self.goal_offset_scale is not None else 0
        return rt1.state_dim + self.policy.task_encoder.dim + offset, rt1.action_dim


# ---------------------------------------------------------------------------------------------------------
# 2. Critics
# ---------------------------------------------------------------------------------------------------------


def mlp(inputs: int, hidden: int, layers: int) -> nn.Sequential:
    """Linear-LayerNorm-ReLU blocks and a scalar head. LayerNorm keeps Q bounded off the data, which
    makes critics trained on a small, shifting replay much more stable (Ball et al. 2023, RLPD)."""
    blocks, width = [], inputs
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*blocks, nn.Linear(width, 1))


class Critics(nn.Module):
    """Twin Q networks, their Polyak-averaged targets, and V. Inputs are `CriticInputs` features."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.q = nn.ModuleList(mlp(state_dim + action_dim, hidden, layers) for _ in range(2))
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.v = mlp(state_dim, hidden, layers)

    def q_values(self, state: Tensor, action: Tensor, target: bool = False) -> Tensor:
        """(2, B): both Q networks' (or their targets') values."""
        x = torch.cat([state, action], dim=-1)
        return torch.stack([q(x).squeeze(-1) for q in (self.q_target if target else self.q)])

    def value(self, state: Tensor) -> Tensor:
        return self.v(state).squeeze(-1)

    @torch.no_grad()
    def update_target(self, polyak: float) -> None:
        for target, online in zip(self.q_target.parameters(), self.q.parameters()):
            target.lerp_(online, polyak)


# ---------------------------------------------------------------------------------------------------------
# 3-5. The losses
# ---------------------------------------------------------------------------------------------------------


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """mean(|tau - 1(diff < 0)| * diff^2): an asymmetric square whose minimizer over a constant V is the
    tau-expectile of the targets (diff = target - V; tau = 0.5 gives half the mean squared error)."""
    weight = torch.where(diff < 0, 1 - expectile, expectile)
    return (weight * diff.square()).mean()


def critic_loss(critics: Critics, config: IQLConfig, state: Tensor, action: Tensor, reward: Tensor,
                terminal: Tensor, next_state: Tensor, trains: Tensor | None = None,
                returns: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """IQL's V and Q losses (summed: they train disjoint networks) over the rows `trains` marks (all when
    None), and the advantage min_i Qtarget_i(s, a) - V(s) (detached) of every row, which weights the actor.
    `returns` (each row's discounted return in its episode) bound Q's target from below with `return_bound`."""
    with torch.no_grad():
        target_q = critics.q_values(state, action, target=True).min(0).values
        after = torch.where(terminal, reward / (1 - config.gamma) if config.absorbing_success else 0.0,
                            critics.value(next_state))
        td_target = reward + config.gamma * after
        if config.return_bound:
            if returns is None:
                raise ValueError("critic_loss: return_bound needs the rows' returns")
            bound_active = (returns > td_target).float().mean()
            td_target = torch.maximum(td_target, returns)
    value = critics.value(state)
    rows = slice(None) if trains is None else trains
    value_loss = expectile_loss((target_q - value)[rows], config.expectile)
    q = critics.q_values(state, action)
    q_loss = (q - td_target)[:, rows].square().mean(1).sum()
    advantage = (target_q - value).detach()
    metrics = {"value_loss": value_loss.detach(), "q_loss": q_loss.detach(), "q": q.mean().detach(),
               "v": value.mean().detach()}
    if config.return_bound:
        metrics["bound_active"] = bound_active
    return value_loss + q_loss, advantage, metrics


def awr_weights(advantage: Tensor, beta: float, max_weight: float) -> Tensor:
    """exp(beta * advantage / std(advantage)), clipped at max_weight (in log space: no overflow).

    Sparse-reward advantages are tiny and shrink or grow as the critics learn (|A| ~ 0.02 after cloning
    on MT10, so a fixed exp(10 A) stays ~1 and the update is plain cloning of everything in the replay).
    Dividing by the batch's spread keeps the preference between a batch's better and worse actions at the
    same strength throughout training, whatever the reward scale (as AWR normalizes its advantages)."""
    scaled = beta * advantage / advantage.std().clamp_min(1e-6)
    return torch.exp(torch.clamp(scaled, max=math.log(max_weight)))


# ---------------------------------------------------------------------------------------------------------
# 6. The actor
# ---------------------------------------------------------------------------------------------------------


def actor_loss(log_likelihood: Tensor, weights: Tensor) -> Tensor:
    """Advantage-weighted behavior cloning: -mean(w * log pi(a | s, z)). The weights are constants: the
    actor moves toward the data's better actions and never differentiates through the critics."""
    return -(weights.detach() * log_likelihood).mean()


def q_gradient_loss(q: Tensor, alpha: float) -> Tensor:
    """TD3+BC's actor term (Fujimoto and Gu 2021): -alpha * mean(Q) / mean(|Q|), Q the critics' value of the
    policy's own actions (differentiable in them, the critics held fixed). Dividing by the batch's mean |Q|
    keeps its balance with the cloning loss whatever the reward scale."""
    return -alpha * (q / q.abs().mean().detach().clamp_min(1e-6)).mean()
