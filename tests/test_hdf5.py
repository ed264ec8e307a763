"""The demonstration file: round trip, foreign layouts, and every malformed case failing cleanly."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from lcbc.cli import main
from lcbc.data.hdf5 import DemoWriter, instruction_from_file_name, summarize
from lcbc.errors import UserError
from tests.conftest import file_digest, write_demo_file


def test_round_trip(tmp_path):
    path = tmp_path / "rt.hdf5"
    actions = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    image = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    with DemoWriter(path, {"env_name": "x", "env_type": 0, "env_kwargs": {}}) as writer:
        writer.add_demo(actions, {"state": actions * 2, "cam_rgb": image}, np.ones(4), np.array([0, 0, 0, 1]),
                        states=actions * 3, instruction="open the drawer", task="drawer-open-v3", seed=3)
        writer.write_masks({"train": ["demo_0"]})
    with h5py.File(path, "r") as f:
        demo = f["data/demo_0"]
        np.testing.assert_array_equal(demo["actions"][()], actions)
        np.testing.assert_array_equal(demo["obs/state"][()], actions * 2)
        np.testing.assert_array_equal(demo["obs/cam_rgb"][()], image)
        np.testing.assert_array_equal(demo["states"][()], actions * 3)
        assert demo.attrs["num_samples"] == 4 and demo.attrs["instruction"] == "open the drawer"
        assert f["data"].attrs["total"] == 4
    summary = summarize(path)
    assert summary["demos"] == 1 and summary["total_steps"] == 4
    assert summary["obs"]["cam_rgb"] == {"shape": [8, 8, 3], "dtype": "uint8"}
    assert summary["instructions"] == {"open the drawer": 1} and summary["masks"] == {"train": 1}


def test_writer_refuses_to_overwrite(demo_file):
    with pytest.raises(UserError, match="exists"):
        DemoWriter(demo_file, {})


def test_robomimic_file_summary(robomimic_file):
    digest = file_digest(robomimic_file)
    summary = summarize(robomimic_file)
    assert summary["demos"] == 4 and summary["total_steps"] == 38
    assert summary["length"] == {"min": 7, "median": 9.5, "max": 12}
    assert set(summary["obs"]) == {"robot0_eef_pos", "robot0_eef_quat", "object"}
    assert summary["action_dim"] == 7 and summary["env"] == "Lift"
    assert summary["masks"] == {"train": 3, "valid": 1}
    assert summary["instructions"] == {"(none)": 4}
    assert file_digest(robomimic_file) == digest


def test_libero_file_summary(libero_file):
    summary = summarize(libero_file)
    assert summary["instructions"] == {"turn on the stove": 2}
    assert summary["obs"]["agentview_rgb"] == {"shape": [16, 16, 3], "dtype": "uint8"}


def test_libero_instruction_from_file_name(tmp_path):
    assert instruction_from_file_name("LIVING_ROOM_SCENE2_put_both_the_soup_in_the_basket_demo.hdf5") == \
        "put both the soup in the basket"
    assert instruction_from_file_name("pick_up_the_ketchup_demo.hdf5") == "pick up the ketchup"
    assert instruction_from_file_name("lift.hdf5") is None
    path = write_demo_file(tmp_path / "KITCHEN_SCENE1_open_the_top_drawer_demo.hdf5")
    assert summarize(path)["instructions"] == {"open the top drawer": 3}


def test_inspect_prints_summary(demo_file, capsys):
    main(["inspect", str(demo_file)])
    out = capsys.readouterr().out
    assert "demos: 3" in out and "steps: 16" in out and "open the drawer" in out and "3/5/8" in out


def _break(path, how):
    with h5py.File(path, "a") as f:
        how(f)


MALFORMED = {
    "no data group": (lambda f: f.move("data", "stuff"), "no 'data' group"),
    "no demos": (lambda f: [f["data"].pop(name) for name in list(f["data"])], "no demos"),
    "missing actions": (lambda f: f["data/demo_1"].pop("actions"), "demo_1: missing 'actions'"),
    "length mismatch": (lambda f: (f["data/demo_1/obs"].pop("state"),
                                   f["data/demo_1/obs"].create_dataset("state", data=np.zeros((3, 3))))
                        , "demo_1: obs/state has 3 steps but actions has 8"),
    "nan in actions": (lambda f: f["data/demo_2/actions"].__setitem__((1, 0), np.nan),
                       "demo_2: actions has NaN or Inf (first at step 1)"),
    "inf in obs": (lambda f: f["data/demo_0/obs/state"].__setitem__((4, 1), np.inf),
                   "demo_0: obs/state has NaN or Inf (first at step 4)"),
    "wrong ndim": (lambda f: (f["data/demo_0"].pop("actions"),
                              f["data/demo_0"].create_dataset("actions", data=np.zeros(5, np.float32))),
                   "demo_0: actions has shape (5,)"),
    "wrong dtype": (lambda f: (f["data/demo_0"].pop("actions"),
                               f["data/demo_0"].create_dataset("actions", data=np.array([["a"]] * 5, dtype="S1"))),
                    "demo_0: actions has dtype |S1"),
    "empty demo": (lambda f: (f["data/demo_0"].pop("actions"),
                              f["data/demo_0"].create_dataset("actions", data=np.zeros((0, 2), np.float32))),
                   "demo_0: empty demo"),
    "bad instruction": (lambda f: f["data/demo_0"].attrs.__setitem__("instruction", np.bytes_(b"\xff\xfe")),
                        "demo_0: attribute 'instruction' is not valid UTF-8"),
    "mask names missing demo": (lambda f: f.create_dataset("mask/train", data=np.array([b"demo_0", b"demo_9"])),
                                "mask/train: names missing demo demo_9"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_exits_2_with_one_line(demo_file, case, capsys):
    how, expected = MALFORMED[case]
    _break(demo_file, how)
    digest = file_digest(demo_file)
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(demo_file)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(demo_file) in err and expected in err, err
    assert file_digest(demo_file) == digest


def test_not_hdf5_and_truncated(tmp_path, demo_file, capsys):
    text = tmp_path / "notes.hdf5"
    text.write_text("hello")
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(open(demo_file, "rb").read()[:3000])
    for path, expected in ((text, "not an HDF5 file"), (truncated, "truncated or corrupt"),
                           (tmp_path / "missing.hdf5", "no such file")):
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


def test_console_script_prints_no_traceback(demo_file):
    _break(demo_file, MALFORMED["nan in actions"][0])
    result = subprocess.run([sys.executable, "-m", "lcbc.cli", "inspect", str(demo_file)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
