"""Nothing lost to a kill: collection before its first demo, with workers, under --overwrite and --resume,
and checkpoints written while a run is killed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lcbc.cli import main
from lcbc.data.hdf5 import open_demo_file, validate
from tests.conftest import file_digest

ROOT = Path(__file__).resolve().parents[1]


def start_collect(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lcbc.cli", "collect", "--benchmark", "reach-v3,push-v3",
                             "--episodes-per-task", "30", "--out", str(out), *extra],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def demos(path: Path) -> int:
    with open_demo_file(path) as file:
        return len(validate(file, path))


def test_a_kill_before_the_first_demo_leaves_no_file_and_resume_starts_afresh(tmp_path):
    out = tmp_path / "early.hdf5"
    process = start_collect(out, "--workers", "1")
    wait_for(lambda: (tmp_path / "early.hdf5.partial").exists())
    kill(process)
    assert not out.exists()  # never an empty file under the final name
    main(["collect", "--benchmark", "reach-v3", "--episodes-per-task", "2", "--out", str(out), "--resume",
          "--workers", "1"])
    assert demos(out) == 2 and not (tmp_path / "early.hdf5.partial").exists()


def test_a_kill_under_overwrite_keeps_the_old_demos(metaworld_file, tmp_path):
    old = tmp_path / "old.hdf5"
    shutil.copy(metaworld_file, old)
    digest = file_digest(old)
    process = start_collect(old, "--workers", "1", "--overwrite")
    wait_for(lambda: (tmp_path / "old.hdf5.partial").exists())
    kill(process)
    assert file_digest(old) == digest and demos(old) == 6


def test_killing_collect_with_workers_leaves_no_process_behind(tmp_path):
    out = tmp_path / "workers.hdf5"
    process = start_collect(out, "--workers", "2")
    wait_for(lambda: len(children(process.pid)) >= 2 and out.exists())  # workers running, a demo written
    spawned = children(process.pid)
    kill(process)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in spawned), seconds=15)
    assert demos(out) >= 1


def test_resume_refuses_another_observation_setup(metaworld_file, tmp_path, capsys):
    copy = tmp_path / "copy.hdf5"
    shutil.copy(metaworld_file, copy)
    digest = file_digest(copy)
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--benchmark", "reach-v3", "--episodes-per-task", "4", "--out", str(copy), "--resume",
              "--obs", "both", "--workers", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "camera" in error[0] and str(copy) in error[0]
    assert file_digest(copy) == digest


def test_a_checkpoint_write_that_dies_leaves_the_last_one_whole(tmp_path):
    from lcbc.training.cli import AtomicCheckpointIO

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    io, last = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, last)
    digest = file_digest(last)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000), "broken": Unpicklable()}, last)
    assert file_digest(last) == digest and os.listdir(last.parent) == ["last.ckpt"]
    assert torch.load(last, weights_only=True)["step"] == 1


def test_resuming_from_a_truncated_checkpoint_is_one_line(demo_file, tmp_path, capsys):
    """A last.ckpt cut short by an older writer, or by a full disk, stops a resume with one line."""
    run = tmp_path / "run"
    main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{demo_file}]",
          "--trainer.default_root_dir", str(run), "--trainer.max_steps", "3"])
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    capsys.readouterr()
    for argv in (["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{demo_file}]",
                  "--trainer.default_root_dir", str(run), "--ckpt_path", "last"],
                 ["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{demo_file}]",
                  "--trainer.default_root_dir", str(tmp_path / "other"), "--ckpt_path", str(last)]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lcbc: error:")]
        assert len(errors) == 1 and "last.ckpt: truncated or not a checkpoint" in errors[0]
