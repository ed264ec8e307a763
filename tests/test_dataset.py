"""DemoDataset windows, pad masks, goal relabeling, vocabularies, splits and image reading."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from lcbc.benchmark import load_benchmark
from lcbc.benchmarks.metaworld import instruction_table
from lcbc.benchmarks.metaworld.augment import StateAugmentation
from lcbc.benchmarks.metaworld.env import FINGERTIP_OFFSET
from lcbc.data.augment import StateGoalRelabeling
from lcbc.data.datamodule import DemoDataModule
from lcbc.data.dataset import DemoDataset, split_demos
from lcbc.errors import UserError
from tests.conftest import write_demo_file


def step_of(state_value):
    """Synthetic files store t + 100 * demo in obs/state; returns (demo, t)."""
    return int(state_value) // 100, int(state_value) % 100


def test_history_and_chunk_padding_at_episode_edges(demo_file):
    ds = DemoDataset(demo_file, history=3, action_chunk=4)
    assert len(ds) == 16  # demos of 5, 8 and 3 steps
    batch = ds.__getitems__([0, 1, 4, 5, 13, 15])
    state = batch["obs"]["state"][..., 0]
    # Step 0 of demo 0: history padded with the first frame, masked.
    assert state[0].tolist() == [0, 0, 0] and batch["obs_mask"][0].tolist() == [False, False, True]
    assert state[1].tolist() == [0, 0, 1] and batch["obs_mask"][1].tolist() == [False, True, True]
    # Last step of demo 0: the action chunk is padded with the last action, masked.
    assert batch["action_mask"][2].tolist() == [True, False, False, False]
    assert torch.equal(batch["actions"][2, 1], batch["actions"][2, 0])
    # First step of demo 1 never sees demo 0.
    assert state[3].tolist() == [100, 100, 100] and batch["obs_mask"][3].tolist() == [False, False, True]
    # Demo 2 (3 steps): its last step has a full history.
    assert state[5].tolist() == [200, 201, 202] and batch["obs_mask"][5].all()
    assert batch["action_mask"][4].tolist() == [True, True, True, False]


def test_actions_match_file(demo_file):
    import h5py

    ds = DemoDataset(demo_file, action_chunk=2, clip_actions=None)
    with h5py.File(demo_file) as f:
        expected = f["data/demo_1/actions"][2:4]
    np.testing.assert_allclose(ds.__getitems__([7])["actions"][0].numpy(), expected)


@pytest.mark.parametrize("cap", [None, 1, 3])
def test_future_goals_are_later_steps_of_the_same_demo_within_the_cap(demo_file, cap):
    ds = DemoDataset(demo_file, goal="future", goal_max_distance=cap)
    torch.manual_seed(0)
    indices = np.repeat(np.arange(len(ds)), 50)
    batch = ds.__getitems__(indices)
    seen_offsets = set()
    for current, goal in zip(batch["obs"]["state"][:, -1, 0], batch["goal"]["state"][:, 0]):
        (demo, t), (goal_demo, goal_t) = step_of(current), step_of(goal)
        last = ds.lengths[demo] - 1
        assert goal_demo == demo
        if t == last:
            assert goal_t == t
        else:
            assert t < goal_t <= (last if cap is None else min(last, t + cap))
            seen_offsets.add(goal_t - t)
    assert seen_offsets == set(range(1, (7 if cap is None else cap) + 1))  # every allowed distance occurs


def test_final_and_segment_end_goals(demo_file):
    final = DemoDataset(demo_file, goal="final").__getitems__([0, 6])["goal"]["state"][:, 0]
    assert final.tolist() == [4, 107]
    segment = DemoDataset(demo_file, goal="segment_end", goal_max_distance=2).__getitems__([0, 3, 4])
    assert segment["goal"]["state"][:, 0].tolist() == [2, 4, 4]


def test_bad_window_arguments(demo_file):
    with pytest.raises(UserError, match="history"):
        DemoDataset(demo_file, history=0)
    with pytest.raises(UserError, match="goal"):
        DemoDataset(demo_file, goal="sometime")
    with pytest.raises(UserError, match="obs/wrist"):
        DemoDataset(demo_file, obs_keys=["wrist"])


def test_task_and_instruction_ids(tmp_path):
    path = write_demo_file(tmp_path / "d.hdf5", lengths=(3, 3, 3, 3), instructions=["open the drawer", "reach"],
                           tasks=["drawer-open-v3", "reach-v3"])
    ds = DemoDataset(path, train_paraphrases=2, paraphrases={task: list(instruction_table()[task][1:])
                                                              for task in ("drawer-open-v3", "reach-v3")})
    assert ds.tasks == ["drawer-open-v3", "reach-v3"]
    assert len(ds.instructions) == 6  # two instructions, two paraphrases each
    batch = ds.__getitems__(np.repeat([0, 3], 200))
    assert batch["task_id"][:200].eq(0).all() and batch["task_id"][200:].eq(1).all()
    first = {ds.instructions[i] for i in batch["instruction_id"][:200].tolist()}
    assert "open the drawer" in first and len(first) == 3 and "reach" not in first


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_state_goals_relabeled_to_goals_achieved_later(tmp_path, share):
    path = write_demo_file(tmp_path / "d.hdf5", lengths=(6, 6, 6), state_dim=10, instructions=["x"],
                           tasks=["reach-v3", "push-v3", "drawer-open-v3"])
    ds = DemoDataset(path, history=2, augmentation=StateGoalRelabeling(load_benchmark("metaworld:MT10"), share))
    # Dimension k of global step g holds g + 1000 k, so every number says where it was read from.
    ds.low_dim["state"] = np.arange(len(ds))[:, None] + 1000.0 * np.arange(10)
    stored = ds.low_dim["state"].copy()
    torch.manual_seed(0)
    steps = np.repeat(np.arange(len(ds)), 40)
    state = ds.__getitems__(steps)["obs"]["state"].numpy()
    history = ds.window_indices(steps)["history"]
    np.testing.assert_array_equal(state[..., :7], stored[history, :7])  # only the goal changes
    # reach: the fingertips below the hand (dims 0-2); push: the object (dims 4-6).
    achieved = {"reach-v3": (0, np.array(FINGERTIP_OFFSET)), "push-v3": (4, np.zeros(3))}
    relabeled = np.zeros(len(steps), bool)
    for i, step in enumerate(steps):
        demo = ds.step_demo[step]
        goal = state[i, :, 7:]
        if not np.array_equal(goal, stored[history[i], 7:]):
            relabeled[i] = True
            source, offset = achieved[ds.tasks[ds.demo_task[demo]]]
            later = round(goal[0, 0] - offset[0] - 1000 * source)
            assert step < later < ds.demo_end[demo]  # a later step of the same demo
            expected = stored[later, source:source + 3] + offset
            np.testing.assert_allclose(goal, np.tile(expected, (2, 1)), rtol=0, atol=1e-3)
    eligible = np.isin(ds.step_demo[steps], [0, 1]) & (steps < ds.demo_end[ds.step_demo[steps]] - 1)
    assert not relabeled[~eligible].any()  # drawer-open, and the last step of every demo, keep their goal
    assert relabeled[eligible].mean() == pytest.approx(share, abs=0.06)
    np.testing.assert_array_equal(ds.low_dim["state"], stored)  # the loaded data is never overwritten
    with pytest.raises(UserError, match="relabel_state_goals"):
        StateGoalRelabeling(load_benchmark("metaworld:MT10"), 1.5)


def test_state_goal_relabeling_needs_a_benchmark_and_leaves_other_tasks_alone(tmp_path):
    path = write_demo_file(tmp_path / "d.hdf5", lengths=(6, 6), state_dim=10, instructions=["x"],
                           tasks=["drawer-open-v3", "door-open-v3"])
    with pytest.raises(UserError, match="needs data.benchmark"):
        DemoDataModule(str(path), relabel_state_goals=0.5)
    data = DemoDataModule(str(path), benchmark="metaworld:MT10", relabel_state_goals=1.0, val_fraction=0.0)
    data.setup()
    steps = np.arange(len(data.train_set))
    stored = data.train_set.low_dim["state"][data.train_set.window_indices(steps)["history"]]
    np.testing.assert_array_equal(data.train_set.__getitems__(steps)["obs"]["state"].numpy(), stored)


def test_ignored_objects_come_from_random_demos_of_the_same_task(tmp_path):
    path = write_demo_file(tmp_path / "d.hdf5", lengths=(4, 4, 4, 4), state_dim=39, instructions=["x"],
                           tasks=["reach-v3", "push-v3"])
    ds = DemoDataset(path, history=2, augmentation=StateAugmentation(shuffle_ignored_objects=True))
    ds.low_dim["state"] = np.arange(len(ds))[:, None] + 1000.0 * np.arange(39)  # g + 1000 k, as above
    stored = ds.low_dim["state"].copy()
    torch.manual_seed(0)
    steps = np.repeat(np.arange(len(ds)), 30)
    state = ds.__getitems__(steps)["obs"]["state"].numpy()
    expected = stored[ds.window_indices(steps)["history"]]
    objects = np.r_[4:18, 22:36]
    kept = np.setdiff1d(np.arange(39), objects)
    np.testing.assert_array_equal(state[..., kept], expected[..., kept])
    reach = ds.demo_task[ds.step_demo[steps]] == ds.tasks.index("reach-v3")
    np.testing.assert_array_equal(state[~reach], expected[~reach])  # push needs its own object
    donors = state[reach][:, :, 4] - 4000  # the step each window's object was read from
    assert (donors == donors[:, :1]).all()  # one donor step for every frame and every span
    np.testing.assert_array_equal(state[reach][..., objects], stored[donors.astype(int)][..., objects])
    donor_demos = ds.step_demo[donors[:, 0].astype(int)]
    assert {ds.tasks[ds.demo_task[d]] for d in donor_demos} == {"reach-v3"}
    assert (donor_demos != ds.step_demo[steps[reach]]).mean() > 0.3  # mostly another demo's object
    np.testing.assert_array_equal(ds.low_dim["state"], stored)


def test_shifted_windows_move_hand_puck_and_goal_together_in_xy(tmp_path):
    """push moves along x and y, peg-insert-side along y only (its expert aims at a fixed x), the drawer not."""
    path = write_demo_file(tmp_path / "d.hdf5", lengths=(5, 5, 5), state_dim=39, instructions=["x"],
                           tasks=["push-v3", "drawer-open-v3", "peg-insert-side-v3"])
    ds = DemoDataset(path, history=3, augmentation=StateAugmentation(shift_xy=0.05))
    torch.manual_seed(0)
    steps = np.repeat(np.arange(len(ds)), 20)
    state = ds.__getitems__(steps)["obs"]["state"].numpy().astype(np.float64)
    change = state - ds.low_dim["state"][ds.window_indices(steps)["history"]]
    task = np.array(ds.tasks)[ds.demo_task[ds.step_demo[steps]]]
    assert (change[task == "drawer-open-v3"] == 0).all()
    xy = np.r_[0:2, 4:6, 18:20, 22:24, 36:38]  # hand, puck, their previous frame, goal
    for name in ("push-v3", "peg-insert-side-v3"):
        moved = change[task == name]
        shift = moved[:, :1, :2]  # each window's own offset
        np.testing.assert_allclose(moved[..., xy], np.tile(shift, (1, 3, 5)), atol=1e-5)
        assert (moved[..., np.setdiff1d(np.arange(39), xy)] == 0).all()  # heights, gripper, quaternions
        assert np.abs(shift[..., 1]).max() <= 0.05 and np.abs(shift[..., 1]).max() > 0.04
        assert len(np.unique(shift[:, 0, 1])) > 50
        assert (np.abs(shift[..., 0]).max() > 0.04) == (name == "push-v3")
    with pytest.raises(UserError, match="shift_xy"):
        StateAugmentation(shift_xy=-0.1)


def test_shifted_images_move_each_window_as_a_whole(tmp_path):
    path = write_demo_file(tmp_path / "img.hdf5", lengths=(6, 9), image_size=8)
    with h5py.File(path, "r+") as file:  # channel 0 names the pixel, channel 1 the frame
        for name in file["data"]:
            images = file["data"][name]["obs"]["agentview_image"]
            pattern = np.zeros(images.shape, np.uint8)
            pattern[..., 0] = np.arange(64).reshape(8, 8)
            pattern[..., 1] = np.arange(len(images))[:, None, None]
            images[...] = pattern
    plain = DemoDataset(path, history=2, cache_images=True)
    shifted = DemoDataset(path, history=2, cache_images=True, shift_images=2)
    steps = np.repeat(np.arange(len(plain)), 10)
    torch.manual_seed(0)
    before = plain.__getitems__(steps)["obs"]["agentview_image"].numpy()
    after = shifted.__getitems__(steps)["obs"]["agentview_image"].numpy()
    np.testing.assert_array_equal(after[..., 1], before[..., 1])  # the same frames
    offsets = set()
    for window, moved in zip(before, after):
        row, col = divmod(int(moved[0, 4, 4, 0]), 8)  # where the centre pixel came from
        dy, dx = row - 4, col - 4
        assert max(abs(dy), abs(dx)) <= 2
        rows, cols = np.clip(np.arange(8) + dy, 0, 7), np.clip(np.arange(8) + dx, 0, 7)
        np.testing.assert_array_equal(moved, window[:, rows][:, :, cols])  # every frame, edges repeated
        offsets.add((dy, dx))
    assert len(offsets) == 25
    with pytest.raises(UserError, match="shift_images"):
        DemoDataset(path, shift_images=-1)


def test_statistics_and_clipping(demo_file):
    ds = DemoDataset(demo_file, clip_actions=0.5)
    stats = ds.statistics()
    assert set(stats) == {"actions", "state"}
    assert max(stats["actions"]["max"]) <= 0.5 and min(stats["actions"]["min"]) >= -0.5
    assert set(stats["state"]) == {"mean", "std", "min", "max", "q01", "q99"}


def test_lazy_images_equal_cached_images(tmp_path):
    path = write_demo_file(tmp_path / "img.hdf5", lengths=(6, 9, 4), image_size=8)
    lazy = DemoDataset(path, history=3)
    cached = DemoDataset(path, history=3, cache_images=True)
    indices = np.random.default_rng(0).integers(0, len(lazy), 64)
    a, b = lazy.__getitems__(indices), cached.__getitems__(indices)
    assert a["obs"]["agentview_image"].shape == (64, 3, 8, 8, 3)
    assert torch.equal(a["obs"]["agentview_image"], b["obs"]["agentview_image"])
    # The pixel encodes (step, demo): the history window is the right frames.
    pixel = a["obs"]["agentview_image"][:, -1, 0, 0, :2]
    state = a["obs"]["state"][:, -1, 0]
    assert torch.equal(pixel[:, 0].long(), (state % 100).long()) and torch.equal(pixel[:, 1].long(), state // 100)


def test_robomimic_masks_and_split(robomimic_file):
    train, valid = split_demos([str(robomimic_file)], 0.5, seed=0)
    assert [d.name for d in train] == ["demo_0", "demo_1", "demo_2"] and [d.name for d in valid] == ["demo_3"]
    ds = DemoDataset(robomimic_file, filter_key="valid")
    assert len(ds) == 9
    with pytest.raises(UserError, match="no instruction"):
        ds.require_instructions()
    assert DemoDataset(robomimic_file, instruction="lift the cube").demo_instruction_text[0] == "lift the cube"


def test_episode_level_split_without_masks(tmp_path):
    path = write_demo_file(tmp_path / "d.hdf5", lengths=(3,) * 20, instructions=["a"])
    train, valid = split_demos([str(path)], 0.25, seed=1)
    assert len(valid) == 5 and len(train) == 15 and not {d.name for d in train} & {d.name for d in valid}


def test_datamodule_mixes_files_with_weights(tmp_path):
    a = write_demo_file(tmp_path / "a.hdf5", lengths=(10,) * 4, instructions=["a"])
    b = write_demo_file(tmp_path / "b.hdf5", lengths=(10,) * 4, instructions=["b"])
    data = DemoDataModule([str(a), str(b)], weights=[0.9, 0.1], batch_size=500, val_fraction=0.0)
    data.setup("fit")
    torch.manual_seed(0)
    batch = next(iter(data.train_dataloader()))
    from_a = (batch["instruction_id"] == data.train_set.instructions.index("a")).float().mean()
    assert 0.8 < from_a < 0.97


def test_validation_ids_agree_with_training(tmp_path):
    path = write_demo_file(tmp_path / "d.hdf5", lengths=(3,) * 10, instructions=["x", "y", "z"],
                           tasks=["t1", "t2", "t3"])
    data = DemoDataModule(str(path), val_fraction=0.3, batch_size=4)
    data.setup("fit")
    train, valid = data.train_set, data.valid_set
    assert train.instructions[: len(valid.instructions)] == valid.instructions
    assert train.tasks[: len(valid.tasks)] == valid.tasks


def test_dataloader_workers(demo_file):
    data = DemoDataModule(str(demo_file), batch_size=4, num_workers=2, val_fraction=0.0)
    data.setup("fit")
    seen = sum(len(batch["actions"]) for batch in data.train_dataloader())
    assert seen == 16


def test_normalizer_scales_per_dimension_or_keeps_the_geometry_of_a_key():
    from lcbc.policies.language_policy import Normalizer

    stats = {"state": {"mean": [1.0, 2.0, 3.0], "std": [0.1, 2.0, 0.0]}}
    a, b = torch.tensor([[1.5, 1.0, 3.0]]), torch.tensor([[1.0, 3.0, 3.0]])
    per_dim = Normalizer(stats, ["state"])
    torch.testing.assert_close(per_dim({"state": a}), torch.tensor([[5.0, -0.5, 0.0]]))
    per_key = Normalizer(stats, ["state"], scale="key")
    offset = per_key({"state": a}) - per_key({"state": b})
    rms = np.sqrt((0.1**2 + 2.0**2 + 0.0) / 3)
    torch.testing.assert_close(offset, (a - b) / rms)  # one scale: offsets keep their direction
    with pytest.raises(UserError, match="normalization must be one of"):
        Normalizer(stats, ["state"], scale="axis")
