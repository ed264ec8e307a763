"""What a person looks at after an evaluation: a success table (markdown and JSON), a bar chart, videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def success_table(tasks: list[str], policy, expert=None) -> dict:
    """Per-task (and per-phrasing) success of the policy, with the expert's on the same goals."""
    rows = {}
    for task in tasks:
        phrasings = {text: float(np.mean(values)) for (t, text), values in policy.successes.items() if t == task}
        rows[task] = {"success": policy.success_rate(task), "episodes": sum(
            len(values) for (t, _), values in policy.successes.items() if t == task), "phrasings": phrasings}
        if expert is not None:
            rows[task]["expert"] = expert.success_rate(task)
    table = {"tasks": rows, "mean": float(np.mean([row["success"] for row in rows.values()])),
             "env_steps": policy.steps, "seconds": round(policy.seconds, 2),
             "steps_per_second": round(policy.steps / max(policy.seconds, 1e-9), 1)}
    if expert is not None:
        table["expert_mean"] = float(np.mean([row["expert"] for row in rows.values()]))
    return table


def markdown(table: dict) -> str:
    with_expert = "expert_mean" in table
    lines = ["| task | success | expert |" if with_expert else "| task | success |",
             "|---|---:|---:|" if with_expert else "|---|---:|"]
    for task, row in table["tasks"].items():
        cells = [task, f"{100 * row['success']:.1f}%"] + ([f"{100 * row['expert']:.1f}%"] if with_expert else [])
        lines.append("| " + " | ".join(cells) + " |")
        if len(row["phrasings"]) > 1:  # each phrasing under its task, so a weak one cannot hide in the mean
            for text, rate in row["phrasings"].items():
                lines.append("| " + " | ".join([f"↳ '{text}'", f"{100 * rate:.1f}%"]
                                                + ([""] if with_expert else [])) + " |")
    mean = ["**mean**", f"**{100 * table['mean']:.1f}%**"]
    if with_expert:
        mean.append(f"**{100 * table['expert_mean']:.1f}%**")
    lines.append("| " + " | ".join(mean) + " |")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend: charts are written, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(table: dict, path: Path) -> None:
    plt = pyplot()
    tasks = list(table["tasks"])
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(tasks)), 4))
    policy = [100 * table["tasks"][t]["success"] for t in tasks]
    if "expert_mean" in table:
        ax.bar(x - 0.2, policy, 0.4, label=f"policy (mean {100 * table['mean']:.1f}%)")
        ax.bar(x + 0.2, [100 * table["tasks"][t]["expert"] for t in tasks], 0.4, color="lightgray",
               label=f"scripted expert (mean {100 * table['expert_mean']:.1f}%)")
        ax.legend(loc="upper center", ncol=2, frameon=False)
    else:
        ax.bar(x, policy, 0.6)
    phrased = [(i, rate) for i, t in enumerate(tasks) if len(table["tasks"][t]["phrasings"]) > 1
               for rate in table["tasks"][t]["phrasings"].values()]
    if phrased:
        offset = -0.2 if "expert_mean" in table else 0.0
        ax.scatter([i + offset for i, _ in phrased], [100 * rate for _, rate in phrased], marker="_", s=200,
                   color="black", label="each phrasing", zorder=3)
        ax.legend(loc="upper center", ncol=3, frameon=False)
    ax.set_xticks(x, tasks, rotation=45, ha="right")
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 118)  # room for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("success per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def play_episode(actor, benchmark, job, split: str, video: Path | None = None, cameras: tuple[str, ...] = (),
                 size: int = 128) -> tuple:
    """One episode of `job` (a rollout.Job: its requests, on its start task's `episode`-th goal of `split`),
    its environment rendering `cameras`; with `video`, the first of them as a GIF. Returns its rollout.Outcome
    and what happened: goal, flat states, actions, successes and, where the environment gives them, simulator
    states (for scoring the scene's other tasks)."""
    import imageio.v2 as imageio

    from lcbc.evaluation.rollout import run_jobs

    record = {"goal": benchmark.goal(job.start_task, split, job.episode), "obs": [], "actions": [], "success": [],
              "states": []}
    frames = []

    def watch(env, obs, action, info):
        record["obs"].append(obs.get("state"))
        if action is not None:
            record["actions"].append(action)
            record["success"].append(bool(info["success"]))
        if hasattr(env, "simulator_state"):
            record["states"].append(env.simulator_state())
        if video:
            frames.append(obs[f"{cameras[0]}_rgb"])

    result = run_jobs(actor, benchmark, [job], split, envs_per_task=1, cameras=cameras,
                      image_size=size, progress=False, watch=watch)
    if video:
        frames.extend([frames[-1]] * 10)  # hold the last frame so the outcome is visible
        video.parent.mkdir(parents=True, exist_ok=True)
        imageio.mimsave(video, frames[::2], duration=0.08, loop=0)
    return result.outcomes[0], record


def write_report(table: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "success.json").write_text(json.dumps(table, indent=2))
    (out_dir / "success.md").write_text(markdown(table))
    bar_chart(table, out_dir / "success.png")
