"""Batched Meta-World rollouts, the success report, and the eval/act commands on a trained policy."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest

from lcbc.benchmark import load_benchmark
from lcbc.cli import main
from lcbc.data.datamodule import DemoDataModule
from lcbc.evaluation.rollout import ExpertActor, rollout
from lcbc.training.bc import BehaviorCloning


@pytest.fixture(scope="module")
def trained_policy(metaworld_file, tmp_path_factory):
    """RT-1-tiny trained briefly on the small real collection, then exported as a user would."""
    out = tmp_path_factory.mktemp("policy")
    L.seed_everything(0)
    model = BehaviorCloning(history=2, warmup_steps=5)
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    trainer.fit(model, DemoDataModule(str(metaworld_file), history=2, obs_keys=["state"], batch_size=64))
    trainer.save_checkpoint(out / "last.ckpt")
    main(["export", str(out / "last.ckpt"), str(out / "policy")])
    return out / "policy"


def test_expert_rollouts_succeed_on_new_goals():
    benchmark = load_benchmark("metaworld:drawer-open-v3,reach-v3")
    for split in ("validation", "test"):
        result = rollout(ExpertActor(benchmark), benchmark, episodes=4, split=split, envs_per_task=2, progress=False)
        assert sum(len(v) for v in result.successes.values()) == 8
        assert result.success_rate("drawer-open-v3") == 1.0 and result.success_rate("reach-v3") == 1.0
        assert result.steps > 8


def test_worker_processes_give_the_same_episodes_as_one_process(trained_policy):
    """The jobs split between two processes (whole start tasks each) and merged: the same outcome for every
    episode as in one process, for the expert and for a policy, which each worker gets a copy of."""
    from lcbc.cli import _load_policy
    from lcbc.evaluation.rollout import PolicyActor

    benchmark = load_benchmark("metaworld:drawer-open-v3,reach-v3")
    for actor in (ExpertActor(benchmark), PolicyActor(_load_policy(str(trained_policy)))):
        alone, split = (rollout(actor, benchmark, episodes=3, split="test", envs_per_task=3, progress=False,
                                workers=workers) for workers in (1, 2))
        assert split.successes == alone.successes and split.steps == alone.steps and split.seconds > 0
        episodes = [{(o.job.task, o.job.episode): o.reached for o in result.outcomes} for result in (alone, split)]
        assert episodes[0] == episodes[1] and len(episodes[0]) == 6


def test_jobs_are_shared_out_by_start_task_when_there_are_enough():
    from lcbc.evaluation.rollout import Job, shard

    jobs = [Job(task, task, k) for task in "abc" for k in range({"a": 4, "b": 2, "c": 1}[task])]
    assert [[job.task for job in share] for share in shard(jobs, 2)] == [list("aaaa"), list("bbc")]
    one_start = [Job("a", "a", k) for k in range(5)]
    assert [[job.episode for job in share] for share in shard(one_start, 2)] == [[0, 2, 4], [1, 3]]
    assert shard(one_start[:1], 4) == [one_start[:1]]


def test_splits_hold_different_goal_variations():
    """Train (seed 0, 2, 3, ...), validation (seed 1, on which earlier recipes were tuned) and test share no goal."""
    from lcbc.benchmarks.metaworld.env import scene_of

    benchmark = load_benchmark("metaworld:reach-v3")
    scenes = {split: {tuple(scene_of(benchmark.goal("reach-v3", split, i))) for i in range(0, 400, 7)}
              for split in ("train", "validation", "test")}
    assert all(len(found) == len(range(0, 400, 7)) for found in scenes.values())
    assert not (scenes["train"] & scenes["validation"] or scenes["train"] & scenes["test"]
                or scenes["validation"] & scenes["test"])


def test_eval_writes_table_chart_and_video(trained_policy, tmp_path, capsys):
    phrasings = tmp_path / "phrasings.json"
    phrasings.write_text(json.dumps({"drawer-open-v3": ["open the drawer", "pull the drawer out"]}))
    out = tmp_path / "eval"
    main(["eval", "--policy", str(trained_policy), "--benchmark", "drawer-open-v3", "--episodes", "2",
          "--instructions", str(phrasings), "--videos", "1", "--out", str(out), "--envs-per-task", "2",
          "--split", "test"])
    table = json.loads((out / "success.json").read_text())
    assert table["split"] == "test" and table["benchmark"] == "metaworld:drawer-open-v3"
    row = table["tasks"]["drawer-open-v3"]
    assert row["episodes"] == 4 and set(row["phrasings"]) == {"open the drawer", "pull the drawer out"}
    assert row["expert"] == 1.0 and 0.0 <= table["mean"] <= 1.0 and table["steps_per_second"] > 0
    assert (out / "success.png").stat().st_size > 1000 and (out / "videos" / "drawer-open-v3_0.gif").exists()
    report = (out / "success.md").read_text()
    assert "| drawer-open-v3 |" in report  # and each phrasing on a row of its own under its task
    assert "'open the drawer' |" in report and "'pull the drawer out' |" in report
    assert "test split" in capsys.readouterr().out


def test_act_runs_one_episode_from_an_instruction(trained_policy, tmp_path, capsys):
    video = tmp_path / "reach.gif"
    main(["act", "--policy", str(trained_policy), "--task", "reach-v3", "reach the goal", "--video", str(video)])
    out = capsys.readouterr().out
    assert "'reach the goal' asks for reach-v3 (nearest training instruction 'reach the goal', cosine 1.00)" in out
    assert ("succeeded" in out or "mismatch: asked for reach-v3" in out) and str(video) in out
    assert video.stat().st_size > 0


def test_act_says_plainly_when_the_episode_did_not_do_what_was_asked(trained_policy, tmp_path, capsys):
    """Told to close a drawer that starts closed, the episode cannot newly reach drawer-close's goal: whatever
    the policy does, act reports the mismatch instead of the scene's task's success."""
    main(["act", "--policy", str(trained_policy), "--task", "drawer-open-v3", "close the drawer",
          "--video", str(tmp_path / "d.gif")])
    out = capsys.readouterr().out
    assert "'close the drawer' asks for drawer-close-v3" in out and "mismatch: asked for drawer-close-v3" in out


def test_reached_tasks_score_the_scenes_other_tasks():
    from lcbc.cli import _reached_tasks
    from lcbc.evaluation.report import play_episode
    from lcbc.evaluation.rollout import Job

    benchmark = load_benchmark("metaworld:drawer-open-v3,drawer-close-v3")
    for task in benchmark.tasks:  # each expert reaches its own goal; the other task held from the start
        outcome, record = play_episode(ExpertActor(benchmark), benchmark, Job(task, "x", 0), "validation")
        assert outcome.completed == 1 and _reached_tasks(benchmark, task, outcome, record) == [task]


def test_bad_inputs_exit_2(trained_policy, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    typo = tmp_path / "typo.json"  # one good key, one that names no task of the run
    typo.write_text(json.dumps({"reach-v3": ["reach the goal"], "reach": ["go to the goal"]}))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"reach-v3": ["  "]}))
    policy = str(trained_policy)
    for argv, named in ((["eval", "--policy", str(tmp_path), "--benchmark", "MT10"], str(tmp_path)),
                        (["eval", "--policy", policy, "--benchmark", "fly-v3"], "fly-v3"),
                        (["eval", "--policy", policy, "--benchmark", "Lift"], "Lift"),
                        (["eval", "--policy", policy, "--benchmark", "MT10", "--split", "train2"], "--split"),
                        (["eval", "--policy", policy, "--benchmark", "reach-v3", "--instructions", str(bad)],
                         "bad.json"),
                        (["eval", "--policy", policy, "--benchmark", "reach-v3", "--instructions", str(typo)],
                         "'reach'"),
                        (["eval", "--policy", policy, "--benchmark", "reach-v3", "--instructions", str(empty)],
                         "non-empty"),
                        (["eval", "--policy", policy, "--benchmark", "reach-v3", "--chain", "2"], "--chain 2"),
                        (["eval", "--policy", policy, "--benchmark", "reach-v3", "--blind", "x"], "--blind"),
                        (["eval", "--policy", policy, "--benchmark", "reach-v3", "--chain", "1", "--videos", "1"],
                         "--videos"),
                        (["eval", "--policy", policy, "--benchmark", "MT10", "--obedience"], "--obedience"),
                        (["eval", "--policy", policy, "--benchmark", "reach-v3", "--obedience", "--chain", "1"],
                         "--obedience and --chain"),
                        (["eval", "--policy", policy, "--benchmark", "drawer-open-v3,drawer-close-v3", "--obedience",
                          "--episodes", "1", "--out", str(tmp_path / "o")], "scene_success"),
                        (["act", "--policy", policy, "--task", "reach-v3", "reach the goal", "push the puck"],
                         "several instructions"),
                        (["act", "--policy", policy, "--task", "nope-v3", "x"], "--task"),
                        (["act", "--policy", policy, "--task", "reach-v3", " "], "empty"),
                        (["act", "--policy", policy, "--task", "reach-v3", ""], "empty"),
                        (["collect", "--benchmark", "reach-v3", "--out", str(tmp_path / "x.hdf5"), "--obs", "both",
                          "--camera", "corner,side"], "--camera side")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], (argv, err)


def test_a_pixel_policy_is_evaluated_with_every_camera_it_reads_and_a_state_policy_with_none():
    from types import SimpleNamespace

    from lcbc.cli import policy_cameras, video_cameras
    from lcbc.errors import UserError

    benchmark = load_benchmark("reach-v3")
    two_views = SimpleNamespace(config={"image_keys": ["corner2_rgb", "gripperPOV_rgb"], "rt1": {"image_size": 96}})
    assert policy_cameras(two_views, benchmark) == (("corner2", "gripperPOV"), 96)
    assert video_cameras(("corner2", "gripperPOV"), benchmark) == ("corner2", "gripperPOV")
    state_only = SimpleNamespace(config={"image_keys": [], "rt1": {}})
    assert policy_cameras(state_only, benchmark) == ((), 64)
    assert video_cameras((), benchmark) == ("corner",)  # a state policy's videos: the benchmark's first camera
    elsewhere = SimpleNamespace(config={"image_keys": ["corner_rgb", "agentview_rgb"], "rt1": {"image_size": 64}})
    with pytest.raises(UserError, match="'agentview'"):
        policy_cameras(elsewhere, benchmark)


def test_policy_act_batch_keeps_per_environment_history(trained_policy):
    from lcbc.policies.language_policy import LanguagePolicy

    policy = LanguagePolicy.from_pretrained(trained_policy)
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(3, 2, 39)).astype(np.float32)  # 3 steps, 2 environments
    policy.reset()
    batched = [policy.act_batch({"state": frames[t]}, ["open the drawer", "reach the goal"]) for t in range(3)]
    for env, text in enumerate(["open the drawer", "reach the goal"]):
        policy.reset()
        single = [policy.act({"state": frames[t, env]}, text) for t in range(3)]
        # Equal up to float rounding: decoding averages the bins around the mode, batch sizes differ.
        np.testing.assert_allclose(np.stack(single), np.stack(batched)[:, env], rtol=0, atol=1e-6)


def test_readme_python_snippet_runs(trained_policy, capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    exec(snippet.replace("runs/bc_mt10_state/policy", str(trained_policy)), {})
    assert "success:" in capsys.readouterr().out


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("collect", "inspect", "fit", "validate", "test", "export", "eval", "act", "finetune", "serve"):
        assert f"    {name} " in out, name


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--policy", "p", "--benchmark", "reach-v3", "--episodes", "0"], "--episodes"),
    (["eval", "--policy", "p", "--benchmark", "reach-v3", "--envs-per-task", "0"], "--envs-per-task"),
    (["eval", "--policy", "p", "--benchmark", "reach-v3", "--videos", "-1"], "--videos"),
    (["eval", "--policy", "p", "--benchmark", "reach-v3", "--chain", "0"], "--chain"),
    (["eval", "--policy", "p", "--benchmark", "reach-v3", "--workers", "0"], "--workers"),
    (["act", "--policy", "p", "--task", "reach-v3", "reach", "--episode", "-1"], "--episode"),
    (["collect", "--benchmark", "reach-v3", "--out", "x.hdf5", "--image-size", "0"], "--image-size"),
    (["collect", "--benchmark", "reach-v3", "--out", "x.hdf5", "--workers", "0"], "--workers"),
    (["conflicts", "--policy", "p", "--data", "d.hdf5", "--batch-size", "0"], "--batch-size"),
])
def test_numeric_options_are_checked_before_anything_loads(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and "p" is no policy: the check must come first
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{flag} must be at least" in error[0], error
    assert list(tmp_path.iterdir()) == []


def test_obedience_rows_follow_the_task_order_whatever_order_episodes_finish_in():
    from lcbc.evaluation.rollout import Job, Outcome
    from lcbc.evaluation.scene import obedience_table

    tasks = ["open", "close", "press"]
    finished = [Outcome(Job("", "do it", 0, "open"), [[]]),
                Outcome(Job("press", "press it", 0, "open"), [["press"]]),
                Outcome(Job("close", "close it", 0, "open"), [["open"]]),
                Outcome(Job("open", "open it", 0), [["open"]])]
    table = obedience_table(tasks, finished)
    assert list(table["rows"]) == ["open", "close", "press", "blind: 'do it'"]
    assert table["rows"]["close"] == {"open": 1.0, "close": 0.0, "press": 0.0}
    assert table["obedience"] == 2 / 3
