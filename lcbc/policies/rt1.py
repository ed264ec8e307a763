"""RT-1-style language-conditioned policy network, in one file.

Read top to bottom:

1. ``RT1Config``       -- every size knob, with named presets.
2. ``FiLM``            -- task conditioning used everywhere below.
3. ``FiLMImageEncoder`` -- conv trunk ("small" or EfficientNet-class), FiLM after every block.
4. ``TokenLearner`` / ``ImageTokenizer`` -- feature map -> a few tokens per camera and frame.
5. ``StateTokenizer``  -- low-dimensional observation -> tokens, so state-only policies share the transformer.
6. ``Block``           -- pre-LayerNorm transformer block with a block-causal attention mask.
7. ``ActionTokenizer`` -- continuous actions <-> discrete bins (the policy is a classifier per dimension).
8. ``RT1``             -- glue: tokens of H frames -> transformer -> logits (B, K, A, num_bins).

The task (e.g. a sentence embedding of the instruction) enters only through FiLM, as in RT-1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RT1",
    "ActionTokenizer",
    "Block",
    "ConvBlock",
    "FiLM",
    "FiLMImageEncoder",
    "ImageTokenizer",
    "MBConv",
    "RT1Config",
    "SqueezeExcite",
    "StateTokenizer",
    "TokenLearner",
]


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

IMAGE_ENCODERS = ("small", "efficientnet")

PRESETS = {
    # Trains in minutes on 2 CPU cores.
    "rt1-tiny": {"width": 128, "layers": 2, "heads": 4, "image_encoder": "small"},
    # Brohan et al. 2022: FiLM-EfficientNet-B3 on 300 px, 8 tokens/image, 6 frames, 8 layers, 256 bins.
    "rt1": {
        "width": 512,
        "layers": 8,
        "heads": 8,
        "num_bins": 256,
        "image_encoder": "efficientnet",
        "history": 6,
        "image_size": 300,
    },
}


@dataclass
class RT1Config:
    """All sizes of the network. Defaults are the "rt1-tiny" transformer; pick a preset via ``preset``."""

    action_dim: int = 4
    state_dim: int = 0  # 0 = no state tokenizer
    image_keys: tuple[str, ...] = ()  # camera names; () = state-only policy
    image_size: int = 64  # square input resolution, checked in forward
    task_dim: int = 384  # size of the task / instruction embedding
    history: int = 6  # frames H seen by the transformer
    action_chunk: int = 1  # actions K predicted per step
    num_bins: int = 256
    # Std (in bins) of the Gaussian that spreads each action's target over neighbouring bins (HL-Gauss,
    # Farebrother et al. 2024); 0 = one-hot targets. See ActionTokenizer.
    label_sigma: float = 0.75
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    image_encoder: str = "small"  # "small" | "efficientnet"
    tokens_per_image: int = 8
    state_tokens: int = 2

    def __post_init__(self) -> None:
        self.image_keys = tuple(self.image_keys)
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"image_encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        for name in ("action_dim", "task_dim", "history", "action_chunk", "num_bins", "width", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.label_sigma < 0:
            raise ValueError(f"label_sigma must be >= 0, got {self.label_sigma}")

    @classmethod
    def preset(cls, name: str, **overrides) -> RT1Config:
        if name not in PRESETS:
            raise ValueError(f"unknown RT-1 preset {name!r}; valid presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RT1Config:
        # JSON turns tuples into lists; __post_init__ turns image_keys back into a tuple.
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------
# FiLM
# ---------------------------------------------------------------------------------------------------------


class FiLM(nn.Module):
    """Feature-wise affine modulation ``(1 + gamma) * x + beta`` with gamma, beta predicted from the task.

    The projection is zero-initialised so FiLM is exactly the identity at init: a pretrained or freshly
    initialised trunk is not disturbed, and the task signal is learned from there.
    """

    def __init__(self, task_dim: int, channels: int):
        super().__init__()
        self.channels = channels
        self.proj = nn.Linear(task_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, task: Tensor, channel_dim: int = 1) -> Tensor:
        """x: (N, C, h, w) with channel_dim=1, or (N, ..., C) with channel_dim=-1; task: (N, task_dim)."""
        gamma, beta = self.proj(task).chunk(2, dim=-1)  # (N, C) each
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        shape[channel_dim] = self.channels
        return x * (1 + gamma.view(shape)) + beta.view(shape)


# ---------------------------------------------------------------------------------------------------------
# Image encoder
# ---------------------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm rather than BatchNorm: no running statistics, so train and eval behave the same and the
    frames of one episode (highly correlated, often a batch on their own at inference) do not matter."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features (EfficientNet's cheap global context)."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet inverted bottleneck: 1x1 expand -> depthwise kxk -> squeeze-excite -> 1x1 project,
    residual when shapes allow. Depthwise convs keep the FLOPs low at a wide hidden size."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, se_ratio: float = 0.25):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), _norm(hidden), nn.SiLU()]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            _norm(hidden),
            nn.SiLU(),
            SqueezeExcite(hidden, max(1, int(cin * se_ratio))),
            nn.Conv2d(hidden, cout, 1, bias=False),
            _norm(cout),
        ]
        self.body = nn.Sequential(*layers)
        self.out_channels = cout
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class ConvBlock(nn.Module):
    """Basic residual block (two 3x3 convs) for the cheap "small" encoder."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            _norm(cout),
            nn.SiLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            _norm(cout),
        )
        self.out_channels = cout
        self.shortcut = (
            nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.body(x) + self.shortcut(x))


