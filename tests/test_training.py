"""Behavior cloning with Lightning: configs, overfitting, export, resume and DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lcbc.cli import main
from lcbc.data.datamodule import DemoDataModule
from lcbc.data.hdf5 import DemoWriter
from lcbc.policies.language_policy import LanguagePolicy
from lcbc.rl.pcgrad import split_by_task
from lcbc.tasks.encoders import TaskEncoder
from lcbc.training.bc import BehaviorCloning
from lcbc.training.cli import LcbcCLI

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def task_file(tmp_path):
    """Two instructions whose demos act oppositely from the same states: the policy must read the
    instruction to lower its loss."""
    path = tmp_path / "tasks.hdf5"
    with DemoWriter(path, {"env_name": "synthetic", "env_type": 0, "env_kwargs": {}}) as writer:
        for demo in range(6):
            sign = 1 if demo % 2 == 0 else -1
            phase = np.linspace(0, 1, 12, dtype=np.float32)
            actions = sign * np.stack([phase - 0.5, 0.5 - phase, 0.5 * phase], axis=1)
            obs = {"state": np.repeat(phase[:, None], 4, axis=1) + 0.01 * (demo // 2)}
            writer.add_demo(actions, obs, np.zeros(12), np.eye(1, 12, 11)[0].astype(int),
                            instruction=["open the drawer", "close the drawer"][demo % 2],
                            task=["drawer-open-v3", "drawer-close-v3"][demo % 2])
    return path


def _excess_loss(policy, batch) -> float:
    """Cross-entropy above its floor, the entropy of the Gaussian bin targets: 0 for a perfect fit."""
    targets = policy.action_tokenizer.targets(batch["actions"])
    floor = -(targets * targets.clamp_min(1e-12).log()).sum(-1).mean()
    with torch.no_grad():
        return float(policy(batch)[0] - floor)


def _trainer(tmp_path, steps, **kwargs):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


# Fine-tuning configs (finetune_*.yaml) run a different module: tests/test_finetune.py instantiates them.
@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                          if not p.name.startswith("finetune_")))
def test_every_config_instantiates(config, task_file):
    args = ["--config", str(ROOT / "configs" / config), "--data.paths", f"[{task_file}]"]
    cli = LcbcCLI(BehaviorCloning, DemoDataModule, args=args, run=False)
    assert isinstance(cli.model, BehaviorCloning) and isinstance(cli.datamodule, DemoDataModule)
    assert cli.datamodule.hparams.history == cli.model.hparams.history  # the policy sets the window


def test_policy_overfits_and_export_gives_identical_actions(task_file, tmp_path):
    L.seed_everything(0)
    model = BehaviorCloning(history=2, lr=3e-3, warmup_steps=10, rt1={"dropout": 0.0})
    data = DemoDataModule(str(task_file), history=2, batch_size=72, val_fraction=0.0)
    trainer = _trainer(tmp_path, 150)
    trainer.fit(model, data)
    batch = data.train_set.__getitems__(np.arange(len(data.train_set)))
    model.policy.eval()
    excess = _excess_loss(model.policy, batch)
    assert excess < 0.1 * np.log(256), f"loss {excess:.3f} above its floor: it did not fit the demonstrations"

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    main(["export", str(tmp_path / "last.ckpt"), str(tmp_path / "policy")])
    loaded = LanguagePolicy.from_pretrained(tmp_path / "policy")
    for policy in (model.policy, loaded):
        policy.eval().reset()
    obs = {"state": np.full(4, 0.5, np.float32)}
    for instruction in ("open the drawer", "close the drawer"):
        model.policy.reset()
        loaded.reset()
        for _ in range(3):
            np.testing.assert_array_equal(model.policy.act(obs, instruction), loaded.act(obs, instruction))
    # The two instructions lead to different actions: the policy reads the language.
    loaded.reset()
    opening = loaded.act(obs, "open the drawer")
    loaded.reset()
    assert not np.array_equal(opening, loaded.act(obs, "close the drawer"))


def test_resume_continues_from_the_saved_step(task_file, tmp_path):
    data = DemoDataModule(str(task_file), history=2, batch_size=16, val_fraction=0.0)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=5)
    L.seed_everything(0)
    _trainer(tmp_path, 5, callbacks=[checkpoint]).fit(BehaviorCloning(history=2), data)
    resumed = BehaviorCloning(history=2)
    trainer = _trainer(tmp_path, 8)
    seen = []
    resumed.on_train_batch_start = lambda batch, i: seen.append(trainer.global_step)
    trainer.fit(resumed, DemoDataModule(str(task_file), history=2, batch_size=16, val_fraction=0.0),
                ckpt_path=str(tmp_path / "last.ckpt"))
    assert seen == [5, 6, 7] and trainer.global_step == 8


def test_training_is_deterministic_with_a_seed(task_file, tmp_path):
    weights = []
    for run in range(2):
        L.seed_everything(7)
        model = BehaviorCloning(history=2)
        _trainer(tmp_path / str(run), 5).fit(model, DemoDataModule(str(task_file), history=2, batch_size=16))
        weights.append(torch.cat([p.flatten() for p in model.policy.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_instruction_noise_blurs_instructions_in_training_only(task_file, tmp_path):
    L.seed_everything(0)
    model = BehaviorCloning(history=2, instruction_noise=0.5)
    _trainer(tmp_path, 3).fit(model, DemoDataModule(str(task_file), history=2, batch_size=16))
    encoder = model.policy.task_encoder
    ids = torch.zeros(4000, dtype=torch.long)
    clean, noisy = encoder.eval()(instruction_id=ids), encoder.train()(instruction_id=ids)
    assert torch.equal(clean[0], clean[-1])
    offsets = (noisy - clean).norm(dim=1)
    assert abs(float(offsets.mean()) - 0.5) < 0.02 and float(offsets.min()) > 0.3
    export = model.export_policy()
    assert export.task_encoder.instruction_noise == 0.5 and not export.training  # used in eval mode: clean
    model.trainer.save_checkpoint(tmp_path / "last.ckpt")
    main(["export", str(tmp_path / "last.ckpt"), str(tmp_path / "policy")])
    assert LanguagePolicy.from_pretrained(tmp_path / "policy").task_encoder.instruction_noise == 0.0


def test_snap_reads_a_close_paraphrase_as_its_trained_instruction(task_file, tmp_path, capsys):
    trained = ["open the drawer", "push the puck to the goal"]
    raw, snapping = (TaskEncoder("language", trained, ["drawer", "puck"]) for _ in range(2))
    for encoder in (raw, snapping):
        encoder.embed_vocabulary()
    paraphrase, unrelated = "pull the drawer open", "what a lovely day it is"
    (nearest, close), (_, far) = raw.nearest_instruction(paraphrase), raw.nearest_instruction(unrelated)
    assert nearest == "open the drawer" and far < close
    snapping.snap_cosine = (close + far) / 2
    assert torch.equal(snapping.instruction_vector(paraphrase), snapping.instruction_embeddings[0])
    assert not torch.equal(raw.instruction_vector(paraphrase), raw.instruction_embeddings[0])  # off by default
    far_vector = snapping.instruction_vector(unrelated)
    assert not any(torch.allclose(far_vector, row) for row in snapping.instruction_embeddings)
    assert snapping.nearest_instruction(paraphrase) == (nearest, close)  # the wording's own cosine, not 1
    model = BehaviorCloning(history=1)
    _trainer(tmp_path, 1).fit(model, DemoDataModule(str(task_file), history=1, batch_size=16))
    model.trainer.save_checkpoint(tmp_path / "last.ckpt")
    main(["export", str(tmp_path / "last.ckpt"), str(tmp_path / "policy")])
    assert LanguagePolicy.from_pretrained(tmp_path / "policy", 0.8).task_encoder.snap_cosine == 0.8
    with pytest.raises(SystemExit) as exit_:
        main(["act", "--policy", str(tmp_path / "policy"), "--task", "reach-v3", "--snap", "1.5", "reach"])
    assert exit_.value.code == 2 and "snap cosine must be within 0..1" in capsys.readouterr().err


def test_goal_and_onehot_conditioning_train(tmp_path, task_file):
    for mode, goal in (("onehot", "none"), ("goal", "future")):
        model = BehaviorCloning(history=1, task_mode=mode, goal_keys=["state"] if mode == "goal" else None)
        data = DemoDataModule(str(task_file), history=1, goal=goal, batch_size=16, val_fraction=0.0)
        _trainer(tmp_path / mode, 3).fit(model, data)
        model.policy.eval().reset()
        obs = {"state": np.zeros(4, np.float32)}
        action = model.policy.act(obs, task_id=1) if mode == "onehot" else model.policy.act(obs, goal=obs)
        assert action.shape == (3,)


def test_ddp_with_two_cpu_processes(task_file, tmp_path):
    """Lightning's DDP strategy on the gloo backend, through the real command line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "lcbc.cli", "fit", "--config", str(ROOT / "configs/debug.yaml"),
         "--data.paths", f"[{task_file}]", "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--trainer.max_steps", "4", "--trainer.default_root_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert "All distributed processes registered" in result.stderr + result.stdout


