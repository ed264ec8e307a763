"""Fine-tuning update speed: one IQL update (critics and RT-1 actor) as the share of imitated rows falls.

    python benchmarks/finetune_update.py --policy runs/bc_mt10_5demos/policy --demos datasets/mt10_state_5.hdf5

Under `imitate: successful` the actor runs RT-1 only on the rows that reach their goal; in a 200k-step MT10
run 57% of the online rows do, so about a fifth of each batch (half of it is demonstrations) is skipped.
The replay here holds the demonstrations only, and each batch marks a chosen share of its rows as not
imitated; the 100% row is the cost every update had before rows were skipped. One thread, medians of
`--updates` updates, writes the table into docs/BENCHMARKS.md (section `## Fine-tuning update`).
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


def update_seconds(module, shares: tuple[float, ...], updates: int) -> dict[float, float]:
    """Median seconds of `module._update()` for each share of a batch's rows reaching their goal, the
    shares taking turns update by update so that load from other processes weighs on all of them alike."""
    sample = module.replay.sample.__func__
    rng = np.random.default_rng(0)
    current = {"share": 1.0}

    def marked_sample(replay, *args, **kwargs):
        batch = sample(replay, *args, **kwargs)
        batch["reaches_goal"] = rng.random(len(batch["reaches_goal"])) < current["share"]
        return batch

    module.replay.sample = marked_sample.__get__(module.replay)
    times = {share: [] for share in shares}
    for turn in range(updates + 2):  # the first 2 rounds warm up
        for share in shares:
            current["share"] = share
            start = time.perf_counter()
            module._update()
            if turn >= 2:
                times[share].append(time.perf_counter() - start)
    return {share: statistics.median(values) for share, values in times.items()}


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
    seconds = update_seconds(module, shares, args.updates)
    rows = "\n".join(f"| {share:.0%} | {seconds[share] * 1000:.0f} ms | {seconds[1.0] / seconds[share]:.2f}x |"
                     for share in shares)
    section = (f"## Fine-tuning update\n\n`python benchmarks/finetune_update.py --policy {args.policy} --demos "
               f"{args.demos}` ({datetime.date.today()}, one thread, batch {module.hparams.batch_size}, "
               f"median of {args.updates} updates each, taking turns):\n\n"
               "| rows imitated | one update | speed-up |\n|---:|---:|---:|\n"
               f"{rows}\n")
    write_section(Path(args.out), section)
    print(section)


if __name__ == "__main__":
    main()
