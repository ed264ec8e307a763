"""Policy speed: act() latency on one CPU thread, and Lightning's training overhead.

    python benchmarks/policy.py --data datasets/mt10_state.hdf5 [--policy runs/bc_mt10_state/policy]

1. `act()` latency of the tiny state policy (one environment, one thread): p50/p99 with a cached
   instruction and with an instruction never seen before (which runs the text model).
2. Training throughput (samples/s) of `Trainer.fit` against a bare PyTorch loop over the same
   model, data, optimizer, schedule and gradient clipping, measured in one process.
Writes both tables into docs/BENCHMARKS.md (sections `## act() latency`, `## Lightning overhead`).
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


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000, q))


def act_latency(policy_dir: str | None, data: str, calls: int) -> str:
    from lcbc.data.dataset import DemoDataset
    from lcbc.policies.language_policy import LanguagePolicy
    from lcbc.training.bc import BehaviorCloning

    torch.set_num_threads(1)
    dataset = DemoDataset(data, obs_keys=["state"])
    if policy_dir:
        policy = LanguagePolicy.from_pretrained(policy_dir)
    else:  # an untrained policy of the same size: latency does not depend on the weights
        module = BehaviorCloning(history=2)
        module._build({"stats": dataset.statistics(), "low_dim_keys": ["state"], "image_keys": [],
                       "instructions": dataset.instructions, "tasks": dataset.tasks})
        module.policy.task_encoder.embed_vocabulary()
        policy = module.policy.eval()
    states = dataset.low_dim["state"]
    instruction = policy.config["instructions"][0]
    policy.reset()
    for i in range(50):
        policy.act({"state": states[i]}, instruction)
    cached, new = [], []
    for i in range(calls):
        if i % 200 == 0:
            policy.reset()
        start = time.perf_counter()
        policy.act({"state": states[i % len(states)]}, instruction)
        cached.append(time.perf_counter() - start)
    for i in range(min(calls, 100)):
        start = time.perf_counter()
        policy.act({"state": states[i]}, f"{instruction} now, variant {i}")
        new.append(time.perf_counter() - start)
    rows = [f"| cached instruction | {calls} | {percentile(cached, 50):.2f} | {percentile(cached, 99):.2f} |",
            f"| new instruction (text model runs) | {len(new)} | {percentile(new, 50):.2f} | "
            f"{percentile(new, 99):.2f} |"]
    header = (f"rt1-tiny, state only (39-d), history {policy.rt1_config.history}, "
              f"{sum(p.numel() for p in policy.net.parameters()):,} parameters, torch threads: 1\n\n"
              "| call | calls | p50 (ms) | p99 (ms) |\n|---|---:|---:|---:|\n")
    return header + "\n".join(rows) + "\n"


def training_throughput(data: str, steps: int, batch_size: int, repeats: int) -> str:
    import lightning as L

    from lcbc.data.datamodule import DemoDataModule
    from lcbc.training.bc import BehaviorCloning, warmup_cosine

    torch.set_num_threads(2)

    def make():
        L.seed_everything(0, verbose=False)
        module = BehaviorCloning(history=2, warmup_steps=10)
        datamodule = DemoDataModule(data, history=2, obs_keys=["state"], batch_size=batch_size, val_fraction=0.0)
        return module, datamodule

    def bare_loop() -> float:
        module, datamodule = make()
        datamodule.setup("fit")
        module._build({"stats": datamodule.train_set.statistics(), "low_dim_keys": ["state"], "image_keys": [],
                       "instructions": datamodule.train_set.instructions, "tasks": datamodule.train_set.tasks})
        module.policy.task_encoder.embed_vocabulary()
        policy = module.policy.train()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=module.hparams.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, 10, steps + 10))
        loader = (batch for _ in iter(int, 1) for batch in datamodule.train_dataloader())  # epoch after epoch
        for step in range(steps + 10):
            if step == 10:
                start = time.perf_counter()
            batch = next(loader)
            loss, _ = policy(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        return steps * batch_size / (time.perf_counter() - start)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, index):
            if trainer.global_step == 10:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, module):
            self.seconds = time.perf_counter() - self.start

    def lightning() -> float:
        module, datamodule = make()
        timer = Timer()
        trainer = L.Trainer(max_steps=steps + 10, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            gradient_clip_val=1.0, callbacks=[timer])
        trainer.fit(module, datamodule)
        return steps * batch_size / timer.seconds

    bare, light = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        bare.append(bare_loop())
        light.append(lightning())
    b, lt = statistics.median(bare), statistics.median(light)
    return ("rt1-tiny, state only, history 2, batch {}, {} timed steps, median of {} interleaved runs, "
            "torch threads: 2\n\n| loop | samples/s (median) | runs |\n|---|---:|---|\n"
            "| bare PyTorch | {:.0f} | {} |\n| Lightning `Trainer.fit` | {:.0f} | {} |\n\n"
            "Lightning / bare: **{:.3f}** (overhead {:.1f}%)\n").format(
                batch_size, steps, repeats, b, ", ".join(f"{x:.0f}" for x in bare), lt,
                ", ".join(f"{x:.0f}" for x in light), lt / b, 100 * (1 - lt / b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="datasets/mt10_state.hdf5")
    parser.add_argument("--policy", help="an exported tiny state policy (default: untrained, same size)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args()
    stamp = (f"Measured {datetime.date.today()} on 2 CPU cores with `python benchmarks/policy.py "
             f"--data {args.data}{' --policy ' + args.policy if args.policy else ''}`.\n\n")
    latency = stamp + act_latency(args.policy, args.data, args.calls)
    print(latency)
    write_section(Path(args.out), "## act() latency\n\n" + latency)
    overhead = stamp + training_throughput(args.data, args.steps, args.batch_size, args.repeats)
    print(overhead)
    write_section(Path(args.out), "## Lightning overhead\n\n" + overhead)


if __name__ == "__main__":
    main()