def test_pixel_policy_trains_and_acts(tmp_path):
    """Images plus low-dimensional state; the network takes the data's image size."""
    from tests.conftest import write_demo_file

    path = write_demo_file(tmp_path / "pixels.hdf5", lengths=(6, 6), image_size=32, instructions=["open the drawer"])
    model = BehaviorCloning(history=2)
    _trainer(tmp_path, 2).fit(model, DemoDataModule(str(path), history=2, batch_size=4, val_fraction=0.0))
    assert model.policy.rt1_config.image_size == 32 and model.policy.config["image_keys"] == ["agentview_image"]
    model.policy.eval().reset()
    obs = {"state": np.zeros(3, np.float32), "agentview_image": np.zeros((32, 32, 3), np.uint8)}
    assert model.policy.act(obs, "open the drawer").shape == (2,)


def test_goal_images_condition_the_policy(tmp_path):
    """Hindsight goals given as images (plus state) train the goal encoder with the policy."""
    from tests.conftest import write_demo_file

    path = write_demo_file(tmp_path / "pixels.hdf5", lengths=(6, 6), image_size=32)
    model = BehaviorCloning(history=1, task_mode="goal", goal_keys=["agentview_image", "state"])
    _trainer(tmp_path, 2).fit(model, DemoDataModule(str(path), history=1, goal="future", batch_size=4,
                                                    val_fraction=0.0))
    assert model.policy.task_encoder.goal_image_keys == ["agentview_image"]
    model.policy.eval().reset()
    obs = {"state": np.zeros(3, np.float32), "agentview_image": np.zeros((32, 32, 3), np.uint8)}
    goal = {"state": np.ones(3, np.float32), "agentview_image": np.full((32, 32, 3), 255, np.uint8)}
    assert model.policy.act(obs, goal=goal).shape == (2,)


