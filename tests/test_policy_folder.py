"""An exported policy folder: written whole, readable by others like its siblings, and every kind of damage
refused on load with one line (exit status 2 from the CLI), the folder left as it was."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
from test_server import onehot_dir  # noqa: F401  (fixture: a small one-hot policy folder)

from lcbc.cli import main
from lcbc.policies.language_policy import LanguagePolicy
from tests.conftest import file_digest


def test_weights_are_readable_like_the_other_files_and_their_digest_is_recorded(onehot_dir):  # noqa: F811
    modes = {path.name: stat.S_IMODE(os.stat(path).st_mode) for path in os.scandir(onehot_dir)}
    assert set(modes) == {"config.json", "normalization.json", "model.safetensors", "weights.sha256"}
    assert len(set(modes.values())) == 1
    digest, name = (open(os.path.join(onehot_dir, "weights.sha256")).read().split())
    assert name == "model.safetensors" and digest == file_digest(os.path.join(onehot_dir, "model.safetensors"))


def damage(directory, how: str) -> None:
    weights, config = directory / "model.safetensors", directory / "config.json"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "flipped byte in the weights":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "garbled weights, digest rewritten":
        weights.write_bytes(b"\x00" * 5000)
        (directory / "weights.sha256").write_text(f"{file_digest(weights)}  model.safetensors\n")
    elif how == "invalid config.json":
        config.write_text("{not json")
    elif how == "config.json without its keys":
        config.write_text("{}")
    elif how == "config.json sizes disagree":
        value = json.loads(config.read_text())
        value["rt1"]["width"] *= 2
        config.write_text(json.dumps(value))
    elif how == "normalization.json sizes disagree":
        path = directory / "normalization.json"
        value = json.loads(path.read_text())
        value["state"] = {name: numbers + [0.0] for name, numbers in value["state"].items()}
        path.write_text(json.dumps(value))


CASES = ["truncated weights", "flipped byte in the weights", "garbled weights, digest rewritten",
         "invalid config.json", "config.json without its keys", "config.json sizes disagree",
         "normalization.json sizes disagree"]


@pytest.mark.parametrize("how", CASES)
def test_a_damaged_policy_folder_is_one_line_and_exit_2(onehot_dir, tmp_path, how, capsys):  # noqa: F811
    folder = tmp_path / "policy"
    shutil.copytree(onehot_dir, folder)
    damage(folder, how)
    before = {path.name: file_digest(path) for path in folder.iterdir()}
    for argv in (["act", "--policy", str(folder), "--task", "drawer-open-v3", "open the drawer"],
                 ["eval", "--policy", str(folder), "--benchmark", "drawer-open-v3", "--episodes", "1"],
                 ["serve", "--policy", str(folder), "--port", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and str(folder) in error[0], error
    assert {path.name: file_digest(path) for path in folder.iterdir()} == before


def test_an_undamaged_copy_loads(onehot_dir, tmp_path):  # noqa: F811
    folder = tmp_path / "policy"
    shutil.copytree(onehot_dir, folder)
    assert LanguagePolicy.from_pretrained(folder).config["task_mode"] == "onehot"
