"""Data-loader throughput: lcbc's DemoDataset against a raw NumPy gather and robomimic's SequenceDataset.

Usage (from the repository root, in the project venv; no Makefile needed):

    .venv/bin/python benchmarks/loader.py --data /work/data/mt10_s0.hdf5 \
        --image-data /tmp/bench_mt10_rgb.hdf5 --out docs/BENCHMARKS.md

Make the image file with `lcbc collect --benchmark MT10 --episodes-per-task 10 --obs both --image-size 64
--out /tmp/bench_mt10_rgb.hdf5`. robomimic runs in a separate environment (it pins its own
dependencies), by default .bench-venv in the repository root:

    python3 -m venv .bench-venv && .bench-venv/bin/pip install torch==2.13.0 robomimic six

Without it, robomimic is reported as "not measured".

What is measured, in windows (samples) per second; every loader sees exactly the same random batches of
window indices, and the repeats of all loaders of one case are interleaved (repeat 1 of each loader, then
repeat 2 of each, ...) so that load from other jobs on a shared machine hits them alike:

* raw gather: the limit. The arrays already in memory, index arrays already computed; only the NumPy
  fancy-index gather of the history frames of each observation key and of the action chunk is timed.
* lcbc: `DemoDataset` through a torch DataLoader (num_workers=0, batch_sampler, `keep_batch` collate),
  as `DemoDataModule` builds it; images lazy (read from HDF5 per batch) or with `cache_images=True`.
* robomimic: `SequenceDataset` with the same obs keys, frame_stack=history, seq_length=action_chunk,
  padding at both ends, pad masks, no next obs; hdf5_cache_mode "low_dim" for the low-dim file and
  None / "all" for the image file; a torch DataLoader (num_workers=0, default collate, same batches).
  It runs in its own interpreter, kept alive and driven one repeat at a time over stdin.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report import write_section

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROBOMIMIC_PYTHON = REPO / ".bench-venv" / "bin" / "python"
SECTION = "## Loader throughput"

# Runs inside the robomimic environment. argv[1]: JSON job; argv[2]: .npy of batches (repeats, batches,
# batch size); argv[3]: where to save the first batch, for the equivalence check. Prints "READY {json}"
# once the dataset is built and warm, then for every repeat index read from stdin one line "RATE x".
ROBOMIMIC_HELPER = r'''
import json, sys, time
import numpy as np
import torch
import robomimic
import robomimic.utils.obs_utils as ObsUtils
from robomimic.utils.dataset import SequenceDataset

job = json.loads(sys.argv[1])
batches = np.load(sys.argv[2])
specs = {"obs": {"low_dim": job["low_dim_keys"], "rgb": job["rgb_keys"]}}
ObsUtils.initialize_obs_utils_with_obs_specs(specs)
kwargs = dict(hdf5_path=job["path"], obs_keys=tuple(job["low_dim_keys"] + job["rgb_keys"]),
              dataset_keys=("actions",), frame_stack=job["history"], seq_length=job["action_chunk"],
              pad_frame_stack=True, pad_seq_length=True, get_pad_mask=True, goal_mode=None,
              hdf5_cache_mode=job["cache_mode"], hdf5_use_swmr=False, hdf5_normalize_obs=False,
              filter_by_attribute=None)
start = time.perf_counter()
try:
    dataset = SequenceDataset(load_next_obs=False, **kwargs)
except TypeError:  # robomimic releases without load_next_obs
    start = time.perf_counter()
    dataset = SequenceDataset(**kwargs)
init_s = time.perf_counter() - start
assert len(dataset) == job["length"], (len(dataset), job["length"])

def loader(batch_list):
    return torch.utils.data.DataLoader(dataset, batch_sampler=[b.tolist() for b in batch_list], num_workers=0)

first = next(iter(loader(batches[0][:1])))
np.savez(sys.argv[3], actions=first["actions"].numpy(),
         **{"obs/" + key: value.numpy() for key, value in first["obs"].items()})
for _ in loader(batches[0][:2]):  # warm-up
    pass
print("READY " + json.dumps({"init_s": init_s, "version": robomimic.__version__}), flush=True)
for line in sys.stdin:
    repeat = batches[int(line)]
    batch_list = loader(repeat)
    start = time.perf_counter()
    for batch in batch_list:
        pass
    print(f"RATE {repeat.size / (time.perf_counter() - start)}", flush=True)
'''


def make_batches(n_windows: int, batch_size: int, n_batches: int, repeats: int, seed: int) -> np.ndarray:
    """(repeats, n_batches, batch_size) window indices drawn like shuffled epochs (no repeats within one)."""
    rng = np.random.default_rng(seed)
    total = repeats * n_batches * batch_size
    stream = np.concatenate([rng.permutation(n_windows) for _ in range(-(-total // n_windows))])
    return stream[:total].reshape(repeats, n_batches, batch_size)


class Raw:
    """The limit: only the fancy-index gather of in-memory arrays, every index array precomputed.
    Like any loop over a loader, it keeps the previous batch alive while it gathers the next one
    (fresh memory for every batch: with 64x64 images, page faults are part of the cost)."""

    def __init__(self, name: str, arrays: dict[str, np.ndarray], actions: np.ndarray, dataset, batches):
        self.name, self.arrays, self.actions, self.batches = name, arrays, actions, batches
        self.windows = [[(w["history"], w["chunk"]) for w in map(dataset.window_indices, repeat)]
                        for repeat in batches]

    def setup(self) -> None:
        self.repeat(0, count=2)  # warm-up

    def repeat(self, index: int, count: int | None = None) -> float:
        windows = self.windows[index][:count]
        gc.collect()
        start = time.perf_counter()
        for history, chunk in windows:  # `_batch` stays alive while the next one is gathered
            _batch = [values[history] for values in self.arrays.values()], self.actions[chunk]
        return len(windows) * self.batches.shape[-1] / (time.perf_counter() - start)


class Loader:
    """lcbc's DemoDataset through a DataLoader built like DemoDataModule's (or `__getitems__` directly)."""

    def __init__(self, name: str, dataset, batches, direct: bool = False):
        self.name, self.dataset, self.batches, self.direct = name, dataset, batches, direct

    def setup(self) -> None:
        self.repeat(0, count=2)  # warm-up: file handles, page cache, allocator

    def repeat(self, index: int, count: int | None = None) -> float:
        from lcbc.data.dataset import keep_batch

        batch_list = [b.tolist() for b in self.batches[index][:count]]
        if self.direct:
            iterator = map(self.dataset.__getitems__, batch_list)
        else:
            iterator = torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_list,
                                                   collate_fn=keep_batch, num_workers=0)
        gc.collect()
        start = time.perf_counter()
        for _ in iterator:
            pass
        return len(batch_list) * self.batches.shape[-1] / (time.perf_counter() - start)


class Robomimic:
    """robomimic's SequenceDataset in its own interpreter, one repeat per request."""

    def __init__(self, name: str, python: Path, path: str, low_dim_keys: list[str], rgb_keys: list[str],
                 cache_mode, args, dataset, arrays: dict[str, np.ndarray], batches: np.ndarray):
        self.name, self.python, self.batches = name, python, batches
        self.dataset, self.arrays = dataset, arrays
        self.history = args.history
        self.job = {"path": str(Path(path).resolve()), "low_dim_keys": low_dim_keys, "rgb_keys": rgb_keys,
                    "history": args.history, "action_chunk": args.action_chunk, "cache_mode": cache_mode,
                    "length": len(dataset)}
        self.info: dict = {}

    def setup(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        tmp = Path(self.tmp.name)
        np.save(tmp / "batches.npy", self.batches)
        self.stderr = open(tmp / "stderr.txt", "w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [str(self.python), "-c", ROBOMIMIC_HELPER, json.dumps(self.job), str(tmp / "batches.npy"),
             str(tmp / "first.npz")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, cwd=tmp, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.info = json.loads(self._read("READY "))
        self._check(np.load(tmp / "first.npz"))

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        self.stderr.seek(0)
        sys.stderr.write(self.stderr.read()[-3000:])
        raise SystemExit(f"robomimic run failed (exit {self.proc.wait()}); see above")

    def _check(self, saved) -> None:
        """Same work: robomimic's first batch holds lcbc's windows. Its obs and actions carry
        frame_stack-1 earlier frames plus seq_length frames from the current step."""
        w = self.dataset.window_indices(self.batches[0][0])
        for key, values in self.arrays.items():
            np.testing.assert_allclose(saved["obs/" + key][:, :self.history], values[w["history"]], atol=1e-6,
                                       err_msg=f"robomimic {key}")
        np.testing.assert_allclose(saved["actions"][:, self.history - 1:], self.dataset.actions[w["chunk"]],
                                   atol=1e-6, err_msg="robomimic actions")

    def repeat(self, index: int) -> float:
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()
        return float(self._read("RATE "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()
        self.tmp.cleanup()


def measure(case: str, runners: list, repeats: int) -> list[dict]:
    """Set every runner up, then interleave their repeats, rotating the order each time."""
    for runner in runners:
        print(f"[{case}] setting up {runner.name}", flush=True)
        runner.setup()
    rates: dict[str, list[float]] = {runner.name: [] for runner in runners}
    for index in range(repeats):
        print(f"[{case}] repeat {index + 1}/{repeats}", flush=True)
        shift = index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            rates[runner.name].append(runner.repeat(index))
    rows = []
    for runner in runners:
        values = rates[runner.name]
        row = {"case": case, "loader": runner.name, "median": statistics.median(values), "min": min(values),
               "max": max(values), "rates": values}
        if isinstance(runner, Robomimic):
            row.update(batches=runner.batches.shape[1], init_s=runner.info["init_s"])
            runner.close()
        rows.append(row)
    return rows


def check_lcbc(dataset, arrays: dict[str, np.ndarray], batch: np.ndarray) -> None:
    """lcbc's batch holds exactly the raw gather's values."""
    w = dataset.window_indices(batch)
    out = dataset.__getitems__(batch)
    for key, values in arrays.items():
        np.testing.assert_array_equal(out["obs"][key].numpy(), values[w["history"]], err_msg=key)
    np.testing.assert_array_equal(out["actions"].numpy(), dataset.actions[w["chunk"]])


def obs_keys_of(path: str, images: bool) -> list[str]:
    """The uint8 (image) or the other (low-dim) observation keys of the file's first demo."""
    import h5py

    from lcbc.data.hdf5 import demo_names

    with h5py.File(path, "r") as file:
        obs = file["data"][demo_names(file)[0]]["obs"]
        return [key for key in sorted(obs) if (obs[key].dtype == np.uint8) == images]


def run(args) -> tuple[list[dict], dict]:
    from lcbc.data.dataset import DemoDataset

    python = Path(args.robomimic_python)
    have_robomimic = python.exists()
    rows, info = [], {"load_start": os.getloadavg()[0]}
    if args.data:
        keys = args.low_dim_keys.split(",") if args.low_dim_keys else obs_keys_of(args.data, images=False)
        ds = DemoDataset(args.data, obs_keys=keys, history=args.history, action_chunk=args.action_chunk,
                         clip_actions=None)
        batches = make_batches(len(ds), args.batch_size, args.batches, args.repeats, args.seed)
        check_lcbc(ds, ds.low_dim, batches[0][0])
        case = f"low-dim ({'+'.join(keys)}), {len(ds)} windows"
        runners = [Raw("raw NumPy gather (limit)", ds.low_dim, ds.actions, ds, batches),
                   Loader("lcbc DemoDataset", ds, batches),
                   Loader("lcbc `__getitems__` called directly (no DataLoader)", ds, batches, direct=True)]
        name = 'robomimic SequenceDataset, cache "low_dim"'
        if have_robomimic:
            runners.append(Robomimic(name, python, args.data, keys, [], "low_dim", args, ds, ds.low_dim,
                                     batches[:, :args.robomimic_batches]))
        rows += measure(case, runners, args.repeats)
        if not have_robomimic:
            rows.append({"case": case, "loader": name})
        info["robomimic"] = next((r.info["version"] for r in runners if isinstance(r, Robomimic)), None)
    if args.image_data:
        path = args.image_data
        images = args.image_keys.split(",") if args.image_keys else obs_keys_of(path, images=True)
        low = args.low_dim_keys.split(",") if args.low_dim_keys else obs_keys_of(path, images=False)
        common = {"obs_keys": low + images, "history": args.history, "action_chunk": args.action_chunk,
                  "clip_actions": None}
        lazy = DemoDataset(args.image_data, **common)
        cached = DemoDataset(args.image_data, cache_images=True, **common)
        arrays = {**cached.low_dim, **cached._image_cache}
        batches = make_batches(len(lazy), args.batch_size, args.batches, args.repeats, args.seed)
        check_lcbc(lazy, arrays, batches[0][0])
        check_lcbc(cached, arrays, batches[0][0])
        shape = "x".join(map(str, next(iter(lazy.image_shapes.values()))))
        case = f"images ({'+'.join(images)} {shape} uint8, {'+'.join(low)}), {len(lazy)} windows"
        runners = [Raw("raw NumPy gather (limit, images in memory)", arrays, cached.actions, cached, batches),
                   Loader("lcbc DemoDataset, lazy HDF5 images", lazy, batches[:, :args.lazy_batches]),
                   Loader("lcbc DemoDataset, cache_images=True", cached, batches)]
        missing = []
        for mode, label in ((None, "None (lazy)"), ("all", '"all"')):
            name = f"robomimic SequenceDataset, cache {label}"
            if have_robomimic:
                runners.append(Robomimic(name, python, args.image_data, low, images, mode, args, lazy, arrays,
                                         batches[:, :args.robomimic_batches]))
            else:
                missing.append({"case": case, "loader": name})
        rows += measure(case, runners, args.repeats) + missing
        info["robomimic"] = info.get("robomimic") or next(
            (r.info["version"] for r in runners if isinstance(r, Robomimic)), None)
    info["load_end"] = os.getloadavg()[0]
    return rows, info


def ratios(rows: list[dict]) -> list[tuple[str, str, float, float | None]]:
    """(case, lcbc loader, lcbc / raw gather, lcbc / robomimic at the comparable cache setting)."""
    pairs = {"lcbc DemoDataset": 'robomimic SequenceDataset, cache "low_dim"',
             "lcbc DemoDataset, lazy HDF5 images": "robomimic SequenceDataset, cache None (lazy)",
             "lcbc DemoDataset, cache_images=True": 'robomimic SequenceDataset, cache "all"'}
    out = []
    for row in rows:
        if row["loader"] not in pairs:
            continue
        same = {r["loader"]: r for r in rows if r["case"] == row["case"]}
        raw = next(r for name, r in same.items() if name.startswith("raw"))
        rm = same.get(pairs[row["loader"]], {})
        out.append((row["case"], row["loader"], row["median"] / raw["median"],
                    row["median"] / rm["median"] if "median" in rm else None))
    return out


def cpu_name() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(python), *sys.argv])


def markdown(rows: list[dict], info: dict, args) -> str:
    import h5py

    fmt = "{:,.0f}".format
    robomimic_version = info.get("robomimic") or "not installed"
    machine = (f"Measured {datetime.date.today().isoformat()} on {cpu_name()}, {os.cpu_count()} CPU cores "
               f"(shared with other jobs: 1-min load average {info['load_start']:.1f} at start, "
               f"{info['load_end']:.1f} at end), CPU only; Python {platform.python_version()}, "
               f"torch {torch.__version__}, NumPy {np.__version__}, h5py {h5py.__version__}, "
               f"robomimic {robomimic_version} (separate venv).")
    method = (f"Windows (samples) per second, batch size {args.batch_size}, history {args.history}, "
              f"action chunk {args.action_chunk}; median (min-max) over {args.repeats} interleaved repeats "
              f"of {args.batches} batches (lcbc lazy images: {min(args.lazy_batches, args.batches)}, "
              f"robomimic: {args.robomimic_batches}); every loader gets the same random batches of window "
              "indices. The raw gather times only NumPy fancy indexing of arrays already in memory with "
              "precomputed indices (history frames of every obs key, the action chunk); like a loop over a "
              "loader, it keeps the previous batch alive while gathering the next. lcbc and robomimic "
              "run through a torch DataLoader with num_workers=0. robomimic's `SequenceDataset` uses the "
              "same obs keys, frame_stack=history, seq_length=action_chunk, padding at both ends, pad masks "
              "and no next obs (it returns history-1+chunk frames of obs and actions); its first batch is "
              "checked to hold the same values as lcbc's.")
    lines = [SECTION, "", machine, "", "Command:", "", "```", command_line(), "```", "", method, "",
             "| Batch | Loader | windows/s (median) | min-max |", "|---|---|---:|---:|"]
    for row in rows:
        if "median" in row:
            lines.append(f"| {row['case']} | {row['loader']} | {fmt(row['median'])} | "
                         f"{fmt(row['min'])}-{fmt(row['max'])} |")
        else:
            lines.append(f"| {row['case']} | {row['loader']} | not measured (no robomimic venv) | |")
    goals = ("Ratios of medians (goals: lcbc / raw gather >= 0.5, lcbc / robomimic >= 10; robomimic at its "
             "comparable cache setting: \"low_dim\" for low-dim, None for lazy images, \"all\" for cached "
             "images):")
    lines += ["", goals, "", "| Batch | lcbc loader | lcbc / raw gather | lcbc / robomimic |",
              "|---|---|---:|---:|"]
    for case, loader, raw, rm in ratios(rows):
        raw_text = f"{raw:.2f} {'(met)' if raw >= 0.5 else '(missed)'}"
        rm_text = "not measured" if rm is None else f"{rm:.1f}x {'(met)' if rm >= 10 else '(missed)'}"
        lines.append(f"| {case} | {loader} | {raw_text} | {rm_text} |")
    inits = [f"{row['loader'].split(', ', 1)[1]} {row['init_s']:.1f} s" for row in rows if "init_s" in row]
    if inits:
        lines += ["", "robomimic dataset construction (not in the rates): " + "; ".join(inits) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="low-dimensional robomimic-layout HDF5 file")
    parser.add_argument("--image-data", help="HDF5 file with uint8 image observations")
    parser.add_argument("--low-dim-keys",
                        help="comma-separated low-dim obs keys (default: all non-uint8 keys)")
    parser.add_argument("--image-keys", help="comma-separated image obs keys (default: all uint8 keys)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--history", type=int, default=2)
    parser.add_argument("--action-chunk", type=int, default=1)
    parser.add_argument("--batches", type=int, default=100, help="batches per repeat")
    parser.add_argument("--lazy-batches", type=int, default=20,
                        help="batches per repeat for lcbc with lazy image reads")
    parser.add_argument("--robomimic-batches", type=int, default=10, help="batches per repeat for robomimic")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--robomimic-python", default=str(DEFAULT_ROBOMIMIC_PYTHON),
                        help="interpreter of the environment with robomimic installed")
    parser.add_argument("--out", help="markdown file whose '## Loader throughput' section to write")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    if not args.data and not args.image_data:
        parser.error("give --data and/or --image-data")
    args.robomimic_batches = min(args.robomimic_batches, args.batches)
    args.lazy_batches = min(args.lazy_batches, args.batches)
    rows, info = run(args)
    section = markdown(rows, info, args)
    print("\n" + section)
    if args.out:
        write_section(Path(args.out), section)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "info": info}, indent=1))


if __name__ == "__main__":
    main()
