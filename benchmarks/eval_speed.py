"""Evaluation throughput: environment steps/s of lcbc's batched rollouts against the environments' limit.

    python benchmarks/eval_speed.py --policy runs/bc_mt10_state/policy [--benchmark MT10 --episodes 10]
    python benchmarks/eval_speed.py --policy DIR --benchmark libero:goal --episodes 4 --workers 1,2

The limit is the same environments (same tasks, same number per task, same goals) stepped in the
same loop by a random policy, which costs nothing to query. Both run interleaved, in one process and in
each other number of worker processes `--workers` lists (`lcbc eval --workers`). A pixel policy's
environments render its cameras, the random policy's too.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from pathlib import Path

import numpy as np
import torch
from report import write_section

from lcbc.benchmark import load_benchmark
from lcbc.cli import policy_cameras
from lcbc.evaluation.rollout import PolicyActor, rollout
from lcbc.policies.language_policy import LanguagePolicy

ROOT = Path(__file__).resolve().parents[1]


class RandomActor:
    """Uniform random actions: measures what stepping the environments alone costs."""

    def __init__(self, action_dim: int, seed: int = 0):
        self.action_dim, self.rng = action_dim, np.random.default_rng(seed)

    def reset(self, done) -> None:
        pass

    def __call__(self, observations, jobs) -> np.ndarray:
        return self.rng.uniform(-1, 1, (len(jobs), self.action_dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--benchmark", default="MT10")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--envs-per-task", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1", help="comma-separated process counts to measure")
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    benchmark = load_benchmark(args.benchmark)
    tasks = benchmark.tasks
    policy = LanguagePolicy.from_pretrained(args.policy)
    cameras, image_size = policy_cameras(policy, benchmark)
    workers = [int(count) for count in args.workers.split(",")]
    loops = {f"{name}, {count} process{'es' * (count > 1)}": (actor, count) for count in workers
             for name, actor in (("random policy (the limit)", RandomActor(policy.rt1_config.action_dim)),
                                 ("lcbc eval (RT-1-tiny, batched)", PolicyActor(policy)))}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, (actor, count) in loops.items():
            result = rollout(actor, benchmark, args.episodes, envs_per_task=args.envs_per_task, cameras=cameras,
                             image_size=image_size, progress=False, workers=count)
            rates[name].append(result.steps / result.seconds)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    rendering = f", rendering {' and '.join(cameras)} at {image_size} px" if cameras else ""
    title = "Evaluation throughput" + ("" if benchmark.name == "metaworld:MT10" else f", {benchmark.name}")
    lines = [f"## {title}\n\nMeasured {datetime.date.today()} on 2 CPU cores with "
             f"`python benchmarks/eval_speed.py --policy {args.policy} --benchmark {args.benchmark} "
             f"--episodes {args.episodes} --envs-per-task {args.envs_per_task} --repeats {args.repeats} "
             f"--workers {args.workers}`: {len(tasks)} tasks x {args.envs_per_task} "
             f"environments stepped together{rendering}, {args.repeats} interleaved repeats; policy on 1 torch "
             "thread per process.\n",
             "| loop | env steps/s (median) | runs |", "|---|---:|---|"]
    lines += [f"| {name} | {medians[name]:.0f} | {', '.join(f'{x:.0f}' for x in v)} |" for name, v in rates.items()]
    names = list(loops)
    lines.append("")
    for k in range(0, len(names), 2):
        lines.append(f"lcbc eval / limit, {loops[names[k]][1]} process{'es' * (loops[names[k]][1] > 1)}: "
                     f"**{medians[names[k + 1]] / medians[names[k]]:.2f}** (goal: at least 0.5)")
    if len(workers) > 1:
        lines.append(f"lcbc eval, {workers[-1]} / {workers[0]} processes: "
                     f"**{medians[names[-1]] / medians[names[1]]:.2f}**")
    lines.append("")
    section = "\n".join(lines)
    print(section)
    write_section(Path(args.out), section)


if __name__ == "__main__":
    main()