# EfficientNet-B3 stages (width x1.2, depth x1.4 of B0): (expand, kernel, stride, channels, repeats).
EFFICIENTNET_B3_STAGES = (
    (1, 3, 1, 24, 2),
    (6, 3, 2, 32, 3),
    (6, 5, 2, 48, 3),
    (6, 3, 2, 96, 5),
    (6, 5, 1, 136, 5),
    (6, 5, 2, 232, 6),
    (6, 3, 1, 384, 2),
)
EFFICIENTNET_STEM = 40
EFFICIENTNET_OUT = 512  # RT-1 maps the B3 trunk to a 512-channel feature map
SMALL_STAGES = ((64, 2), (128, 2), (128, 1))  # (channels, stride) after a 32-channel stride-2 stem


class FiLMImageEncoder(nn.Module):
    """uint8 images (N, h, w, 3) -> FiLM-conditioned feature map (N, C, h', w').

    FiLM after every block lets the instruction steer *what* the trunk extracts ("early fusion"), which is
    what makes 8 tokens per image enough. "small": stride 8, 128 channels, cheap on CPU for 64 px inputs.
    "efficientnet": EfficientNet-B3-class MBConv trunk, stride 32, 512 channels, as in RT-1.
    """

    def __init__(self, variant: str, task_dim: int):
        super().__init__()
        if variant == "small":
            stem = 32
            self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False), _norm(stem), nn.SiLU())
            blocks, cin = [], stem
            for cout, stride in SMALL_STAGES:
                blocks.append(ConvBlock(cin, cout, stride))
                cin = cout
            self.head: nn.Module = nn.Identity()
            self.out_channels = cin
        elif variant == "efficientnet":
            stem = EFFICIENTNET_STEM
            self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False), _norm(stem), nn.SiLU())
            blocks, cin = [], stem
            for expand, kernel, stride, cout, repeats in EFFICIENTNET_B3_STAGES:
                for i in range(repeats):
                    blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                    cin = cout
            out = EFFICIENTNET_OUT
            self.head = nn.Sequential(nn.Conv2d(cin, out, 1, bias=False), _norm(out), nn.SiLU())
            self.out_channels = out
        else:
            raise ValueError(f"image encoder must be one of {IMAGE_ENCODERS}, got {variant!r}")
        self.blocks = nn.ModuleList(blocks)
        self.films = nn.ModuleList(FiLM(task_dim, b.out_channels) for b in blocks)

    def forward(self, images: Tensor, task: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2)  # (N, 3, h, w), channel-first view
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = self.stem(x)
        for block, film in zip(self.blocks, self.films):
            x = film(block(x), task)
        return self.head(x)


class TokenLearner(nn.Module):
    """Feature map (N, C, h, w) -> (N, num_tokens, C) via learned spatial attention (Ryoo et al. 2021).

    Each token is a softmax-weighted average over locations, so the number of tokens (and the transformer's
    cost) is independent of the image resolution, and the weights adapt to where the task-relevant objects are.
    """

    def __init__(self, channels: int, num_tokens: int = 8, hidden: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, num_tokens))

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, C)
        weights = self.attn(self.norm(x)).softmax(dim=1)  # (N, h*w, num_tokens), sums to 1 over space
        return weights.transpose(1, 2) @ x  # (N, num_tokens, C)


