"""LanguagePolicy: the RT-1 network plus everything needed to act in environment units.

It owns the normalization statistics, the task encoder (with its cached instruction embeddings) and
the action tokenizer, so `act(observation, "open the drawer")` takes raw observations and returns a
raw action. Saved as a folder (`model.safetensors`, `config.json`, `normalization.json`) that loads
with no pickle and no training code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lcbc.errors import UserError
from lcbc.policies.rt1 import RT1, ActionTokenizer, RT1Config
from lcbc.tasks.encoders import DEFAULT_TEXT_MODEL, TaskEncoder

STD_FLOOR = 1e-2  # Meta-World pads unused object dimensions with constants: their std is 0


NORMALIZATIONS = ("dimension", "key")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


class Normalizer(nn.Module):
    """(x - mean) / scale per low-dimensional key; a key without statistics is an error.

    `scale="dimension"` divides each dimension by its own std; `scale="key"` divides the whole key by one
    number (the root mean square of its dimensions' stds). One scale keeps the geometry of a state made of
    positions: a hand-to-goal offset stays the same vector in every direction, where per-dimension scaling
    stretches each axis by how much that coordinate happens to vary across all tasks' data (in Meta-World
    the reach goal's y varies far less than the y of the other tasks' objects).
    """

    def __init__(self, stats: dict[str, dict[str, list[float]]], keys: list[str], scale: str = "dimension"):
        super().__init__()
        if scale not in NORMALIZATIONS:
            raise UserError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {scale!r}")
        missing = [key for key in keys if key not in stats]
        if missing:
            raise UserError(f"normalization statistics have no key {missing[0]!r} (have {', '.join(stats)})")
        self.keys = list(keys)
        for key in keys:
            self.register_buffer(f"mean_{key}", torch.tensor(stats[key]["mean"], dtype=torch.float32))
            std = torch.tensor(stats[key]["std"], dtype=torch.float32)
            if scale == "key":
                std = std.square().mean().sqrt().expand_as(std).clone()
            self.register_buffer(f"std_{key}", std.clamp_min(STD_FLOOR))

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the normalized keys, in a fixed order, along the last dimension."""
        return torch.cat([(obs[key].float() - getattr(self, f"mean_{key}")) / getattr(self, f"std_{key}")
                          for key in self.keys], dim=-1)


