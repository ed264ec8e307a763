"""Evaluations of tasks that share a scene, where only the words say what to do.

Obedience: from the same starts, every instruction of the scene's tasks; which task's goal does each one
reach? Episode k starts on goal variation k of the scene's task k mod T (T tasks), the same starts for every
instruction, so rows differ only in the words. A language-blind control row gives one fixed instruction on
the same starts: where the policy goes when the words do not matter.

Chains: random sequences of tasks that can follow each other (Benchmark.can_follow), asked for one after
another in one episode; success by chain length k is the fraction of chains whose first k requests were
done. Chain k starts on goal variation k of its first task.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lcbc.evaluation.report import pyplot
from lcbc.evaluation.rollout import Job


def obedience_jobs(tasks: list[str], episodes: int, phrasings: dict[str, list[str]],
                   blind: str | None = None) -> list[Job]:
    """Every phrasing of every task from the same starts, and the blind instruction (task '') on them too."""
    starts = [(tasks[k % len(tasks)], k) for k in range(episodes)]
    asked = [(task, text) for task in tasks for text in phrasings[task]] + ([("", blind)] if blind else [])
    return [Job(task, text, k, start) for task, text in asked for start, k in starts]


def blind_row(text: str) -> str:
    return f"blind: '{text}'"


def obedience_table(tasks: list[str], outcomes) -> dict:
    """Rows: the task asked for (its phrasings pooled), or the blind instruction; columns: the fraction of
    its episodes that newly reached each task's goal."""
    rows, by_instruction = {}, {}
    for outcome in outcomes:
        job = outcome.job
        rows.setdefault(job.task or blind_row(job.instruction), []).append(outcome.reached[0])
        by_instruction.setdefault(job.instruction, []).append(outcome.reached[0])

    def fractions(reached: list[list[str]]) -> dict[str, float]:
        return {task: float(np.mean([task in episode for episode in reached])) for task in tasks}

    # Rows in the tasks' order (then the blind one), not in the order episodes happened to finish.
    order = [task for task in tasks if task in rows] + [row for row in rows if row not in tasks]
    table = {row: fractions(rows[row]) for row in order}
    return {"tasks": tasks, "rows": table, "episodes": {row: len(reached) for row, reached in rows.items()},
            "by_instruction": {text: fractions(reached) for text, reached in by_instruction.items()},
            "obedience": float(np.mean([table[task][task] for task in tasks if task in table]))}


def obedience_markdown(table: dict) -> str:
    tasks = table["tasks"]
    lines = ["| asked \\ reached | " + " | ".join(f"{i}" for i in range(len(tasks))) + " | episodes |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for row, fractions in table["rows"].items():
        label = f"{tasks.index(row)} {row}" if row in tasks else row
        lines.append(f"| {label} | " + " | ".join(f"{100 * fractions[task]:.0f}%" for task in tasks)
                     + f" | {table['episodes'][row]} |")
    lines.append(f"\nColumns: {', '.join(f'{i} {task}' for i, task in enumerate(tasks))}. A cell is the fraction "
                 f"of the row's episodes that newly reached the column's goal; the diagonal's mean is "
                 f"{100 * table['obedience']:.1f}%.")
    return "\n".join(lines) + "\n"


def obedience_heatmap(table: dict, path: Path) -> None:
    plt = pyplot()
    tasks, rows = table["tasks"], list(table["rows"])
    values = np.array([[100 * table["rows"][row][task] for task in tasks] for row in rows])
    fig, ax = plt.subplots(figsize=(2 + 0.7 * len(tasks), 1.5 + 0.5 * len(rows)))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100)
    for (r, c), value in np.ndenumerate(values):
        ax.text(c, r, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("goal reached")
    ax.set_ylabel("instruction given")
    fig.colorbar(image, label="% of episodes")
    ax.set_title(f"obedience (diagonal mean {100 * table['obedience']:.1f}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def random_chain(benchmark, tasks: list[str], length: int, rng: np.random.Generator) -> list[str] | None:
    """A random chain of `length` distinct tasks, each able to follow every earlier one (so all the chain's
    goals can hold together at its end), or None when there is none. Depth-first over shuffled candidates."""
    follows = {(a, b): benchmark.can_follow(a, b) for a in tasks for b in tasks}

    def extend(chain: list[str]) -> list[str] | None:
        if len(chain) == length:
            return chain
        candidates = [task for task in tasks if task not in chain and all(follows[e, task] for e in chain)]
        for index in rng.permutation(len(candidates)):
            found = extend([*chain, candidates[index]])
            if found:
                return found
        return None

    return extend([])


def chain_jobs(benchmark, tasks: list[str], episodes: int, length: int,
               phrasings: dict[str, list[str]]) -> list[Job]:
    """Chain k: drawn with seed k (a phrasing per request drawn too), on goal variation k of its first task.
    The caller has checked that a chain of `length` exists (random_chain is then never None)."""
    jobs = []
    for k in range(episodes):
        rng = np.random.default_rng(k)
        chain = random_chain(benchmark, tasks, length, rng)
        requests = [(task, phrasings[task][rng.integers(len(phrasings[task]))]) for task in chain]
        jobs.append(Job(*requests[0], k, then=tuple(requests[1:])))
    return jobs


def chain_table(length: int, outcomes, expert_outcomes=None) -> dict:
    """The fraction of chains whose first k requests were done, k = 1..length; with the expert's on the same
    chains when given."""
    def by_length(outcomes) -> dict[int, float]:
        done = np.array([outcome.completed for outcome in outcomes])
        return {k: float(np.mean(done >= k)) for k in range(1, length + 1)}

    table = {"length": length, "chains": len(outcomes), "success_by_length": by_length(outcomes),
             "episodes": [{"tasks": [task for task, _ in outcome.job.requests],
                           "instructions": [text for _, text in outcome.job.requests],
                           "completed": outcome.completed} for outcome in outcomes]}
    if expert_outcomes:
        table["expert_success_by_length"] = by_length(expert_outcomes)
    return table


def chain_markdown(table: dict) -> str:
    expert = table.get("expert_success_by_length")
    lines = ["| chain length | chains completed |" + (" expert |" if expert else ""),
             "|---:|---:|" + ("---:|" if expert else "")]
    lines += [f"| {k} | {100 * rate:.1f}% |" + (f" {100 * expert[k]:.1f}% |" if expert else "")
              for k, rate in table["success_by_length"].items()]
    return "\n".join(lines) + f"\n\n{table['chains']} chains; length k counts those whose first k requests were done.\n"


def chain_plot(table: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for key, label, color in (("success_by_length", "policy", None), ("expert_success_by_length", "scripted expert",
                                                                       "gray")):
        if key in table:
            lengths, rates = zip(*table[key].items())
            ax.plot(lengths, [100 * rate for rate in rates], marker="o", label=label, color=color)
    ax.set_xticks(list(table["success_by_length"]))
    ax.set_xlabel("requests in a row")
    ax.set_ylabel("chains completed (%)")
    ax.set_ylim(0, 105)
    ax.legend(frameon=False)
    ax.set_title(f"chained requests ({table['chains']} chains)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_scene_report(name: str, table: dict, markdown: str, plot, out_dir: Path) -> None:
    """`name`.json, .md and .png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(table, indent=2))
    (out_dir / f"{name}.md").write_text(markdown)
    plot(table, out_dir / f"{name}.png")

