"""Gradient surgery on hand-computed cases, per-task batches, and the `lcbc conflicts` diagnostic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_demo_file
from torch import nn

from lcbc.cli import main
from lcbc.data.dataset import DemoDataset
from lcbc.policies.language_policy import LanguagePolicy
from lcbc.policies.rt1 import RT1Config
from lcbc.rl.pcgrad import gradient_cosines, pcgrad, pcgrad_backward, split_by_task


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_conflicting_pair_is_projected_exactly():
    # g1·g2 = -1: g1' = g1 + g2/2 = (0.5, 0.5), g2' = g2 + g1 = (0, 1); each is now orthogonal to the other's
    # original gradient, and the mean is (0.25, 0.75).
    torch.testing.assert_close(pcgrad([t(1, 0), t(-1, 1)]), t(0.25, 0.75))


def test_non_conflicting_pair_is_the_plain_mean():
    torch.testing.assert_close(pcgrad([t(1, 0), t(1, 1)]), t(1, 0.5))


def test_three_tasks_order_independent_case():
    # g3 is orthogonal to g1 and g2, so only the pair (g1, g2) is projected, whatever the order:
    # (0.5, 0.5, 0) + (0, 1, 0) + (0, 0, 1), divided by 3.
    grads = [t(1, 0, 0), t(-1, 1, 0), t(0, 0, 1)]
    for seed in range(4):
        torch.testing.assert_close(pcgrad(grads, torch.Generator().manual_seed(seed)), t(1 / 6, 1 / 2, 1 / 3))


def test_three_tasks_order_matters_and_follows_the_generator():
    # g1 = (1, 0) conflicts with g2 = (-1, 1) and g3 = (-1, 0); g2 and g3 agree.
    # g1 off g2 first: (0.5, 0.5), then off g3: (0, 0.5). g1 off g3 first: (0, 0), then no conflict with g2.
    # g2' = g2 + g1 = (0, 1) and g3' = g3 + g1 = (0, 0) in either order. The mean is (0, 0.5) or (0, 1/3).
    grads = [t(1, 0), t(-1, 1), t(-1, 0)]
    seen = set()
    for seed in range(16):
        first_order = torch.randperm(2, generator=torch.Generator().manual_seed(seed)).tolist()  # task 1's draw
        expected = t(0, 0.5) if first_order == [0, 1] else t(0, 1 / 3)  # [0, 1]: g2 before g3
        torch.testing.assert_close(pcgrad(grads, torch.Generator().manual_seed(seed)), expected)
        seen.add(tuple(first_order))
    assert seen == {(0, 1), (1, 0)}


def test_zero_gradients_give_no_nan():
    torch.testing.assert_close(pcgrad([t(0, 0), t(1, 0)]), t(0.5, 0))
    torch.testing.assert_close(pcgrad([t(0, 0), t(0, 0)]), t(0, 0))
    torch.testing.assert_close(gradient_cosines([t(0, 0), t(1, 0), t(-2, 0)]),
                               torch.tensor([[0.0, 0, 0], [0, 1, -1], [0, -1, 1]]))


def test_gradient_cosines_by_hand():
    cosines = gradient_cosines([t(1, 0), t(-1, 1), t(0, 3)])
    s = 2 ** -0.5
    torch.testing.assert_close(cosines, torch.tensor([[1, -s, 0], [-s, 1, s], [0, s, 1]]))


def test_parameters_only_some_tasks_use():
    """Surgery on the parameter both tasks use; a task's own parameter gets the mean over both tasks (the
    other contributes 0), added to an existing .grad; an unused parameter keeps no gradient."""
    shared, head_a, head_b, unused = (nn.Parameter(torch.zeros(2)) for _ in range(4))
    head_b.grad = t(1, 1)
    loss_a = shared @ t(1, 0) + head_a @ t(3, -1)
    loss_b = shared @ t(-1, 1) + head_b @ t(2, 4)
    pcgrad_backward([loss_a, loss_b], [shared, head_a, head_b, unused])
    torch.testing.assert_close(shared.grad, t(0.25, 0.75))  # the conflicting pair above
    torch.testing.assert_close(head_a.grad, t(1.5, -0.5))
    torch.testing.assert_close(head_b.grad, t(1, 1) + t(1, 2))
    assert unused.grad is None


def test_three_tasks_with_a_parameter_two_of_them_use():
    """`partial` is used by tasks 0 and 1, not 2. Its gradients (1, 0) and (-1, 3) conflict, but get no surgery:
    their sum divided by the 3 tasks (surgery would give (0.3, 1.1), the mean over its users (0, 1.5))."""
    shared, partial = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    losses = [shared @ t(1, 0) + partial @ t(1, 0), shared @ t(0, 1) + partial @ t(-1, 3), shared @ t(1, 1)]
    pcgrad_backward(losses, [shared, partial])
    torch.testing.assert_close(partial.grad, t(0, 1))
    torch.testing.assert_close(shared.grad, (t(1, 0) + t(0, 1) + t(1, 1)) / 3)  # no conflict among them


def test_backward_on_a_module_equals_pcgrad_on_flat_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = list(net.parameters())

    x = torch.randn(3, 5, 3)  # three tasks, five inputs each, with opposing targets
    y = torch.tensor([[1.0, -1], [-1, 1], [0.5, 0.5]])

    def losses():
        return [(net(x[k]) - y[k]).square().mean() for k in range(3)]

    flat = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]) for loss in losses()]
    assert gradient_cosines(flat).min() < 0  # the case exercises the projection
    expected = pcgrad(flat, torch.Generator().manual_seed(3))
    pcgrad_backward(losses(), params, torch.Generator().manual_seed(3))
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), expected)
    assert not torch.allclose(expected, torch.stack(flat).mean(0))


def test_split_by_task_slices_every_tensor(tmp_path):
    path = write_demo_file(tmp_path / "d.hdf5", lengths=(5, 8, 3, 4), instructions=["open", "close"],
                           tasks=["drawer-open-v3", "drawer-close-v3"])
    dataset = DemoDataset(str(path), history=2, goal="final")
    batch = dataset.__getitems__(np.arange(len(dataset)))
    parts = split_by_task(batch)
    assert sorted(parts) == [0, 1] and sum(len(part["actions"]) for part in parts.values()) == len(dataset)
    for task, part in parts.items():
        assert (part["task_id"] == task).all() and set(part) == set(batch) and set(part["obs"]) == {"state"}
        demo = part["obs"]["state"][:, -1, 0].long() // 100  # the synthetic file encodes the demo index
        goal_demo = part["goal"]["state"][:, 0].long() // 100
        assert (goal_demo == demo).all()
        assert all(dataset.tasks[task] == ["drawer-open-v3", "drawer-close-v3"][d % 2] for d in demo.tolist())
        assert len(part["obs_mask"]) == len(part["instruction_id"]) == len(demo)


@pytest.fixture(params=["onehot", "language"])
def conflicts_setup(tmp_path, request):
    """A policy with random weights (no training) over the tasks of a tiny file. The language policy's
    instruction table stays unfilled (zeros), so the text model is never loaded."""
    data = write_demo_file(tmp_path / "demos.hdf5", lengths=(9, 7, 8, 6, 10, 5), state_dim=4, action_dim=3,
                           instructions=["open the drawer", "close the drawer", "push the button"],
                           tasks=["drawer-open-v3", "drawer-close-v3", "button-press-v3"])
    dataset = DemoDataset(str(data))
    rt1 = RT1Config.preset("rt1-tiny", history=2, dropout=0.0)
    policy = LanguagePolicy(rt1, dataset.statistics(), ["state"], [], dataset.instructions, dataset.tasks,
                            request.param)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return policy.save_pretrained(tmp_path / "policy"), data


def test_pcgrad_step_on_per_task_losses_of_a_policy_batch(conflicts_setup):
    policy_dir, data = conflicts_setup
    policy = LanguagePolicy.from_pretrained(policy_dir)
    dataset = DemoDataset(str(data), history=2, tasks=policy.config["tasks"],
                          instructions=policy.config["instructions"])
    parts = split_by_task(dataset.__getitems__(np.arange(len(dataset))))
    params = [p for p in policy.parameters() if p.requires_grad]
    pcgrad_backward([policy(part)[0] for part in parts.values()], params, torch.Generator().manual_seed(0))
    grads = [p.grad for p in params if p.grad is not None]
    assert len(parts) == 3 and grads and all(torch.isfinite(g).all() for g in grads)


def test_conflicts_command_end_to_end(conflicts_setup, tmp_path, capsys):
    policy_dir, data = conflicts_setup
    out = tmp_path / "out"
    main(["conflicts", "--policy", str(policy_dir), "--data", str(data), "--batches", "2", "--batch-size", "8",
          "--out", str(out)])
    table = json.loads((out / "conflicts.json").read_text())
    matrix = np.array(table["cosine"])
    assert sorted(table["tasks"]) == ["button-press-v3", "drawer-close-v3", "drawer-open-v3"]
    assert matrix.shape == (3, 3) and np.allclose(matrix, matrix.T) and np.allclose(np.diag(matrix), 1)
    assert (np.abs(matrix) <= 1).all() and not np.allclose(matrix, 1)
    assert (out / "conflicts.png").stat().st_size > 1000
    assert "| drawer-open-v3 |" in (out / "conflicts.md").read_text()
    assert "conflicts.png" in capsys.readouterr().out


def test_conflicts_bad_inputs_exit_2_with_one_line(conflicts_setup, tmp_path, capsys):
    policy_dir, _ = conflicts_setup
    other = write_demo_file(tmp_path / "other.hdf5", state_dim=4, action_dim=3, instructions=["pick the cube"],
                            tasks=["pick-place-v3"])
    for data, message in ((tmp_path / "missing.hdf5", "no such file"), (other, "'pick-place-v3' is not one")):
        with pytest.raises(SystemExit) as exit_info:
            main(["conflicts", "--policy", str(policy_dir), "--data", str(data), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()
