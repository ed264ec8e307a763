"""How much the tasks of a trained policy pull its weights in opposing directions.

The diagnostic behind gradient surgery: the cosine similarity of per-task behavior-cloning gradients over
the policy's trainable parameters, on windows of a demonstration file. Negative entries are the conflicts
that PCGrad would project away.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lcbc.data.dataset import DemoDataset
from lcbc.errors import UserError
from lcbc.policies.language_policy import LanguagePolicy
from lcbc.rl.pcgrad import gradient_cosines


def _policy_dataset(policy: LanguagePolicy, data_path: str) -> DemoDataset:
    """The file's windows as the policy sees them, with task and instruction ids in the policy's vocabulary."""
    config = policy.config
    dataset = DemoDataset(data_path, obs_keys=config["low_dim_keys"] + config["image_keys"],
                          history=policy.rt1_config.history, action_chunk=policy.rt1_config.action_chunk,
                          goal="final" if config["task_mode"] == "goal" else "none",
                          tasks=config["tasks"], instructions=config["instructions"])
    unknown = dataset.tasks[len(config["tasks"]):]  # DemoDataset appends tasks missing from the vocabulary
    if unknown:
        raise UserError(f"{data_path}: task {unknown[0]!r} is not one this policy was trained on "
                        f"(it knows {', '.join(config['tasks'])})")
    if config["task_mode"] == "language":
        dataset.require_instructions()
    return dataset


def gradient_conflicts(policy: LanguagePolicy, data_path: str, batches: int = 4, batch_size: int = 64, seed: int = 0
                       ) -> tuple[list[str], torch.Tensor]:
    """(tasks in the file, (T, T) cosine matrix) of per-task gradients, each averaged over `batches` batches of
    `batch_size` windows of that task, so every task weighs the same whatever its share of the file.

    A goal-conditioned policy is given each demo's final state as its goal. An instruction the policy was
    not trained on is embedded by its text encoder, as `act` does.
    """
    if batches < 1 or batch_size < 1:
        raise UserError(f"batches ({batches}) and batch size ({batch_size}) must be at least 1")
    dataset = _policy_dataset(policy, data_path)
    params = [p for p in policy.parameters() if p.requires_grad]
    rng = np.random.default_rng(seed)
    step_task = dataset.demo_task[dataset.step_demo]
    task_ids = np.unique(step_task)
    vectors = None
    if policy.config["task_mode"] == "language":
        vectors = torch.stack([policy.task_encoder.instruction_vector(text) for text in dataset.instructions])
    gradients = []
    for task in task_ids:
        steps = np.flatnonzero(step_task == task)
        total = torch.zeros(sum(p.numel() for p in params))
        for _ in range(batches):
            batch = dataset.__getitems__(rng.choice(steps, batch_size, replace=len(steps) < batch_size))
            if vectors is not None:
                batch["instruction_vectors"] = vectors[batch["instruction_id"]]
            grads = torch.autograd.grad(policy(batch)[0], params, allow_unused=True)
            total += torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
        gradients.append(total / batches)
    return [dataset.tasks[t] for t in task_ids], gradient_cosines(gradients)


def conflicts_markdown(tasks: list[str], matrix: torch.Tensor) -> str:
    lines = ["| task | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    lines += [f"| {task} | " + " | ".join(f"{value:+.2f}" for value in row) + " |"
              for task, row in zip(tasks, matrix.tolist())]
    return "\n".join(lines) + "\n"


def conflicts_heatmap(tasks: list[str], matrix: torch.Tensor, path: Path) -> None:
    from lcbc.evaluation.report import pyplot

    plt = pyplot()
    size = max(4.0, 0.7 * len(tasks) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix.numpy(), cmap="RdBu", vmin=-1, vmax=1)  # fixed range: colors compare across runs
    labels = [task.removesuffix("-v3") for task in tasks]
    ax.set_xticks(range(len(tasks)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), labels)
    for (row, column), value in np.ndenumerate(matrix.numpy()):
        ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="cosine of task gradients")
    ax.set_title("gradient conflicts (negative: the tasks disagree)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_conflicts(tasks: list[str], matrix: torch.Tensor, out_dir: str | Path) -> None:
    """conflicts.png (heatmap), conflicts.md and conflicts.json in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "conflicts.json").write_text(json.dumps({"tasks": tasks, "cosine": matrix.tolist()}, indent=2))
    (out_dir / "conflicts.md").write_text(conflicts_markdown(tasks, matrix))
    conflicts_heatmap(tasks, matrix, out_dir / "conflicts.png")
