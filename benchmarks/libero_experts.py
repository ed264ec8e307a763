"""Success of LIBERO-Goal's scripted experts: attempts vs successes per task, time, and which episodes failed.

    python benchmarks/libero_experts.py --episodes 20 [--tasks turn-on-the-stove,...] [--split train]
    python benchmarks/libero_experts.py --episodes 20 --chain 2 --split validation

Episode i runs on the split's i-th goal variation (train: placement seed i), so a failure can be replayed.
With --chain N: the experts on the chains `lcbc eval --chain N` asks a policy for (among the tasks with an
expert), the reference a policy's chains are read against.
"""

from __future__ import annotations

import argparse
import time

from lcbc.benchmark import load_benchmark
from lcbc.collect import rollout_expert
from lcbc.evaluation.rollout import ExpertActor, run_jobs
from lcbc.evaluation.scene import chain_jobs, chain_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--tasks", default="", help="comma-separated; all with an expert by default")
    parser.add_argument("--split", default="train")
    parser.add_argument("--chain", type=int, help="chains of this many requests instead of single tasks")
    args = parser.parse_args()
    benchmark = load_benchmark("libero:goal")
    tasks = args.tasks.split(",") if args.tasks else [task for task in benchmark.tasks if benchmark.expert(task)]
    if args.chain:
        benchmark = load_benchmark(f"libero:goal:{','.join(tasks)}")
        start = time.time()
        jobs = chain_jobs(benchmark, tasks, args.episodes, args.chain,
                          {task: [benchmark.canonical_instruction(task)] for task in tasks})
        result = run_jobs(ExpertActor(benchmark), benchmark, jobs, args.split, envs_per_task=1, progress=False)
        table = chain_table(args.chain, result.outcomes)
        print(f"success by chain length {table['success_by_length']}; {time.time() - start:.0f} s, "
              f"{result.steps} steps")
        for outcome in result.outcomes:
            if outcome.completed < args.chain:
                print(f"chain {outcome.job.episode}: {[task for task, _ in outcome.job.requests]} stopped after "
                      f"{outcome.completed}")
        return
    print(f"{'task':45s} success  steps(mean)  seconds  failed episodes")
    for task in tasks:
        start, env, expert = time.time(), benchmark.make_env(task), benchmark.expert(task)
        failed, steps = [], []
        for index in range(args.episodes):
            arrays, success = rollout_expert(env, expert, benchmark.goal(task, args.split, index), 0)
            failed += [] if success else [index]
            steps.append(len(arrays["actions"]))
        env.close()
        print(f"{task:45s} {args.episodes - len(failed):3d}/{args.episodes:<3d}  {sum(steps) / len(steps):8.0f}  "
              f"{time.time() - start:8.1f}  {failed}", flush=True)


if __name__ == "__main__":
    main()
