"""The full-size RT-1 on a GPU: training throughput in fp32 and bf16, and the Lightning path on CUDA.

    python benchmarks/gpu_rt1.py [--out docs/BENCHMARKS.md] [--batch 32] [--steps 20]

1. Samples/s of one training step (forward, backward, AdamW) of the `rt1` preset (FiLM-EfficientNet on
   300 px, 6 frames, 8 layers of width 512, 8 tokens per image) on synthetic inputs, fp32 against
   bf16 autocast, measured in one process; and batched inference (actions/s).
2. `Trainer.fit` of BehaviorCloning on a synthetic 64 px image file with `accelerator="gpu"`,
   `precision="bf16-mixed"`: the loss must fall, and the exported policy must load on the CPU and give
   the same action as on the GPU (within bf16 tolerance).
Needs a CUDA device; no text model (one-hot task ids).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lcbc.policies.rt1 import RT1, RT1Config  # noqa: E402


def synthetic_inputs(config: RT1Config, batch: int, device: str):
    H = config.history
    images = {key: torch.randint(0, 256, (batch, H, config.image_size, config.image_size, 3), dtype=torch.uint8,
                                 device=device) for key in config.image_keys}
    task = torch.randn(batch, config.task_dim, device=device)
    frame_mask = torch.ones(batch, H, dtype=torch.bool, device=device)
    targets = torch.nn.functional.one_hot(torch.randint(0, config.num_bins, (batch, 1, config.action_dim),
                                                        device=device), config.num_bins).float()
    return task, frame_mask, images, targets


def train_throughput(batch: int, steps: int, bf16: bool, use_compile: bool = False) -> float:
    config = RT1Config.preset("rt1", image_keys=("front",), action_dim=7)
    model = RT1(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    task, frame_mask, images, targets = synthetic_inputs(config, batch, "cuda")
    mask = torch.ones(batch, 1, dtype=torch.bool, device="cuda")
    forward = torch.compile(model) if use_compile else model

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = RT1.loss(forward(task, frame_mask, images=images), targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


@torch.inference_mode()
def inference_throughput(batch: int, steps: int) -> float:
    config = RT1Config.preset("rt1", image_keys=("front",), action_dim=7)
    model = RT1(config).cuda().eval()
    task, frame_mask, images, _ = synthetic_inputs(config, batch, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(task, frame_mask, images=images)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(task, frame_mask, images=images).argmax(-1)
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def lightning_on_gpu(workdir: Path) -> str:
    import lightning as L

    from lcbc.data.datamodule import DemoDataModule
    from lcbc.data.hdf5 import DemoWriter
    from lcbc.policies.language_policy import LanguagePolicy
    from lcbc.training.bc import BehaviorCloning, export_checkpoint

    rng = np.random.default_rng(0)
    path = workdir / "pixels.hdf5"
    with DemoWriter(path, {"env_name": "synthetic", "env_type": 0, "env_kwargs": {}}) as writer:
        for demo in range(8):
            T = 20
            phase = np.linspace(-1, 1, T, dtype=np.float32)
            images = rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8)
            images[:, :8, :8] = (demo % 2) * 255  # the task shows in a corner of the image
            actions = np.stack([phase, -phase, phase * (1 if demo % 2 else -1)], 1) * 0.9
            writer.add_demo(actions, {"front_rgb": images, "robot_state": np.repeat(phase[:, None], 4, 1)},
                            np.zeros(T), np.eye(1, T, T - 1)[0].astype(int), instruction=f"task {demo % 2}",
                            task=f"task-{demo % 2}")
    L.seed_everything(0)
    model = BehaviorCloning(history=2, task_mode="onehot", lr=1e-3, warmup_steps=10)
    data = DemoDataModule(str(path), obs_keys=["front_rgb", "robot_state"], history=2, batch_size=64,
                          val_fraction=0.0)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=200, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, default_root_dir=workdir, callbacks=[Record()])
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    trainer.save_checkpoint(workdir / "last.ckpt")
    export_checkpoint(str(workdir / "last.ckpt"), str(workdir / "policy"))
    loaded = LanguagePolicy.from_pretrained(workdir / "policy")
    batch = data.train_set.__getitems__(np.arange(4))
    on_gpu = model.export_policy().cuda()
    gpu_batch = model.transfer_batch_to_device(batch, torch.device("cuda"), 0)
    with torch.inference_mode():
        cpu_logits = loaded.logits(batch)
        gpu_logits = on_gpu.logits(gpu_batch).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16_logits = on_gpu.logits(gpu_batch).float().cpu()
    gap = (gpu_logits - cpu_logits).abs().max().item()
    bf16_gap = (bf16_logits - cpu_logits).abs().max().item()
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, f"loss did not fall on the GPU: {first:.3f} -> {last:.3f}"
    return (f"`Trainer.fit` (accelerator gpu, bf16-mixed, rt1-tiny on 64 px + robot state, batch 64): 200 steps "
            f"in {seconds:.1f} s including start-up, loss {first:.2f} -> {last:.2f} (mean of the first and last "
            f"10 steps). The exported policy's logits on the CPU match the trained module's on the GPU within "
            f"{gap:.1e} in fp32 and {bf16_gap:.2f} under bf16 autocast (logits span "
            f"{cpu_logits.min():.1f} to {cpu_logits.max():.1f}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_rt1.py: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    params = RT1(RT1Config.preset("rt1", image_keys=("front",), action_dim=7)).num_parameters()
    fp32 = train_throughput(args.batch, args.steps, bf16=False)
    bf16 = train_throughput(args.batch, args.steps, bf16=True)
    compiled = train_throughput(args.batch, args.steps, bf16=True, use_compile=True)
    infer = inference_throughput(args.batch * 4, args.steps)
    with tempfile.TemporaryDirectory() as workdir:
        fit = lightning_on_gpu(Path(workdir))
    name = torch.cuda.get_device_name()
    section = "\n".join([
        "## RT-1 (full size) on a GPU, bf16", "",
        f"`python benchmarks/gpu_rt1.py` on one {name}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}. The `rt1` preset ({params / 1e6:.1f} M parameters: "
        "FiLM-EfficientNet on one 300 px camera, 6 frames, 8 layers of width 512), synthetic inputs, "
        f"batch {args.batch}, mean over {args.steps} steps after 3 warm-up steps, one process:", "",
        "| step | samples/s | ratio to fp32 training |", "|---|---:|---:|",
        f"| training, fp32 (TF32 matmuls) | {fp32:.0f} | 1.00 |",
        f"| training, bf16 autocast | {bf16:.0f} | {bf16 / fp32:.2f} |",
        f"| training, bf16 autocast, torch.compile | {compiled:.0f} | {compiled / fp32:.2f} |",
        f"| inference, bf16, batch {args.batch * 4} | {infer:.0f} | {infer / fp32:.2f} |", "",
        fit, "",
    ])
    print(section)
    write_section(Path(args.out), section)


if __name__ == "__main__":
    main()
