"""Load test of the HTTP policy server: the real uvicorn server in a subprocess, bound to 127.0.0.1 only.

Usage (from the repository root, in the project venv):

    .venv/bin/python benchmarks/server_load.py [--policy DIR] [--requests 3000] [--clients 1,8] \
        [--out docs/SERVING.md]

Without --policy, an untrained RT-1-tiny policy shaped like the MT10 state config (39-d state, history 2,
10 instructions, language) is exported to a temporary folder; untrained weights cost the same to run.

For each client count, that many threads (one keep-alive httpx client each) share --requests requests:
mostly /act in a per-client session (a /reset every --episode-length steps), some /act without a
session, and a --malformed share of bad requests (bad JSON, wrong shape, NaN, missing key, non-numeric
value, unknown session, oversized body). A valid request must get 200 and a malformed one a 4xx; anything
else (5xx, wrong status, connection error) is a failure. A run stops sending at --max-seconds. Reported:
failures, throughput (all requests / wall time), p50/p99 latency of the valid and the malformed requests.
Clients and server share the machine's CPU cores.
"""

import argparse
import base64
import datetime
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- server-load:begin -->", "<!-- server-load:end -->"
MALFORMED_KINDS = ("bad-json", "short", "nan", "missing-key", "non-numeric", "unknown-session", "oversized")
MT10_INSTRUCTIONS = ["reach the goal", "push the puck to the goal", "pick up the puck and place it",
                     "open the door", "open the drawer", "close the drawer", "press the button from the top",
                     "insert the peg into the hole", "open the window", "close the window"]


def build_throwaway_policy(directory: str) -> str:
    """An untrained RT-1-tiny language policy shaped like configs/bc_mt10_state.yaml."""
    from lcbc.policies.language_policy import LanguagePolicy
    from lcbc.policies.rt1 import RT1Config

    def stats(n):
        return {"mean": [0.0] * n, "std": [1.0] * n, "min": [-1.0] * n, "max": [1.0] * n,
                "q01": [-1.0] * n, "q99": [1.0] * n}

    tasks = [f"task-{i}" for i in range(len(MT10_INSTRUCTIONS))]
    rt1 = RT1Config.preset("rt1-tiny", history=2)
    policy = LanguagePolicy(rt1, {"actions": stats(4), "state": stats(39)}, ["state"], [], MT10_INSTRUCTIONS,
                            tasks, "language")
    policy.task_encoder.embed_vocabulary()
    policy.save_pretrained(directory)
    return directory


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(policy: str, port: int, log_path: Path, wait_s: float = 120.0) -> subprocess.Popen:
    """`lcbc serve` on 127.0.0.1:port; returns once /health answers."""
    command = [sys.executable, "-m", "lcbc.cli", "serve", "--policy", policy, "--host", "127.0.0.1",
               "--port", str(port)]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(process)
    raise SystemExit(f"server did not answer /health within {wait_s:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Workload:
    """Valid and malformed request bodies, built from what /health says the policy needs."""

    def __init__(self, health: dict, seed: int):
        self.health, self.rng = health, random.Random(seed)
        self.low_dim = {k: s for k, s in health["observation_keys"].items() if len(s) == 1}
        self.images = {k: s for k, s in health["observation_keys"].items() if len(s) == 3}

    def observation(self) -> dict:
        obs = {key: [self.rng.gauss(0, 1) for _ in range(shape[0])] for key, shape in self.low_dim.items()}
        for key, shape in self.images.items():
            pixels = self.rng.randbytes(math.prod(shape))
            obs[key] = {"base64": base64.b64encode(pixels).decode(), "shape": shape}
        return obs

    def act(self, session_id: str | None) -> dict:
        body = {"observation": self.observation()}
        mode = self.health["task_mode"]
        if mode == "language":
            body["instruction"] = self.rng.choice(self.health["instructions"])
        elif mode == "onehot":
            body["task"] = self.rng.choice(self.health["tasks"])
        else:
            body["goal"] = {key: [self.rng.gauss(0, 1) for _ in range(shape[0])]
                            for key, shape in self.health["goal_keys"].items()}
        if session_id is not None:
            body["session_id"] = session_id
        return body

    def malformed(self, kind: str) -> tuple[str, bytes]:
        """(path, body) of a request that must be refused with a 4xx."""
        body = self.act(None)
        key = next(iter(self.low_dim or self.images))
        if kind == "bad-json":
            return "/act", json.dumps(body).encode()[:-7]
        obs = body["observation"]
        if kind == "short":
            obs[key] = obs[key][:-1] if key in self.low_dim else {"base64": "AAAA"}
        elif kind == "nan":
            obs[key] = [float("nan")] * self.low_dim[key][0] if key in self.low_dim else None
        elif kind == "missing-key":
            del obs[key]
        elif kind == "non-numeric":
            obs[key] = ["x"] * self.low_dim[key][0] if key in self.low_dim else "x"
        elif kind == "unknown-session":
            return "/reset", json.dumps({"session_id": f"never-used-{self.rng.random()}"}).encode()
        elif kind == "oversized":
            return "/act", b" " * (4 * 1024 * 1024 + 1)
        return "/act", json.dumps(body).encode()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def run_clients(base: str, health: dict, clients: int, requests: int, malformed_share: float,
                episode_length: int, max_seconds: float) -> dict:
    """`clients` threads share `requests` requests; returns latencies, failures and wall time."""
    latencies = {"valid": [], "malformed": []}
    failures: list[str] = []
    sent = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]

    def client(index: int) -> None:
        workload = Workload(health, seed=index)
        session = f"load-client-{index}-{clients}"
        local = {"valid": [], "malformed": []}
        bad, steps = [], 0
        with httpx.Client(base_url=base, timeout=30.0) as http:
            for i in range(shares[index]):
                if time.monotonic() > deadline:
                    break
                if workload.rng.random() < malformed_share:
                    kind = MALFORMED_KINDS[(i + index) % len(MALFORMED_KINDS)]
                    path, content = workload.malformed(kind)
                    expect, label = "4xx", f"malformed {kind}"
                elif steps >= episode_length:
                    path, content, steps = "/reset", json.dumps({"session_id": session}).encode(), 0
                    expect, label = "200", "reset"
                else:
                    stateless = workload.rng.random() < 0.2
                    path, content = "/act", json.dumps(workload.act(None if stateless else session)).encode()
                    steps += 0 if stateless else 1
                    expect, label = "200", "act without session" if stateless else "act in session"
                start = time.perf_counter()
                try:
                    response = http.post(path, content=content, headers={"content-type": "application/json"})
                    status = response.status_code
                except httpx.HTTPError as error:
                    status, response = None, error
                elapsed = time.perf_counter() - start
                ok = status == 200 if expect == "200" else status is not None and 400 <= status < 500
                local["valid" if expect == "200" else "malformed"].append(elapsed)
                if not ok:
                    detail = response.text[:200] if status is not None else repr(response)
                    bad.append(f"{label}: status {status}: {detail}")
        with lock:
            for kind in local:
                latencies[kind].extend(local[kind])
            failures.extend(bad)
            sent[0] += sum(len(v) for v in local.values())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "sent": sent[0], "asked": requests, "wall_s": wall, "failures": failures,
            "latencies": latencies}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = f", load average before the run {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    system = f"{platform.system()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} CPU cores ({cpu}), {system}{load}"


