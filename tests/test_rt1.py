import json
import math

import pytest
import torch
import torch.nn.functional as F

from lcbc.policies.rt1 import RT1, ActionTokenizer, FiLM, RT1Config

B, STATE_DIM, TASK_DIM = 2, 7, 384


def _inputs(cfg: RT1Config, batch: int = B, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    H = cfg.history
    task = torch.randn(batch, cfg.task_dim, generator=g)
    frame_mask = torch.ones(batch, H, dtype=torch.bool)
    frame_mask[0, : H // 2] = False  # first sample starts mid-history: padded frames
    state = torch.randn(batch, H, cfg.state_dim, generator=g) if cfg.state_dim else None
    images = {
        k: torch.randint(0, 256, (batch, H, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8, generator=g)
        for k in cfg.image_keys
    } or None
    return task, frame_mask, state, images


def _randomize_zero_inits(model: RT1) -> None:
    """FiLM and the action head start at zero (identity / uniform logits); perturb them so tests that compare
    logits are not trivially satisfied by all-zero outputs."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, FiLM):
            torch.nn.init.normal_(m.proj.weight, std=0.02)
    torch.nn.init.normal_(model.head.weight, std=0.02)


OBSERVATIONS = {
    "state": {"state_dim": STATE_DIM},
    "images": {"image_keys": ("front",)},
    "state+images": {"state_dim": STATE_DIM, "image_keys": ("front", "wrist")},
}


@pytest.mark.parametrize("preset", ["rt1-tiny", "rt1"])
@pytest.mark.parametrize("obs", list(OBSERVATIONS))
def test_output_shapes(preset, obs):
    torch.manual_seed(0)
    cfg = RT1Config.preset(preset, image_size=64, action_dim=5, action_chunk=3, **OBSERVATIONS[obs])
    model = RT1(cfg).eval()
    with torch.no_grad():
        logits = model(*_inputs(cfg))
    assert logits.shape == (B, 3, 5, cfg.num_bins)
    assert torch.isfinite(logits).all()
    # Zero-initialised head: training starts from the uniform prediction.
    targets = F.one_hot(torch.randint(0, cfg.num_bins, (B, 3, 5)), cfg.num_bins).float()
    loss = RT1.loss(logits, targets, torch.ones(B, 3, dtype=torch.bool))
    assert loss.item() == pytest.approx(math.log(cfg.num_bins), rel=1e-5)


def test_film_identity_at_init():
    film = FiLM(TASK_DIM, 16)
    task = torch.randn(3, TASK_DIM)
    x = torch.randn(3, 16, 5, 5)
    assert torch.equal(film(x, task), x)
    tokens = torch.randn(3, 4, 6, 16)
    assert torch.equal(film(tokens, task, channel_dim=-1), tokens)
    torch.nn.init.normal_(film.proj.weight)
    assert not torch.equal(film(x, task), x)


def test_action_tokenizer_round_trip():
    low = torch.tensor([-1.0, 0.0, -0.5, 10.0])
    high = torch.tensor([1.0, 2.0, 0.5, 30.0])
    tok = ActionTokenizer(low, high, num_bins=256)
    actions = low + (high - low) * torch.rand(1000, 3, 4)
    tokens = tok.tokenize(actions)
    assert tokens.dtype == torch.long and tokens.shape == actions.shape
    assert tokens.min() >= 0 and tokens.max() <= 255
    err = (tok.detokenize(tokens) - actions).abs()
    assert (err <= tok.bin_width / 2 + 1e-5).all()
    # Bounds map to the outer bins; out-of-range actions are clipped first.
    assert tok.tokenize(low).eq(0).all() and tok.tokenize(high).eq(255).all()
    assert torch.equal(tok.tokenize(high + 5), tok.tokenize(high))
    assert torch.equal(tok.tokenize(low - 5), tok.tokenize(low))
    assert set(dict(tok.named_buffers())) == {"low", "high"}
    # One-hot targets decode to the bin centre.
    torch.testing.assert_close(tok.decode(tok.targets(actions).log()), tok.detokenize(tokens))


def test_gaussian_targets_decode_finer_than_a_bin():
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 4.0])
    tok = ActionTokenizer(low, high, num_bins=64, label_sigma=0.75)
    actions = low + (high - low) * (0.05 + 0.9 * torch.rand(500, 2))  # away from the clipped ends
    targets = tok.targets(actions)
    torch.testing.assert_close(targets.sum(-1), torch.ones(500, 2))
    # The mass sits around the action's own bin, symmetric within a bin: its mean is the action.
    assert (targets.argmax(-1) - tok.tokenize(actions)).abs().max() <= 1
    err = (tok.decode(targets.log()) - actions).abs()
    assert (err < 0.05 * tok.bin_width).all(), err.max()
    # At the bounds the mass that would fall outside stays out: the outer bin holds the most.
    edge = tok.targets(torch.stack([low, high]))
    torch.testing.assert_close(edge.sum(-1), torch.ones(2, 2))
    assert edge[0].argmax(-1).eq(0).all() and edge[1].argmax(-1).eq(63).all()
    # A second mode far away does not pull the decoded action towards it.
    logits = targets.log()[:1].clone()
    far = (tok.tokenize(actions[:1]) + 32) % 64
    logits.scatter_(-1, far[..., None], 0.0)  # a strong bin 32 bins away
    mode = logits.argmax(-1)
    decoded = tok.decode(logits)
    assert ((decoded - tok.detokenize(mode)).abs() <= 4 * tok.bin_width).all()


@pytest.mark.parametrize("obs", list(OBSERVATIONS))
def test_padded_frames_do_not_change_logits(obs):
    torch.manual_seed(0)
    cfg = RT1Config.preset("rt1-tiny", image_size=32, **OBSERVATIONS[obs])
    model = RT1(cfg).eval()
    _randomize_zero_inits(model)
    task, frame_mask, state, images = _inputs(cfg)
    padded = ~frame_mask  # sample 0, first H // 2 frames

    def edit(frames):
        """Copy of the observations with new content in the given (B, H) frames."""
        s = None if state is None else torch.where(frames[..., None], torch.randn_like(state) * 5, state)
        im = None
        if images is not None:
            im = {k: torch.where(frames[..., None, None, None], 255 - v, v) for k, v in images.items()}
        return s, im

    with torch.no_grad():
        ref = model(task, frame_mask, state, images)
        out_padded = model(task, frame_mask, *edit(padded))
        real = torch.zeros_like(frame_mask)
        real[0, -2] = True  # a real frame of sample 0
        out_real = model(task, frame_mask, *edit(real))
    torch.testing.assert_close(out_padded, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(out_real[0], ref[0], atol=1e-4)  # the check above is not vacuous
    torch.testing.assert_close(out_real[1], ref[1], rtol=0, atol=1e-6)  # samples stay independent


def test_attention_mask_is_block_causal():
    cfg = RT1Config.preset("rt1-tiny", state_dim=STATE_DIM, history=3, state_tokens=2)
    allowed = RT1(cfg).allowed  # (S, S) query x key, S = 3 frames * 2 tokens + readout
    frame = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.equal(allowed[:6, :6], frame[:, None] >= frame[None, :])
    assert allowed[-1].all()  # readout sees everything
    assert not allowed[:-1, -1].any()  # and nothing sees the readout


def test_loss_ignores_masked_actions():
    logits = torch.randn(3, 2, 4, 16)
    tokens = torch.randint(0, 16, (3, 2, 4))
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    loss = RT1.loss(logits, F.one_hot(tokens, 16).float(), mask)
    other = tokens.clone()
    other[~mask] = (other[~mask] + 1) % 16
    assert torch.equal(loss, RT1.loss(logits, F.one_hot(other, 16).float(), mask))
    expected = F.cross_entropy(logits[mask].flatten(0, 1), tokens[mask].flatten())
    torch.testing.assert_close(loss, expected)


def test_tiny_model_overfits_fixed_batch():
    torch.manual_seed(0)
    cfg = RT1Config.preset("rt1-tiny", state_dim=STATE_DIM, action_chunk=2, dropout=0.0)
    model = RT1(cfg)
    task, frame_mask, state, _ = _inputs(cfg, batch=4)
    targets = F.one_hot(torch.randint(0, cfg.num_bins, (4, cfg.action_chunk, cfg.action_dim)), cfg.num_bins).float()
    action_mask = torch.ones(4, cfg.action_chunk, dtype=torch.bool)
    action_mask[0, -1] = False
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = RT1.loss(model(task, frame_mask, state), targets, action_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_config_dict_round_trip():
    cfg = RT1Config.preset("rt1", image_keys=("front", "wrist"), state_dim=9, action_chunk=4)
    restored = RT1Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert isinstance(restored.image_keys, tuple)


def test_presets_and_validation():
    tiny, full = RT1Config.preset("rt1-tiny"), RT1Config.preset("rt1", history=4)
    assert (tiny.width, tiny.layers, tiny.heads, tiny.image_encoder) == (128, 2, 4, "small")
    assert (full.width, full.layers, full.heads, full.num_bins) == (512, 8, 8, 256)
    assert full.image_encoder == "efficientnet" and full.history == 4
    with pytest.raises(ValueError, match="rt1-tiny"):
        RT1Config.preset("rt2")
    with pytest.raises(ValueError):
        RT1(RT1Config())  # no observations at all
    with pytest.raises(ValueError):
        RT1Config(image_encoder="resnet")
    model = RT1(RT1Config.preset("rt1-tiny", state_dim=STATE_DIM))
    task, frame_mask, state, _ = _inputs(model.config)
    with pytest.raises(ValueError):
        model(task, frame_mask[:, 1:], state[:, 1:])  # wrong history length
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