class ImageTokenizer(nn.Module):
    """uint8 images (N, h, w, 3) + task (N, task_dim) -> (N, tokens_per_image, width)."""

    def __init__(self, variant: str, task_dim: int, width: int, num_tokens: int):
        super().__init__()
        self.encoder = FiLMImageEncoder(variant, task_dim)
        self.token_learner = TokenLearner(self.encoder.out_channels, num_tokens)
        self.proj = nn.Linear(self.encoder.out_channels, width)

    def forward(self, images: Tensor, task: Tensor) -> Tensor:
        return self.proj(self.token_learner(self.encoder(images, task)))


# ---------------------------------------------------------------------------------------------------------
# State tokenizer
# ---------------------------------------------------------------------------------------------------------


class StateTokenizer(nn.Module):
    """Normalised low-dimensional observation (N, ..., state_dim) -> (N, ..., num_tokens, width), FiLM'd on
    the task (N, task_dim); the leading dims after N (e.g. history frames) share one FiLM computation.

    Gives proprioceptive / object-state inputs the same token interface as images, so state-only, image-only
    and mixed policies all run through the same transformer.
    """

    def __init__(self, state_dim: int, task_dim: int, width: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.width = num_tokens, width
        self.mlp = nn.Sequential(nn.Linear(state_dim, width), nn.GELU(), nn.Linear(width, num_tokens * width))
        self.film = FiLM(task_dim, width)

    def forward(self, state: Tensor, task: Tensor) -> Tensor:
        tokens = self.mlp(state).unflatten(-1, (self.num_tokens, self.width))
        return self.film(tokens, task, channel_dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention on F.scaled_dot_product_attention (fused kernels on CPU and GPU)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (B, S, W); mask: bool, True = may attend, broadcastable to (B, heads, S, S)."""
        B, S, W = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, S, W)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: stable to train without warm-up tricks at these depths."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


# ---------------------------------------------------------------------------------------------------------
# Action tokenizer
# ---------------------------------------------------------------------------------------------------------


class ActionTokenizer(nn.Module):
    """Uniform per-dimension binning of actions between ``low`` and ``high`` (shape (A,)).

    Discrete bins turn regression into classification, which models multi-modal demonstrations (the policy
    can put mass on "left" and "right" without averaging to "straight"). With one-hot targets, though, a bin
    next to the right one costs as much as a bin at the other end, so between the demonstrated states the
    prediction may jump anywhere. ``label_sigma > 0`` spreads each target over neighbouring bins as a
    Gaussian (HL-Gauss): nearby bins become nearly right, the classifier interpolates like a regressor, and
    decoding reads the mean of the mode's neighbourhood, finer than one bin. Bounds are buffers so they move
    with ``.to(device)`` and are saved in the state dict.
    """

    def __init__(self, low: Tensor, high: Tensor, num_bins: int = 256, label_sigma: float = 0.0):
        super().__init__()
        low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        if low.shape != high.shape or low.dim() != 1:
            raise ValueError(f"low and high must both have shape (A,), got {tuple(low.shape)}, {tuple(high.shape)}")
        if (high < low).any():
            raise ValueError("high must be >= low in every dimension")
        self.num_bins, self.label_sigma = num_bins, label_sigma
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    @property
    def bin_width(self) -> Tensor:
        return (self.high - self.low) / self.num_bins

    def _position(self, actions: Tensor) -> Tensor:
        """(..., A) float -> position in bin units, clipped to [0, num_bins]."""
        x = torch.minimum(torch.maximum(actions, self.low), self.high)
        return (x - self.low) / (self.high - self.low).clamp_min(1e-12) * self.num_bins

    def tokenize(self, actions: Tensor) -> Tensor:
        """(..., A) float -> (..., A) long in [0, num_bins); values outside the bounds are clipped first."""
        return self._position(actions).floor().long().clamp_(0, self.num_bins - 1)

    def detokenize(self, tokens: Tensor) -> Tensor:
        """(..., A) long -> (..., A) float at the bin centres (round-trip error <= half a bin width)."""
        return self.low + (tokens.float() + 0.5) * self.bin_width

    def targets(self, actions: Tensor) -> Tensor:
        """(..., A) float -> (..., A, num_bins) target distribution: the mass a Gaussian centred on the action
        (std ``label_sigma`` bins) puts in each bin, renormalized; one-hot when ``label_sigma`` is 0."""
        tokens = self.tokenize(actions)
        if self.label_sigma == 0:
            return F.one_hot(tokens, self.num_bins).float()
        # Only the bins within 4 sigma get mass (the rest is < 1e-4): erf of a few edges, scattered.
        radius = math.ceil(4 * self.label_sigma)
        bins = tokens[..., None] + torch.arange(-radius, radius + 1, device=actions.device)
        edges = torch.cat([bins, bins[..., -1:] + 1], dim=-1).float()
        z = (edges - self._position(actions.float())[..., None]) / (self.label_sigma * math.sqrt(2))
        inside = (bins >= 0) & (bins < self.num_bins)
        mass = torch.diff(torch.special.erf(z), dim=-1) * inside
        mass = mass / mass.sum(-1, keepdim=True)
        targets = torch.zeros(*actions.shape, self.num_bins, device=actions.device)
        return targets.scatter_add_(-1, bins.clamp(0, self.num_bins - 1), mass)

    def expectation(self, logits: Tensor) -> Tensor:
        """(..., A, num_bins) logits -> (..., A): the mean action under all the bins' probabilities. Unlike
        `decode` it moves with every bin's probability, so a gradient through it can carry the mode anywhere."""
        centres = torch.arange(self.num_bins, device=logits.device) + 0.5
        return self.low + (logits.float().softmax(-1) * centres).sum(-1) * self.bin_width

    def decode(self, logits: Tensor) -> Tensor:
        """(..., A, num_bins) logits -> (..., A) actions: the probability-weighted mean of the bin centres
        within 3 sigma of the most likely bin (the bin centre itself for one-hot training). Staying near
        the mode keeps multi-modal predictions from averaging into an action no demonstration took."""
        mode = logits.argmax(-1)
        radius = math.ceil(3 * self.label_sigma)
        if radius == 0:
            return self.detokenize(mode)
        offsets = torch.arange(-radius, radius + 1, device=logits.device)
        window = mode[..., None] + offsets
        inside = (window >= 0) & (window < self.num_bins)
        window = window.clamp(0, self.num_bins - 1)
        probs = logits.float().softmax(-1).gather(-1, window) * inside
        position = (probs * (window.float() + 0.5)).sum(-1) / probs.sum(-1).clamp_min(1e-12)
        return self.low + position * self.bin_width


# ---------------------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------------------


class RT1(nn.Module):
    """Tokens of H frames -> block-causal transformer -> per-dimension action-bin logits.

    Each frame contributes T tokens (``tokens_per_image`` per camera, then ``state_tokens``). Attention is
    block-causal: a token of frame t sees all tokens of frames <= t. Padded history frames (``frame_mask``
    False) are masked out as keys; every token may always attend to itself, so no query row is ever fully
    masked (no NaNs), and padded content can never leak into real tokens.

    Readout: one learned readout token is appended to the last frame. It sees every real token and no other
    token attends to it, so it is a dedicated summary instead of an average of tokens that also have to
    represent their own patch or state. Only the last frame's action is predicted, so one such token is enough.
    """

    def __init__(self, config: RT1Config):
        super().__init__()
        c = self.config = config
        if c.state_dim <= 0 and not c.image_keys:
            raise ValueError("RT1 needs observations: set state_dim > 0 and/or image_keys")
        self.image_tokenizer = (
            ImageTokenizer(c.image_encoder, c.task_dim, c.width, c.tokens_per_image) if c.image_keys else None
        )
        self.state_tokenizer = (
            StateTokenizer(c.state_dim, c.task_dim, c.width, c.state_tokens) if c.state_dim > 0 else None
        )
        self.tokens_per_frame = len(c.image_keys) * c.tokens_per_image + (c.state_tokens if c.state_dim > 0 else 0)
        T, H = self.tokens_per_frame, c.history

        self.frame_pos = nn.Parameter(torch.randn(H, 1, c.width) * 0.02)
        self.token_pos = nn.Parameter(torch.randn(1, T, c.width) * 0.02)
        self.readout = nn.Parameter(torch.randn(1, 1, c.width) * 0.02)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.action_chunk * c.action_dim * c.num_bins)
        # Zero head: training starts from the uniform prediction, loss exactly log(num_bins).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

        # Static part of the attention mask over S = H*T + 1 tokens (the readout belongs to the last frame).
        token_frame = torch.arange(H).repeat_interleave(T)
        token_frame = torch.cat([token_frame, torch.tensor([H - 1])])
        allowed = token_frame[:, None] >= token_frame[None, :]  # (query, key): block-causal
        allowed[:-1, -1] = False  # nobody but the readout itself looks at the readout token
        self.register_buffer("token_frame", token_frame, persistent=False)
        self.register_buffer("allowed", allowed, persistent=False)
        self.register_buffer("eye", torch.eye(len(token_frame), dtype=torch.bool), persistent=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _tokens(self, task: Tensor, B: int, H: int, state: Tensor | None, images: dict[str, Tensor] | None):
        """Per-frame observation tokens (B, H, T, width)."""
        c, tokens = self.config, []
        if self.image_tokenizer is not None:
            if images is None or any(k not in images for k in c.image_keys):
                raise KeyError(f"images must contain cameras {c.image_keys}, got {list(images or {})}")
            x = torch.stack([images[k] for k in c.image_keys], dim=2)  # (B, H, cams, h, w, 3)
            if x.shape[:2] != (B, H) or x.shape[3:] != (c.image_size, c.image_size, 3):
                raise ValueError(f"images must be (B, H, {c.image_size}, {c.image_size}, 3), got {tuple(x.shape)}")
            cams = x.shape[2]
            task_rep = task[:, None, None].expand(B, H, cams, -1).reshape(B * H * cams, -1)
            t = self.image_tokenizer(x.reshape(B * H * cams, *x.shape[3:]), task_rep)
            tokens.append(t.view(B, H, cams * c.tokens_per_image, c.width))
        if self.state_tokenizer is not None:
            if state is None or state.shape != (B, H, c.state_dim):
                got = None if state is None else tuple(state.shape)
                raise ValueError(f"state must be (B, H, {c.state_dim}) = ({B}, {H}, {c.state_dim}), got {got}")
            tokens.append(self.state_tokenizer(state.float(), task))  # (B, H, state_tokens, W)
        return tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=2)

    def forward(
        self,
        task: Tensor,
        frame_mask: Tensor,
        state: Tensor | None = None,
        images: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """task (B, task_dim); frame_mask (B, H) bool, True = real frame (the last one always is);
        state (B, H, state_dim) float; images {camera: (B, H, h, w, 3) uint8} -> logits (B, K, A, num_bins).
        """
        c = self.config
        B, H = frame_mask.shape
        if H != c.history:
            raise ValueError(f"expected history {c.history} frames, got {H} (pad at the start with frame_mask)")
        task = task.float()

        x = self._tokens(task, B, H, state, images) + self.frame_pos + self.token_pos  # (B, H, T, W)
        x = torch.cat([x.reshape(B, H * self.tokens_per_frame, c.width), self.readout.expand(B, 1, -1)], dim=1)
        x = self.drop(x)

        key_real = frame_mask.bool()[:, self.token_frame]  # (B, S)
        mask = (self.allowed & key_real[:, None, :]) | self.eye  # (B, S, S); diagonal keeps rows non-empty
        mask = mask[:, None]  # broadcast over heads
        for block in self.blocks:
            x = block(x, mask)

        logits = self.head(self.ln_f(x[:, -1]))
        return logits.view(B, c.action_chunk, c.action_dim, c.num_bins)

    @staticmethod
    def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
        """Per-entry cross-entropy (B, K, A) of logits (B, K, A, bins) against target distributions over
        bins (ActionTokenizer.targets)."""
        return -(targets * logits.float().log_softmax(-1)).sum(-1)

    @staticmethod
    def loss(logits: Tensor, targets: Tensor, action_mask: Tensor) -> Tensor:
        """Masked mean cross-entropy over real (batch, chunk) entries and all action dimensions.

        logits (B, K, A, bins); targets (B, K, A, bins), a distribution over bins (ActionTokenizer.targets);
        action_mask (B, K) bool, True = real action (chunk steps past the episode end are False).
        """
        ce = RT1.cross_entropy(logits, targets)
        weights = action_mask.to(ce.dtype)[..., None].expand_as(ce)
        return (ce * weights).sum() / weights.sum().clamp_min(1.0)
