"""Gradient surgery (PCGrad, Yu et al. 2020, "Gradient Surgery for Multi-Task Learning").

Per-task gradients of a shared network often conflict (negative dot product): a plain sum lets one
task's update undo another's. PCGrad removes, from each task's gradient, its component along every
other task's gradient that it conflicts with, then averages. `gradient_cosines` measures the conflict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def pcgrad(grads: list[Tensor], generator: torch.Generator | None = None) -> Tensor:
    """Mean of the projected flat gradients (each (P,)).

    Each task's gradient is projected, in a random order drawn from `generator`, off the normal plane of
    every other task's original gradient it conflicts with. With three or more tasks the order matters (only
    the last projection is sure to leave no conflict), so the paper shuffles it rather than favor fixed tasks.
    """
    projected = []
    for i, grad in enumerate(grads):
        grad = grad.clone()
        others = [j for j in range(len(grads)) if j != i]
        for k in torch.randperm(len(others), generator=generator).tolist():
            other = grads[others[k]]
            dot = torch.dot(grad, other)
            # Only conflicts (dot < 0) are projected; a zero-norm `other` has dot 0, and the floor keeps 0/0 out.
            grad -= dot.clamp(max=0) / other.square().sum().clamp_min(torch.finfo(other.dtype).tiny) * other
        projected.append(grad)
    return torch.stack(projected).mean(0)


def pcgrad_backward(losses: list[Tensor], params: list[nn.Parameter], generator: torch.Generator | None = None
                    ) -> None:
    """Like `torch.stack(losses).mean().backward()`, with gradient surgery on the shared parameters.

    Rule: surgery applies to the parameters every task's loss uses; a parameter that only some tasks use gets
    the plain mean over all tasks (0 for the tasks that do not use it), exactly what backward of the mean
    loss gives it, so surgery only changes the shared update. A parameter no task uses is left untouched.
    The result is added to `param.grad`, as backward does.
    """
    per_task = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    by_param = list(zip(*per_task))  # by_param[i][t]: task t's gradient of params[i], None if unused
    shared = [i for i, grads in enumerate(by_param) if all(g is not None for g in grads)]
    update = {}
    if shared:
        flat = [torch.cat([grads[i].reshape(-1) for i in shared]) for grads in per_task]
        pieces = pcgrad(flat, generator).split([params[i].numel() for i in shared])
        update = {i: piece.view_as(params[i]) for i, piece in zip(shared, pieces)}
    for i, grads in enumerate(by_param):
        used = [g for g in grads if g is not None]
        if i not in update and used:
            update[i] = torch.stack(used).sum(0) / len(losses)
    with torch.no_grad():
        for i, grad in update.items():
            if params[i].grad is None:
                params[i].grad = grad.clone()
            else:
                params[i].grad += grad


def gradient_cosines(grads: list[Tensor]) -> Tensor:
    """(T, T) cosine similarity of flat per-task gradients; a zero gradient has cosine 0 with everything."""
    stacked = torch.stack(grads)
    unit = stacked / stacked.norm(dim=1, keepdim=True).clamp_min(torch.finfo(stacked.dtype).tiny)
    return (unit @ unit.T).clamp(-1, 1)


def split_by_task(batch: dict) -> dict[int, dict]:
    """Task id -> the rows of `batch` with that `task_id` (tensors sliced, dicts of tensors one level deep),
    so each task's loss is `policy(sub_batch)[0]`."""
    result = {}
    for task in torch.unique(batch["task_id"]).tolist():
        rows = batch["task_id"] == task
        result[task] = {key: {k: v[rows] for k, v in value.items()} if isinstance(value, dict) else value[rows]
                        for key, value in batch.items()}
    return result