def table(results: list[dict]) -> str:
    lines = ["| clients | requests (valid / malformed) | failures | throughput (req/s) | valid p50 (ms) | "
             "valid p99 (ms) | malformed p50 (ms) | malformed p99 (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        valid, bad = r["latencies"]["valid"], r["latencies"]["malformed"]
        lines.append(f"| {r['clients']} | {r['sent']} ({len(valid)} / {len(bad)}) | {len(r['failures'])} | "
                     f"{r['sent'] / r['wall_s']:.0f} | {1e3 * percentile(valid, 50):.1f} | "
                     f"{1e3 * percentile(valid, 99):.1f} | {1e3 * percentile(bad, 50):.1f} | "
                     f"{1e3 * percentile(bad, 99):.1f} |")
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace what lies between the markers in `path` (the rest of the file is left alone)."""
    content = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in content and END in content:
        content = content[:content.index(BEGIN)] + block + content[content.index(END) + len(END):]
    else:
        content = content.rstrip("\n") + ("\n\n" if content else "") + block + "\n"
    path.write_text(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="exported policy folder (default: a throwaway untrained one)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per client count, in total")
    parser.add_argument("--clients", default="1,8", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--malformed", type=float, default=0.1, help="share of malformed requests")
    parser.add_argument("--episode-length", type=int, default=50, help="session steps between /reset calls")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="stop sending after this, per run")
    parser.add_argument("--out", help="markdown file to write the results into (between markers)")
    args = parser.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]
    if args.requests < 1 or min(client_counts) < 1 or not 0 <= args.malformed <= 1:
        parser.error("--requests and --clients must be >= 1 and --malformed within 0..1")

    host = machine()  # before the run: the load average is the machine's other work
    with tempfile.TemporaryDirectory(prefix="lcbc-server-load-") as tmp:
        policy = args.policy or build_throwaway_policy(str(Path(tmp) / "policy"))
        port = free_loopback_port()
        log_path = Path(tmp) / "server.log"
        server = start_server(policy, port, log_path)
        base = f"http://127.0.0.1:{port}"
        try:
            health = httpx.get(f"{base}/health").json()
            run_clients(base, health, 1, 20, 0.0, args.episode_length, 60)  # warm-up, not reported
            results = []
            for clients in client_counts:
                result = run_clients(base, health, clients, args.requests, args.malformed,
                                     args.episode_length, args.max_seconds)
                results.append(result)
                print(f"{clients} clients: {result['sent']} requests in {result['wall_s']:.1f} s, "
                      f"{len(result['failures'])} failures", flush=True)
                for failure in result["failures"][:10]:
                    print(f"  {failure}")
            alive = httpx.get(f"{base}/health").status_code == 200
        finally:
            stop_server(server)

    argv = [f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]
    command = ".venv/bin/python " + " ".join(shlex.quote(a) for a in argv)
    early = [r for r in results if r["sent"] < r["asked"]]
    notes = [f"Command: `{command}`", f"Date: {datetime.date.today().isoformat()}", f"Machine: {host}",
             f"Policy: {args.policy or 'throwaway untrained RT-1-tiny, 39-d state, history 2, language'}; "
             f"task mode {health['task_mode']}, observation {health['observation_keys']}",
             f"Malformed share: {args.malformed:.0%} (kinds: {', '.join(MALFORMED_KINDS)}); sessions reset "
             f"every {args.episode_length} steps; /health answered after the runs: {alive}"]
    if early:
        stopped = ", ".join(str(r["clients"]) for r in early)
        notes.append(f"Stopped at --max-seconds before all requests were sent, with clients: {stopped}")
    text = "\n".join(f"- {note}" for note in notes) + "\n\n" + table(results)
    print(text)
    if args.out:
        write_section(Path(args.out), text)
        print(f"written to {args.out}")
    if any(r["failures"] for r in results) or not alive:
        sys.exit(1)


if __name__ == "__main__":
    main()