def test_pcgrad_training_learns_both_opposing_tasks(task_file, tmp_path):
    """The two tasks demand opposite actions from the same states: their gradients conflict, and
    training with gradient surgery still fits both."""
    L.seed_everything(0)
    model = BehaviorCloning(history=2, lr=3e-3, warmup_steps=10, rt1={"dropout": 0.0}, pcgrad=True)
    data = DemoDataModule(str(task_file), history=2, batch_size=72, val_fraction=0.0)
    trainer = _trainer(tmp_path, 150)
    trainer.fit(model, data)
    assert trainer.global_step == 150
    batch = data.train_set.__getitems__(np.arange(len(data.train_set)))
    model.policy.eval()
    for task, task_batch in split_by_task(batch).items():
        excess = _excess_loss(model.policy, task_batch)
        assert excess < 0.1 * np.log(256), f"task {task}: loss {excess:.3f} above its floor"


def test_pcgrad_with_trainer_clipping_is_one_clear_error(task_file, tmp_path, capsys):
    args = ["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{task_file}]",
            "--model.pcgrad", "true", "--trainer.gradient_clip_val", "1.0",
            "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "gradient clipping" in error[0], error


def test_progress_bar_counts_the_step_budget_across_epochs(tmp_path):
    """With max_steps the bar runs once from 0 to the budget; the stock one restarts every epoch ("Epoch 56/-2")."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lcbc.training.cli import ProgressBar

    class ThreeBatches(BoringModel):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(6, 32), batch_size=2)

    totals = []

    class Watch(ProgressBar):
        def on_train_batch_end(self, trainer, *args):
            super().on_train_batch_end(trainer, *args)
            task = self.progress.tasks[self.train_progress_bar_id]
            totals.append((task.completed, task.total, task.description))

    trainer = L.Trainer(max_steps=7, max_epochs=-1, callbacks=[Watch()], logger=False, enable_checkpointing=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(ThreeBatches())
    assert [completed for completed, _, _ in totals] == list(range(1, 8))
    assert {total for _, total, _ in totals} == {7}
    assert totals[-1][2] == "Epoch 2" and all("-" not in description for _, _, description in totals)
