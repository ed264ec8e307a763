"""The `lcbc` command. Each subcommand parses its arguments here and calls into the package.

A user's mistake (`UserError`) prints one line and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from rich.console import Console
from rich.table import Table

from lcbc.errors import UserError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")
# The smallest value each numeric option takes, checked for every subcommand that has it.
SMALLEST = {"episodes_per_task": 1, "episodes": 1, "envs_per_task": 1, "workers": 1, "image_size": 1, "videos": 0,
            "episode": 0, "steps_after_success": 0, "action_noise": 0, "batches": 1, "batch_size": 1, "port": 0,
            "max_sessions": 1, "chain": 1, "after_tasks": 0, "first_placement": 0}
BENCHMARK_HELP = ("a benchmark plug-in and its argument: metaworld:MT10, metaworld:MT50, metaworld:reach-v3,push-v3 "
                  "(MT10, MT50 and Meta-World task names alone also work), libero:goal (or libero:goal:TASK,TASK), "
                  "or my_package.module:ARG")


def cmd_collect(args) -> None:
    from lcbc.benchmark import load_benchmark
    from lcbc.collect import collect

    benchmark = load_benchmark(args.benchmark)
    tasks = benchmark.tasks
    cameras = tuple(name.strip() for name in (args.camera or "").split(",") if name.strip())
    if args.obs in ("rgb", "both") and not (cameras or benchmark.cameras):
        raise UserError(f"--obs {args.obs}: {benchmark.name} renders no cameras")
    unknown = [name for name in cameras if benchmark.cameras and name not in benchmark.cameras]
    if unknown:
        raise UserError(f"--camera {unknown[0]}: {benchmark.name} renders {', '.join(benchmark.cameras)}")
    cameras = (cameras or benchmark.cameras[:1]) if args.obs in ("rgb", "both") else ()
    mode = "overwrite" if args.overwrite else "append" if args.resume else "create"
    report = collect(args.out, args.benchmark, args.episodes_per_task, cameras=cameras, image_size=args.image_size,
                     workers=args.workers, mode=mode, steps_after_success=args.steps_after_success,
                     action_noise=args.action_noise, after_tasks=args.after_tasks, driver=args.driver,
                     first_placement=args.first_placement)
    table = Table("task", "attempts", "kept", title=f"{args.out}")
    for task in tasks:
        table.add_row(task, str(report.attempts.get(task, 0)), str(report.kept.get(task, 0)))
    Console().print(table)
    short = [task for task in tasks if report.kept.get(task, 0) < args.episodes_per_task]
    if short:
        Console(stderr=True).print(f"[yellow]fewer successful episodes than asked for: {', '.join(short)}")


def cmd_inspect(args) -> None:
    from lcbc.data.hdf5 import summarize

    summary = summarize(args.path)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    console = Console()
    length = summary["length"]
    console.print(f"[bold]{summary['path']}[/]  env: {summary['env']}")
    console.print(f"demos: {summary['demos']}  steps: {summary['total_steps']}  "
                  f"length min/median/max: {length['min']}/{length['median']:g}/{length['max']}")
    obs = Table("obs key", "shape", "dtype")
    for key, info in summary["obs"].items():
        obs.add_row(key, str(tuple(info["shape"])), info["dtype"])
    console.print(obs)
    actions = Table("action dim", "min", "max", title=f"actions ({summary['action_dim']}-d)")
    for dim, (low, high) in enumerate(zip(summary["action_min"], summary["action_max"])):
        actions.add_row(str(dim), f"{low:.4f}", f"{high:.4f}")
    console.print(actions)
    instructions = Table("instruction", "demos")
    for text, count in summary["instructions"].items():
        instructions.add_row(text, str(count))
    console.print(instructions)
    masks = ", ".join(f"{name} ({count})" for name, count in summary["masks"].items()) or "none"
    console.print(f"filter masks: {masks}")


def _renames(pairs: list[str]) -> dict[str, str]:
    renames = {}
    for pair in pairs:
        old, equals, new = pair.partition("=")
        if not equals or not old or not new:
            raise UserError(f"--rename: {pair!r} is not OLD=NEW")
        renames[old] = new
    return renames


def cmd_convert(args) -> None:
    from pathlib import Path

    from lcbc.data.lerobot import hdf5_to_lerobot, lerobot_to_hdf5

    source = Path(args.source)
    keys = args.keys.split(",") if args.keys else None
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size must be at least 1 pixel, got {args.image_size}")
    if source.is_dir():
        only_out = [option for option, value in (("--images", args.images), ("--video-codec", args.video_codec),
                                                 ("--fps", args.fps), ("--instruction", args.instruction)) if value]
        if only_out:
            raise UserError(f"{only_out[0]} applies to an HDF5 file -> LeRobot folder conversion")
        report = lerobot_to_hdf5(source, args.destination, keys, _renames(args.rename), args.image_size,
                                 args.overwrite)
    elif source.is_file():
        report = hdf5_to_lerobot(source, args.destination, keys, _renames(args.rename), args.images or "video",
                                 args.image_size, args.fps, args.video_codec or "libsvtav1", args.instruction,
                                 args.overwrite)
    else:
        raise UserError(f"{source}: no such file or folder")
    print(f"{args.destination}: {report.episodes} episodes, {report.frames} frames in {report.seconds:.1f} s "
          f"({report.frames / report.seconds:,.0f} frames/s)")
    for old, new in report.names.items():
        print(f"  {old} -> {new}")
    if report.left_out:
        print(f"left out (no default place; --rename KEY=NAME keeps one): {', '.join(report.left_out)}")


def cmd_export(args) -> None:
    from lcbc.training.bc import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported policy to {out}")


def _load_policy(directory: str, snap_cosine: float = 0.0):
    import torch

    from lcbc.policies.language_policy import LanguagePolicy

    torch.set_num_threads(1)  # small batched forward passes: one thread is fastest on few cores
    return LanguagePolicy.from_pretrained(directory, snap_cosine)


def policy_cameras(policy, benchmark) -> tuple[tuple[str, ...], int]:
    """Pixel policies name their cameras in their image keys (`corner_rgb`); state policies read none."""
    cameras = tuple(key.removesuffix("_rgb") for key in policy.config["image_keys"])
    unknown = [camera for camera in cameras if camera not in benchmark.cameras]
    if unknown:
        raise UserError(f"the policy reads camera {unknown[0]!r}; {benchmark.name} renders "
                        f"{', '.join(benchmark.cameras) or 'no cameras'}")
    return cameras, policy.config["rt1"]["image_size"] if cameras else 64


def video_cameras(cameras: tuple[str, ...], benchmark) -> tuple[str, ...]:
    """What an episode with a video renders: the policy's cameras, or the benchmark's first for a state policy."""
    return cameras or benchmark.cameras[:1]


def _instruction_file(path: str, tasks: list[str]) -> dict[str, list[str]]:
    """A JSON object: task name -> list of instructions; every key a task of the run, every value a
    non-empty list of non-empty strings."""
    from pathlib import Path

    try:
        table = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"--instructions {path}: not a readable JSON file ({error})") from None
    if not isinstance(table, dict) or not table:
        raise UserError(f"--instructions {path}: expected a JSON object: task name -> list of instructions")
    for task, texts in table.items():
        if task not in tasks:
            raise UserError(f"--instructions {path}: {task!r} is not a task of this run ({', '.join(tasks)})")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise UserError(f"--instructions {path}: {task}: expected a non-empty list of non-empty strings")
    return table


def cmd_eval(args) -> None:
    from pathlib import Path

    import numpy as np

    from lcbc.benchmark import load_benchmark
    from lcbc.evaluation.report import markdown, play_episode, success_table, write_report
    from lcbc.evaluation.rollout import ExpertActor, Job, PolicyActor, rollout
    from lcbc.evaluation.scene import random_chain

    benchmark = load_benchmark(args.benchmark)
    benchmark.check_split(args.split)
    tasks = benchmark.tasks
    if args.obedience and args.chain:
        raise UserError("--obedience and --chain are separate evaluations: give one")
    if (args.obedience or args.chain) and args.videos:
        raise UserError("--videos records the per-task evaluation; lcbc act --video records a chain of instructions")
    if args.blind is not None and not args.obedience:
        raise UserError("--blind adds a row to the --obedience table: give --obedience too")
    if args.blind is not None and not args.blind.strip():
        raise UserError("--blind: the instruction is empty")
    if args.obedience and not set(tasks) <= set(benchmark.scene(tasks[0])):
        raise UserError(f"--obedience: the tasks of {benchmark.name} do not share one scene; name some that do "
                        "(e.g. libero:goal, or metaworld:drawer-open-v3,drawer-close-v3)")
    if args.chain and random_chain(benchmark, tasks, args.chain, np.random.default_rng(0)) is None:
        raise UserError(f"--chain {args.chain}: no {args.chain} tasks of {benchmark.name} can follow each other in "
                        "one episode (the benchmark's can_follow)")
    instructions = None
    if args.instructions and args.instructions != "unseen":
        instructions = _instruction_file(args.instructions, tasks)
    policy = _load_policy(args.policy, args.snap)
    if args.blind is not None and policy.config["task_mode"] != "language":
        raise UserError(f"--blind: the policy is conditioned on {policy.config['task_mode']}, not on words")
    if args.instructions == "unseen":  # the benchmark's phrasings this policy was never trained on
        known = set(policy.config["instructions"])
        instructions = {task: [text for text in benchmark.instructions(task) if text not in known] for task in tasks}
    cameras, size = policy_cameras(policy, benchmark)
    actor = PolicyActor(policy)
    if args.out is None:  # beside the policy, per benchmark and split: evaluations of other policies never collide
        folder = re.sub(r"[^\w.,-]+", "-", f"{benchmark.name}_{args.split}")
        args.out = Path(args.policy).absolute().parent / "eval" / folder
    if args.obedience or args.chain:
        _eval_scene(args, benchmark, actor, instructions, cameras, size)
        return
    result = rollout(actor, benchmark, args.episodes, instructions, split=args.split,
                     envs_per_task=args.envs_per_task, cameras=cameras, image_size=size, workers=args.workers)
    has_expert = not args.no_expert and benchmark.expert(tasks[0]) is not None
    expert = rollout(ExpertActor(benchmark), benchmark, args.episodes, split=args.split,
                     envs_per_task=args.envs_per_task, progress=False, workers=args.workers) if has_expert else None
    table = success_table(tasks, result, expert)
    table["benchmark"], table["split"] = benchmark.name, args.split
    if instructions and policy.config["task_mode"] == "language":  # what an unseen wording falls back on
        table["nearest_training_instruction"] = {
            text: dict(zip(("instruction", "cosine"), policy.task_encoder.nearest_instruction(text)))
            for texts in instructions.values() for text in texts if text not in policy.config["instructions"]}
    out = Path(args.out)
    write_report(table, out)
    videos = []
    rendered = video_cameras(cameras, benchmark)
    for task in tasks if rendered else []:
        for episode in range(args.videos):
            path = out / "videos" / f"{task}_{episode}.gif"
            play_episode(actor, benchmark, Job(task, benchmark.canonical_instruction(task), episode), args.split,
                         path, rendered, size if cameras else 128)
            videos.append(path)
    Console().print(markdown(table))
    for text, nearest in table.get("nearest_training_instruction", {}).items():
        print(f"unseen {text!r}: nearest training instruction {nearest['instruction']!r}, "
              f"cosine {nearest['cosine']:.2f}")
    print(f"{benchmark.name}, {args.split} split; {table['steps_per_second']} env steps/s; "
          f"report in {out}/success.md, chart {out}/success.png")
    if videos:
        print(f"videos: {videos[0]} (+{len(videos) - 1} more)" if len(videos) > 1 else f"video: {videos[0]}")
    elif args.videos:
        print(f"no videos: {benchmark.name} renders no cameras")


def _eval_scene(args, benchmark, actor, instructions, cameras, size) -> None:
    """`eval --obedience` (the asked x reached table) or `eval --chain N` (success by chain length, beside the
    scripted experts' on the same chains when every task has one)."""
    from pathlib import Path

    from lcbc.evaluation import scene
    from lcbc.evaluation.rollout import ExpertActor, phrasings, run_jobs

    tasks = benchmark.tasks
    asked = phrasings(benchmark, tasks, instructions)
    if args.obedience:
        jobs = scene.obedience_jobs(tasks, args.episodes, asked, args.blind)
    else:
        jobs = scene.chain_jobs(benchmark, tasks, args.episodes, args.chain, asked)
    result = run_jobs(actor, benchmark, jobs, args.split, args.envs_per_task, cameras, size, workers=args.workers)
    if args.obedience:
        name, table = "obedience", scene.obedience_table(tasks, result.outcomes)
        text, plot = scene.obedience_markdown(table), scene.obedience_heatmap
    else:
        has_expert = not args.no_expert and all(benchmark.expert(task) is not None for task in tasks)
        expert = run_jobs(ExpertActor(benchmark), benchmark, jobs, args.split, args.envs_per_task,
                          progress=False, workers=args.workers) if has_expert else None
        name, table = "chains", scene.chain_table(args.chain, result.outcomes, expert and expert.outcomes)
        text, plot = scene.chain_markdown(table), scene.chain_plot
    table["benchmark"], table["split"] = benchmark.name, args.split
    out = Path(args.out)
    scene.write_scene_report(name, table, text, plot, out)
    Console().print(text)
    print(f"{benchmark.name}, {args.split} split; report in {out}/{name}.md, chart {out}/{name}.png")


def cmd_act(args) -> None:
    from pathlib import Path

    from lcbc.benchmark import load_benchmark
    from lcbc.evaluation.report import play_episode
    from lcbc.evaluation.rollout import Job, PolicyActor

    benchmark = load_benchmark(args.benchmark)
    benchmark.check_split(args.split)
    if args.task not in benchmark.tasks:
        raise UserError(f"--task: {args.task!r} is not a task of {benchmark.name} ({', '.join(benchmark.tasks[:5])}"
                        f"{', ...' if len(benchmark.tasks) > 5 else ''})")
    if not all(text.strip() for text in args.instruction):
        raise UserError("the instruction is empty")
    scene = benchmark.scene(args.task)
    chains = any(benchmark.can_follow(first, second) for first in scene for second in scene)
    if len(args.instruction) > 1 and not chains:
        raise UserError(f"several instructions: no tasks of {args.task}'s scene in {benchmark.name} can follow each "
                        "other in one episode (the benchmark's can_follow)")
    policy = _load_policy(args.policy, args.snap)
    language = policy.config["task_mode"] == "language"
    if len(args.instruction) > 1 and not language:
        raise UserError(f"several instructions: the policy is conditioned on {policy.config['task_mode']}, not on "
                        "words")
    cameras, size = policy_cameras(policy, benchmark)
    rendered = video_cameras(cameras, benchmark)
    if args.video and not rendered:
        raise UserError(f"--video: {benchmark.name} renders no cameras")
    video = (Path(args.video) if args.video else Path(f"{args.task}.gif")) if rendered else None
    asked = []
    for words in args.instruction:
        task, nearest = args.task, ""
        if language:
            text, cosine = policy.task_encoder.nearest_instruction(words)
            nearest = f" (nearest training instruction {text!r}, cosine {cosine:.2f})"
            task = next((task for phrase in (words, text) for task in scene if phrase in benchmark.instructions(task)),
                        None)
        print(f"instruction {words!r} asks for {task or 'no task of this scene'}{nearest}")
        asked.append(task)
    if chains:  # the scene scores every task: each request ends when its own goal is reached
        requests = [(task or "", words) for task, words in zip(asked, args.instruction)]
        job = Job(*requests[0], args.episode, args.task, tuple(requests[1:]))
    else:
        job = Job(args.task, args.instruction[0], args.episode)
    outcome, record = play_episode(PolicyActor(policy), benchmark, job, args.split, video, rendered,
                                   size if cameras else 128)
    print(f"{args.task}'s scene, {len(record['actions'])} steps" + (f"; video: {video}" if video else ""))
    reached = outcome.reached if chains else [_reached_tasks(benchmark, args.task, outcome, record)]
    for number, (words, task) in enumerate(zip(args.instruction, asked)):
        if number >= len(reached):
            print(f"{words!r}: not given, the request before it was not done")
            continue
        done = reached[number]
        if task in done:
            verdict = "succeeded: the episode reached the task asked for"
        elif task is None:
            verdict = "asked for no task of this scene"
        else:
            verdict = f"mismatch: asked for {task}, " + (f"reached {', '.join(done)} instead" if done else
                                                        "reached no task's goal")
        print(f"{words!r}: reached {', '.join(done) or 'no task'}'s goal; {verdict}")


def _reached_tasks(benchmark, task: str, outcome, record: dict) -> list[str]:
    """The scene's tasks whose goal an episode in `task`'s scene reached: as the episode scored them, and the
    others scored on its stored simulator states where the benchmark has a scorer (a success it started with
    does not count)."""
    import numpy as np

    from lcbc.rl.replay import Episode, newly_reached

    reached = outcome.reached[0]
    others = [other for other in benchmark.scene(task) if other not in reached and other != task]
    scorer = benchmark.scorer([task, *others]) if others and record["states"] else None
    if scorer is None:
        return reached
    episode = Episode(task, record["goal"], np.array(record["obs"]), np.array(record["actions"]),
                      np.array(record["success"]), np.array(record["states"]))
    return reached + [other for other in others
                      if newly_reached(scorer.score(other, record["goal"], episode).success[:, 0]).any()]


def cmd_conflicts(args) -> None:
    from lcbc.rl.conflicts import conflicts_markdown, gradient_conflicts, write_conflicts

    tasks, matrix = gradient_conflicts(_load_policy(args.policy), args.data, batches=args.batches,
                                       batch_size=args.batch_size, seed=args.seed)
    write_conflicts(tasks, matrix, args.out)
    print(conflicts_markdown(tasks, matrix))
    print(f"heatmap {args.out}/conflicts.png, tables {args.out}/conflicts.md and conflicts.json")


def cmd_finetune(args) -> None:
    from lcbc.training.finetune import run_finetune

    overrides = (["--model.reset_free", "true"] if args.reset_free else []) + args.overrides
    out = run_finetune(args.config, args.policy, args.benchmark, args.out, resume=args.resume, overrides=overrides)
    print(f"fine-tuned policy exported to {out}")


def build_parser() -> argparse.ArgumentParser:
    from lcbc.serving.server import SNAP_HELP, add_serve_parser

    parser = argparse.ArgumentParser(prog="lcbc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    collect = commands.add_parser("collect", help="collect a benchmark's scripted-expert demonstrations")
    collect.add_argument("--benchmark", required=True, help=BENCHMARK_HELP)
    collect.add_argument("--episodes-per-task", type=int, default=50)
    collect.add_argument("--obs", choices=("state", "rgb", "both"), default="state")
    collect.add_argument("--image-size", type=int, default=64)
    collect.add_argument("--camera", help="the benchmark's cameras to record, comma-separated; its first by default "
                         "(Meta-World: corner, LIBERO: agentview; LIBERO's wrist camera: robot0_eye_in_hand)")
    collect.add_argument("--out", required=True)
    collect.add_argument("--workers", type=int, default=2)
    collect.add_argument("--steps-after-success", type=int, default=20,
                         help="keep each demo going this many steps past the first success (default 20: "
                              "the demos show finishing and holding still)")
    collect.add_argument("--action-noise", type=float, default=0.0,
                         help="std of Gaussian noise added to the actions executed (not the labels stored): demos "
                              "that show the expert correcting small errors (default 0)")
    collect.add_argument("--after-tasks", type=int, default=0,
                         help="start each demo where 1 to N other tasks of the scene, done first by their experts "
                              "(by the --driver policy when given), left it: demos of a request made mid-episode, "
                              "for chained requests (default 0)")
    collect.add_argument("--driver", metavar="POLICY",
                         help="an exported policy that acts while the expert labels every step (DAgger): demos of "
                              "the states the policy reaches, failed episodes kept too")
    collect.add_argument("--first-placement", type=int, default=0, metavar="N",
                         help="run episodes on the train placements from N on (default 0); with --driver, past "
                              "the placements of the policy's own demos")
    existing = collect.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    existing.add_argument("--resume", action="store_true", help="add the missing episodes to an existing file")
    collect.set_defaults(run=cmd_collect)

    inspect = commands.add_parser("inspect", help="validate and summarize a demonstration file")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=cmd_inspect)

    convert = commands.add_parser("convert", help="a LeRobot dataset folder to an HDF5 file, or an HDF5 file to a "
                                  "LeRobot v3.0 folder")
    convert.add_argument("source", help="a LeRobot dataset folder (v3.0 or v2.1) or an HDF5 demonstration file")
    convert.add_argument("destination", help="the HDF5 file or LeRobot folder to write")
    convert.add_argument("--keys", help="comma-separated source keys to convert (default: every one with a "
                         "default place), e.g. action,observation.state,observation.images.top")
    convert.add_argument("--rename", nargs="+", default=[], metavar="OLD=NEW",
                         help="give a source key another destination name, e.g. image=obs/agentview_rgb")
    convert.add_argument("--image-size", type=int, help="resize every camera to N x N pixels")
    convert.add_argument("--images", choices=("video", "image"), help="HDF5 -> LeRobot: cameras as mp4 videos "
                         "(default; lossy) or as PNG images in the parquet files (lossless)")
    convert.add_argument("--video-codec", help="HDF5 -> LeRobot: PyAV encoder (default libsvtav1, LeRobot's)")
    convert.add_argument("--fps", type=int, help="HDF5 -> LeRobot: frames per second (default: the file's "
                         "env_args fps, else 30)")
    convert.add_argument("--instruction", help="HDF5 -> LeRobot: the task for demos that carry no instruction")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.set_defaults(run=cmd_convert)

    export = commands.add_parser("export", help="write a checkpoint's policy as safetensors + JSON")
    export.add_argument("checkpoint")
    export.add_argument("out_dir")
    export.set_defaults(run=cmd_export)

    evaluate = commands.add_parser("eval", help="success per task in a benchmark's rollouts")
    evaluate.add_argument("--policy", required=True, help="an exported policy folder")
    evaluate.add_argument("--benchmark", required=True, help=BENCHMARK_HELP)
    evaluate.add_argument("--split", default="validation", help="goal variations: validation (choosing "
                          "recipes; the default) or test (the numbers to report, once)")
    evaluate.add_argument("--episodes", type=int, default=50, help="goal variations per task (and phrasing); with "
                          "--obedience the starts each instruction gets, with --chain the number of chains")
    evaluate.add_argument("--instructions", help="JSON file: task name -> list of instructions to try; "
                          "'unseen': the built-in paraphrases the policy was not trained on")
    evaluate.add_argument("--videos", type=int, default=0, help="GIFs to record per task")
    evaluate.add_argument("--out", help="report folder (default: eval/BENCHMARK_SPLIT beside the policy folder, "
                          "e.g. runs/X/eval/metaworld-MT10_validation)")
    evaluate.add_argument("--envs-per-task", type=int, default=10)
    evaluate.add_argument("--workers", type=int, default=1, help="processes that step environments, each with its "
                          "own copy of the policy: up to one per core (default 1)")
    evaluate.add_argument("--snap", type=float, default=0.0, metavar="COSINE", help=SNAP_HELP)
    evaluate.add_argument("--no-expert", action="store_true", help="skip the scripted expert's reference run")
    evaluate.add_argument("--obedience", action="store_true", help="tasks sharing one scene (libero:goal): from the "
                          "same starts, every task's instructions; table of which task's goal each reached")
    evaluate.add_argument("--blind", metavar="INSTRUCTION", help="with --obedience: a control row, this one "
                          "instruction on the same starts")
    evaluate.add_argument("--chain", type=int, metavar="N", help="--episodes random chains of N tasks that can follow "
                          "each other, asked for one after another in one episode; success by chain length 1..N")
    evaluate.set_defaults(run=cmd_eval)

    act = commands.add_parser("act", help="run one episode following natural-language instructions, one after "
                              "another")
    act.add_argument("--policy", required=True)
    act.add_argument("--benchmark", default="metaworld:MT50", help=BENCHMARK_HELP + " (default metaworld:MT50)")
    act.add_argument("--task", required=True, help="the task whose scene the episode runs in, e.g. drawer-open-v3")
    act.add_argument("instruction", nargs="+", help="several: each given once the one before is done (scenes whose "
                     "tasks can follow each other, libero:goal)")
    act.add_argument("--snap", type=float, default=0.0, metavar="COSINE", help=SNAP_HELP)
    act.add_argument("--video", help="GIF path (default: <task>.gif)")
    act.add_argument("--split", default="validation", help="the split whose goal variation the scene takes")
    act.add_argument("--episode", type=int, default=0, help="which goal variation of the split")
    act.set_defaults(run=cmd_act)

    conflicts = commands.add_parser("conflicts", help="cosine matrix of per-task gradients (gradient conflicts)")
    conflicts.add_argument("--policy", required=True, help="an exported policy folder")
    conflicts.add_argument("--data", required=True, help="HDF5 demonstration file with the policy's tasks")
    conflicts.add_argument("--batches", type=int, default=4, help="batches averaged into each task's gradient")
    conflicts.add_argument("--batch-size", type=int, default=64, help="windows per task per batch")
    conflicts.add_argument("--seed", type=int, default=0)
    conflicts.add_argument("--out", default="conflicts")
    conflicts.set_defaults(run=cmd_conflicts)

    finetune = commands.add_parser("finetune", help="multi-task RL fine-tuning (IQL) of an exported policy")
    finetune.add_argument("--policy", required=True, help="an exported policy folder (state observations)")
    finetune.add_argument("--benchmark", required=True, help=BENCHMARK_HELP)
    finetune.add_argument("--config", required=True, help="YAML config, e.g. configs/finetune_mt10.yaml")
    finetune.add_argument("--out", help="run folder: checkpoints, logs and policy/ (default: the config's "
                          "trainer.default_root_dir)")
    finetune.add_argument("--resume", action="store_true", help="continue from <run folder>/checkpoints/last.ckpt")
    finetune.add_argument("--reset-free", action="store_true",
                          help="tasks that undo each other (drawer open and close) practise in turn without resets")
    finetune.add_argument("overrides", nargs="*", help="after --: config overrides in LightningCLI form, "
                          "e.g. -- --model.total_env_steps 100000")
    finetune.set_defaults(run=cmd_finetune)

    for name, purpose in (("fit", "train a policy with Lightning: lcbc fit --config configs/X.yaml"),
                          ("validate", "the validation loss of a checkpoint: lcbc validate --config ... --ckpt_path"),
                          ("test", "the test loss of a checkpoint: lcbc test --config ... --ckpt_path")):
        # Listed here for --help; main() hands these to LightningCLI, whose own --help lists their options.
        commands.add_parser(name, help=purpose, add_help=False)

    add_serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            from lcbc.training.cli import run_lightning_cli

            run_lightning_cli(argv)
            return
        args = build_parser().parse_args(argv)
        for name, least in SMALLEST.items():  # before anything is loaded or built
            value = getattr(args, name, None)
            if value is not None and value < least:
                raise UserError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
        args.run(args)
    except UserError as error:
        print(f"lcbc: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