class LanguagePolicy(nn.Module):
    """RT-1 conditioned on a task vector from language, a one-hot task id or a goal.

    Interface: `reset()`, `act(obs, instruction)` for one environment, `act_batch(obs, instructions)`
    for many, and `forward(batch) -> (loss, metrics)` for training.
    """

    def __init__(self, rt1: RT1Config | dict, stats: dict, low_dim_keys: list[str], image_keys: list[str],
                 instructions: list[str], tasks: list[str], task_mode: str = "language",
                 goal_keys: list[str] | None = None, text_model: str = DEFAULT_TEXT_MODEL,
                 normalization: str = "dimension", temporal_ensemble: float | None = None):
        super().__init__()
        rt1 = RT1Config.from_dict(rt1) if isinstance(rt1, dict) else rt1
        if temporal_ensemble is not None and temporal_ensemble < 0:
            raise UserError(f"temporal_ensemble must be at least 0 (or null: off), got {temporal_ensemble}")
        self.config = {"rt1": rt1.to_dict(), "low_dim_keys": list(low_dim_keys), "image_keys": list(image_keys),
                       "instructions": list(instructions), "tasks": list(tasks), "task_mode": task_mode,
                       "goal_keys": list(goal_keys or []), "text_model": text_model,
                       "normalization": normalization, "temporal_ensemble": temporal_ensemble}
        self.stats = stats
        self.normalizer = Normalizer(stats, list(low_dim_keys), normalization)
        goal_images = [key for key in goal_keys or [] if key in image_keys]
        goal_low_dim = [key for key in goal_keys or [] if key not in image_keys]
        self.goal_normalizer = Normalizer(stats, goal_low_dim, normalization) if task_mode == "goal" else None
        goal_dim = sum(len(stats[key]["mean"]) for key in goal_low_dim)
        self.task_encoder = TaskEncoder(task_mode, instructions, tasks, goal_dim=goal_dim,
                                        goal_image_keys=goal_images, text_model=text_model)
        state_dim = sum(len(stats[key]["mean"]) for key in low_dim_keys)
        rt1 = RT1Config.from_dict({**rt1.to_dict(), "state_dim": state_dim, "image_keys": tuple(image_keys),
                                   "task_dim": self.task_encoder.dim, "action_dim": len(stats["actions"]["min"])})
        self.config["rt1"] = rt1.to_dict()
        self.net = RT1(rt1)
        self.action_tokenizer = ActionTokenizer(torch.tensor(stats["actions"]["min"]),
                                                torch.tensor(stats["actions"]["max"]), rt1.num_bins,
                                                rt1.label_sigma)
        self._history: dict[str, torch.Tensor] | None = None
        self._chunks: dict[str, torch.Tensor] | None = None

    @property
    def rt1_config(self) -> RT1Config:
        return self.net.config

    # ---- the network on batches ----------------------------------------------------------------

    def task_vector(self, batch: dict) -> torch.Tensor:
        goal, goal_images = None, None
        if self.goal_normalizer is not None:
            goal = self.goal_normalizer(batch["goal"]) if self.goal_normalizer.keys else None
            goal_images = {key: batch["goal"][key] for key in self.task_encoder.goal_image_keys}
        return self.task_encoder(instruction_id=batch.get("instruction_id"), task_id=batch.get("task_id"),
                                 goal=goal, goal_images=goal_images,
                                 instruction_vectors=batch.get("instruction_vectors"))

    def logits(self, batch: dict) -> torch.Tensor:
        obs = batch["obs"]
        state = self.normalizer(obs) if self.normalizer.keys else None
        images = {key: obs[key] for key in self.config["image_keys"]} or None
        return self.net(self.task_vector(batch), batch["obs_mask"], state=state, images=images)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Behavior-cloning loss: cross-entropy of the demonstrated actions' bins."""
        logits = self.logits(batch)
        tokenizer = self.action_tokenizer
        loss = RT1.loss(logits, tokenizer.targets(batch["actions"]), batch["action_mask"])
        with torch.no_grad():
            tokens = tokenizer.tokenize(batch["actions"])
            mask = batch["action_mask"][..., None].expand_as(tokens)
            accuracy = ((logits.argmax(-1) == tokens) & mask).sum() / mask.sum().clamp_min(1)
            error = (tokenizer.decode(logits) - batch["actions"].clamp(tokenizer.low, tokenizer.high)).abs()
            action_error = (error * mask).sum() / mask.sum().clamp_min(1)
        return loss, {"token_accuracy": accuracy, "action_l1": action_error}

    def log_likelihood(self, batch: dict, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample log-likelihood of the batch's actions, (B,): minus the cross-entropy of their target
        bins (the training loss's own term), summed over action dimensions and real chunk steps. RL's
        advantage-weighted actor update weighs these per transition. `logits`: the batch's, when computed."""
        logits = self.logits(batch) if logits is None else logits
        cross_entropy = RT1.cross_entropy(logits, self.action_tokenizer.targets(batch["actions"]))
        return -(cross_entropy.sum(-1) * batch["action_mask"]).sum(-1)

    @torch.inference_mode()
    def predict(self, batch: dict) -> torch.Tensor:
        """Action chunk in environment units, (B, K, A), decoded around the most likely bins."""
        return self.action_tokenizer.decode(self.logits(batch))

    # ---- acting in environments ------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the episode memory (observation history, recent action chunks): call at the start of every
        episode."""
        self._history = None
        self._chunks = None

    @property
    def episode_memory(self) -> tuple | None:
        """All the policy keeps between calls of its episodes (the observation history, the recent action
        chunks): a server swaps it in and out per session; None is a fresh start."""
        return None if self._history is None and self._chunks is None else (self._history, self._chunks)

    @episode_memory.setter
    def episode_memory(self, memory: tuple | None) -> None:
        self._history, self._chunks = memory or (None, None)

    @torch.inference_mode()
    def reset_envs(self, done: np.ndarray) -> None:
        """Forget the history of the environments whose episodes ended (vectorized rollouts);
        a mask for a different number of environments starts over."""
        if self._history is None or len(done) != len(self._history["mask"]):
            self._history = None
        else:
            self._history["mask"][torch.as_tensor(done, dtype=torch.bool)] = False
        if self._chunks is not None and len(done) == len(self._chunks["valid"]):
            self._chunks["valid"][torch.as_tensor(done, dtype=torch.bool)] = False
        else:
            self._chunks = None

    def _push_history(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Append this step's observation; new episodes pad their history with their first frame."""
        H = self.rt1_config.history
        if self._history is None or len(self._history["mask"]) != len(next(iter(obs.values()))):
            n = len(next(iter(obs.values())))
            self._history = {key: value[:, None].repeat_interleave(H, 1) for key, value in obs.items()}
            self._history["mask"] = torch.zeros(n, H, dtype=torch.bool)
        new = ~self._history["mask"][:, -1]
        for key, value in obs.items():
            window = self._history[key]
            window[:, :-1] = window[:, 1:].clone()
            window[:, -1] = value
            window[new] = value[new, None]
        mask = self._history["mask"]
        mask[:, :-1] = mask[:, 1:].clone()
        mask[:, -1] = True
        return self._history

    def _observation_tensors(self, observations: dict) -> dict[str, torch.Tensor]:
        keys = self.config["low_dim_keys"] + self.config["image_keys"]
        missing = [key for key in keys if key not in observations]
        if missing:
            raise UserError(f"observation has no key {missing[0]!r} (the policy needs {', '.join(keys)})")
        tensors = {}
        for key in keys:
            value = torch.as_tensor(np.asarray(observations[key]))
            tensors[key] = value if key in self.config["image_keys"] else value.float()
        return tensors

    @torch.inference_mode()
    def act_batch(self, observations: dict, instructions: list[str] | None = None,
                  task_ids: list[int] | None = None, goals: dict | None = None) -> np.ndarray:
        """One action per environment: observations {key: (N, ...)}, one instruction (or task id or
        goal) per environment -> (N, A). Keeps each environment's history until `reset`."""
        mode = self.config["task_mode"]
        if mode == "language" and instructions is None:
            raise UserError("this policy is language-conditioned: give an instruction")
        if mode == "language" and not all(isinstance(text, str) and text.strip() for text in instructions):
            raise UserError("instruction: must not be empty")
        history = self._push_history(self._observation_tensors(observations))
        batch = {"obs": {k: v for k, v in history.items() if k != "mask"}, "obs_mask": history["mask"]}
        if mode == "language":
            batch["instruction_vectors"] = torch.stack([self.task_encoder.instruction_vector(text)
                                                        for text in instructions])
        elif mode == "onehot":
            if task_ids is None:
                raise UserError("this policy is conditioned on task ids: give a task id")
            batch["task_id"] = torch.as_tensor(task_ids)
        else:
            if goals is None:
                raise UserError("this policy is goal-conditioned: give a goal observation")
            missing = [key for key in self.config["goal_keys"] if key not in goals]
            if missing:
                needed = ", ".join(self.config["goal_keys"])
                raise UserError(f"goal has no key {missing[0]!r} (the policy needs {needed})")
            batch["goal"] = {key: torch.as_tensor(np.asarray(goals[key])) for key in self.config["goal_keys"]}
        chunks = self.predict(batch)
        if self.config.get("temporal_ensemble") is None or chunks.shape[1] == 1:
            return chunks[:, 0].numpy()
        return self._ensemble(chunks, self.task_vector(batch)).numpy()

    def _ensemble(self, chunks: torch.Tensor, task_vectors: torch.Tensor) -> torch.Tensor:
        """Temporal ensembling of action chunks (ACT, Zhao et al. 2023): this step's action is the weighted
        mean of what the last K chunks predicted for it, weight exp(-decay * age in steps), so one bad
        prediction is outvoted and the motion stays smooth. A new episode or a new instruction (task
        vector) starts over, so no action planned for the previous request leaks into the next one."""
        N, K, _ = chunks.shape
        if self._chunks is None or len(self._chunks["valid"]) != N:
            self._chunks = {"chunks": chunks[:, None].repeat_interleave(K, 1),
                            "valid": torch.zeros(N, K, dtype=torch.bool), "task": task_vectors.clone()}
        memory = self._chunks
        memory["valid"][(memory["task"] != task_vectors).any(-1)] = False
        memory["task"] = task_vectors.clone()
        # memory["chunks"][:, age] is the chunk predicted `age` steps ago
        memory["chunks"] = torch.cat([chunks[:, None], memory["chunks"][:, :-1]], 1)
        memory["valid"] = torch.cat([torch.ones(N, 1, dtype=torch.bool), memory["valid"][:, :-1]], 1)
        ages = torch.arange(K)
        now = memory["chunks"][:, ages, ages]  # (N, K, A): each chunk's prediction for this step
        weights = torch.exp(-self.config["temporal_ensemble"] * ages.float()) * memory["valid"]
        return (weights[..., None] * now).sum(1) / weights.sum(1, keepdim=True)

    def act(self, observation: dict, instruction: str | None = None, task_id: int | None = None,
            goal: dict | None = None) -> np.ndarray:
        """One action for one environment, in the environment's units."""
        batched = {key: np.asarray(value)[None] for key, value in observation.items()}
        goals = {key: np.asarray(value)[None] for key, value in goal.items()} if goal is not None else None
        return self.act_batch(batched, None if instruction is None else [instruction],
                              None if task_id is None else [task_id], goals)[0]

    # ---- saving and loading -------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """model.safetensors, config.json, normalization.json and weights.sha256 (the weights' digest, in
        sha256sum's format, which loading checks). Each file is written beside its name and renamed into
        place, so a killed export never leaves a half-written file under the final name."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {key: value.contiguous() for key, value in self.state_dict().items()}
        weights = directory / "model.safetensors.partial"
        save_file(state, weights)
        weights.chmod(0o666 & ~_umask())  # as the other files: safetensors creates it private
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        weights.replace(directory / "model.safetensors")
        for name, text in (("config.json", json.dumps(self.config, indent=2)),
                           ("normalization.json", json.dumps(self.stats, indent=2)),
                           ("weights.sha256", f"{digest}  model.safetensors\n")):
            partial = directory / f"{name}.partial"
            partial.write_text(text)
            partial.replace(directory / name)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, snap_cosine: float = 0.0) -> LanguagePolicy:
        """Load an exported policy folder; anything damaged or inconsistent is one UserError naming the file.
        `snap_cosine` > 0: an unseen instruction at least that close (cosine) to a trained one is read as
        it (see TaskEncoder)."""
        if not 0.0 <= snap_cosine <= 1.0:
            raise UserError(f"snap cosine must be within 0..1 (0: off), got {snap_cosine}")
        directory = Path(directory)
        for name in ("config.json", "normalization.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise UserError(f"{directory}: not an exported policy (no {name})")
        weights = directory / "model.safetensors"
        if (directory / "weights.sha256").is_file():
            expected = (directory / "weights.sha256").read_text().split()[:1]
            if expected != [hashlib.sha256(weights.read_bytes()).hexdigest()]:
                raise UserError(f"{weights}: its SHA-256 is not the one weights.sha256 records (damaged or changed)")
        config, stats = (_read_json(directory / name) for name in ("config.json", "normalization.json"))
        try:
            policy = cls(config["rt1"], stats, config["low_dim_keys"], config["image_keys"], config["instructions"],
                         config["tasks"], config["task_mode"], config["goal_keys"], config["text_model"],
                         config.get("normalization", "dimension"), config.get("temporal_ensemble"))
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{directory / 'config.json'}: not an lcbc policy config ({type(error).__name__}: "
                            f"{error})") from None
        try:
            state = load_file(weights)
        except Exception as error:  # safetensors raises its own error types for truncated or garbled files
            raise UserError(f"{weights}: unreadable safetensors file ({str(error).splitlines()[0]})") from None
        try:
            policy.load_state_dict(state)
        except RuntimeError as error:
            detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
            raise UserError(f"{directory}: config.json and normalization.json disagree with model.safetensors "
                            f"({detail[:200]})") from None
        policy.task_encoder.snap_cosine = snap_cosine
        return policy.eval()
