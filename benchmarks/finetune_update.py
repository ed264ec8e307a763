"""Fine-tuning update speed: one IQL update (critics and RT-1 actor) as the share of imitated rows falls,
without and with PCGrad.

    python benchmarks/finetune_update.py --policy runs/bc_mt10_5demos/policy --demos datasets/mt10_state_5.hdf5

Under `imitate: successful` the actor runs RT-1 only on the rows that reach their goal; in a 200k-step MT10
run 57% of the online rows do, so about a fifth of each batch (half of it is demonstrations) is skipped.
The replay here holds the demonstrations only, and each batch marks a chosen share of its rows as not
imitated; the 100% row is the cost every update had before rows were skipped. PCGrad runs RT-1 once per
task on the task's own rows, so its extra cost is the per-task backward passes and the projections. One
thread, medians of `--updates` updates, writes the table into docs/BENCHMARKS.md (section
`## Fine-tuning update`).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from report import write_section

ROOT = Path(__file__).resolve().parents[1]


def update_seconds(module, cases: list[tuple[float, bool]], updates: int) -> dict[tuple[float, bool], float]:
    """Median seconds of `module._update()` for each (share of a batch's rows reaching their goal, PCGrad)
    case, the cases taking turns update by update so that load from other processes weighs on all alike."""
    sample = module.replay.sample.__func__
    rng = np.random.default_rng(0)
    current = {"share": 1.0}

    def marked_sample(replay, *args, **kwargs):
        batch = sample(replay, *args, **kwargs)
        batch["reaches_goal"] = rng.random(len(batch["reaches_goal"])) < current["share"]
        return batch

    module.replay.sample = marked_sample.__get__(module.replay)
    times = {case: [] for case in cases}
    for turn in range(updates + 2):  # the first 2 rounds warm up
        for case in cases:
            current["share"], module.hparams.pcgrad = case
            start = time.perf_counter()
            module._update()
            if turn >= 2:
                times[case].append(time.perf_counter() - start)
    return {case: statistics.median(values) for case, values in times.items()}


def main() -> None:
    from lcbc.training.finetune import FineTuning

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--demos", required=True)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = FineTuning(policy=args.policy, benchmark="MT10", demos=[args.demos], imitate="successful",
                        learning_starts=0, actor_starts=0)
    module.setup("fit")
    module.on_fit_start()
    optimizer = module.configure_optimizers()
    module.optimizers = lambda: optimizer  # no Trainer: the update's own optimizer and backward
    module.manual_backward = lambda loss: loss.backward()
    shares = (1.0, 0.75, 0.5)
    seconds = update_seconds(module, [(share, pcgrad) for share in shares for pcgrad in (False, True)], args.updates)
    rows = "\n".join(f"| {share:.0%} | {seconds[share, False] * 1000:.0f} ms | "
                     f"{seconds[1.0, False] / seconds[share, False]:.2f}x | {seconds[share, True] * 1000:.0f} ms | "
                     f"{seconds[share, True] / seconds[share, False]:.2f}x |" for share in shares)
    section = (f"## Fine-tuning update\n\n`python benchmarks/finetune_update.py --policy {args.policy} --demos "
               f"{args.demos}` ({datetime.date.today()}, one thread, batch {module.hparams.batch_size}, "
               f"median of {args.updates} updates each, taking turns):\n\n"
               "| rows imitated | one update | speed-up | with PCGrad | PCGrad's cost |\n|---:|---:|---:|---:|---:|\n"
               f"{rows}\n")
    write_section(Path(args.out), section)
    print(section)


if __name__ == "__main__":
    main()
