"""Evaluation throughput: environment steps/s of lcbc's batched rollouts against the environments' limit.

    python benchmarks/eval_speed.py --policy runs/bc_mt10_state/policy [--benchmark MT10 --episodes 10]

The limit is the same environments (same tasks, same number per task, same goals) stepped in the
same loop by a random policy, which costs nothing to query. Both run in one process, interleaved.
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
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    benchmark = load_benchmark(args.benchmark)
    tasks = benchmark.tasks
    policy = LanguagePolicy.from_pretrained(args.policy)
    rates = {"random policy (the limit)": [], "lcbc eval (RT-1-tiny, batched)": []}
    for _ in range(args.repeats):
        for name, actor in (("random policy (the limit)", RandomActor(policy.rt1_config.action_dim)),
                            ("lcbc eval (RT-1-tiny, batched)", PolicyActor(policy))):
            result = rollout(actor, benchmark, args.episodes, envs_per_task=args.envs_per_task, progress=False)
            rates[name].append(result.steps / result.seconds)
    limit, ours = (statistics.median(v) for v in rates.values())
    lines = [f"## Evaluation throughput\n\nMeasured {datetime.date.today()} on 2 CPU cores with "
             f"`python benchmarks/eval_speed.py --policy {args.policy} --benchmark {args.benchmark} "
             f"--episodes {args.episodes}`: {len(tasks)} tasks x {args.envs_per_task} environments stepped "
             f"together, {args.repeats} interleaved repeats; policy on 1 torch thread.\n",
             "| loop | env steps/s (median) | runs |", "|---|---:|---|"]
    lines += [f"| {name} | {statistics.median(v):.0f} | {', '.join(f'{x:.0f}' for x in v)} |"
              for name, v in rates.items()]
    lines.append(f"\nlcbc eval / limit: **{ours / limit:.2f}** (goal: at least 0.5)\n")
    section = "\n".join(lines)
    print(section)
    write_section(Path(args.out), section)


if __name__ == "__main__":
    main()
