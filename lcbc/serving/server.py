"""Serve an exported LanguagePolicy over HTTP: `POST /act`, `POST /reset`, `GET /health`.

Why it is built this way:

* One policy in memory and one lock around it. A small RT-1 forward pass takes milliseconds on one core;
  serializing calls is simpler and, on a few CPU cores, as fast as running them in parallel.
* The policy keeps its episodes' memory inside itself (`policy.episode_memory`: the history window and,
  with temporal ensembling, the recent action chunks). The server keeps one saved memory per session id
  and swaps it in and out around each call, under the lock, so many clients (episodes) share one network
  without sharing a history window.
* Chained requests ("open the drawer", then "turn on the stove", one episode) need no endpoint of their
  own: the instruction comes with every /act call, so a client sends the next one in the same session
  once it sees the goal reached, and the history window carries over. Only the client, which holds the
  simulator or robot, can tell when a goal is reached.
* Every request is validated here, before the policy sees it, so a client's mistake is a 4xx JSON error
  whose `detail` names the field, never a 500 or a crashed worker.
* Heavy imports (torch, FastAPI) happen inside the functions, so `lcbc --help` stays fast when the CLI
  registers the `serve` subcommand through `add_serve_parser`. (No `from __future__ import annotations`:
  FastAPI must see the real `Request` class on endpoints defined inside `create_app`.)
"""

import argparse
import base64
import binascii
import json
import logging
import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from lcbc.errors import UserError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from lcbc.policies.language_policy import LanguagePolicy

MiB = 1 << 20
MAX_INSTRUCTION_CHARS = 1000
MAX_SESSION_ID_CHARS = 128
# Instructions outside the trained vocabulary are embedded once and cached by the task encoder; this
# bounds how many such cached embeddings clients can make the server hold (oldest dropped first).
MAX_CACHED_INSTRUCTIONS = 4096
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger("lcbc.serving")


class RequestError(Exception):
    """A client's mistake: becomes an HTTP error with this status and a one-line `detail`."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# ---- validation of JSON values --------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _check_nested(value: Any, shape: tuple[int, ...], field: str, byte: bool) -> None:
    """Walk nested lists: exact shape, numbers only (no strings, booleans or null); bytes are 0..255 ints."""
    if not shape:
        if byte:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise RequestError(422, f"{field}: expected an integer pixel value 0..255, got {value!r:.40}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(422, f"{field}: expected a number, got {_type_name(value)}")
        return
    if not isinstance(value, list):
        raise RequestError(422, f"{field}: expected a list of {shape[0]} items (shape {list(shape)}), "
                                f"got {_type_name(value)}")
    if len(value) != shape[0]:
        raise RequestError(422, f"{field}: expected {shape[0]} items (shape {list(shape)}), got {len(value)}")
    for i, item in enumerate(value):
        _check_nested(item, shape[1:], f"{field}[{i}]", byte)


def parse_numbers(value: Any, shape: tuple[int, ...], field: str) -> np.ndarray:
    """Nested lists of finite numbers of exactly `shape` -> float32 array. NaN and Infinity are rejected:
    Python's JSON parser accepts them, and one NaN in the state would silently poison the action."""
    _check_nested(value, shape, field, byte=False)
    try:
        with np.errstate(over="ignore"):
            array = np.asarray(value, dtype=np.float64).astype(np.float32)
    except OverflowError:
        raise RequestError(422, f"{field}: a number is too large") from None
    finite = np.isfinite(array)
    if not finite.all():
        where = "".join(f"[{i}]" for i in np.argwhere(~finite)[0])
        raise RequestError(422, f"{field}{where}: NaN, Infinity or a number beyond float32 range "
                                "is not allowed")
    return array


def parse_image(value: Any, shape: tuple[int, ...], field: str) -> np.ndarray:
    """An RGB image: {"base64": raw uint8 bytes (row-major h, w, 3), "shape": [h, w, 3]} or nested lists
    of 0..255 integers -> uint8 array of exactly `shape`."""
    if isinstance(value, list):
        _check_nested(value, shape, field, byte=True)
        return np.asarray(value, dtype=np.uint8)
    if not isinstance(value, dict):
        expected = f'{{"base64": ..., "shape": {list(shape)}}} or nested lists'
        raise RequestError(422, f"{field}: expected {expected}, got {_type_name(value)}")
    if value.get("shape") != list(shape):
        raise RequestError(422, f"{field}.shape: expected {list(shape)}, got {value.get('shape')!r:.60}")
    data = value.get("base64")
    if not isinstance(data, str):
        raise RequestError(422, f"{field}.base64: expected a base64 string, got {_type_name(data)}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{field}.base64: not valid base64") from None
    expected = math.prod(shape)
    if len(raw) != expected:
        raise RequestError(422, f"{field}.base64: decodes to {len(raw)} bytes, expected {expected} "
                                f"(raw uint8 RGB pixels, shape {list(shape)}, row-major)")
    return np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(shape)


def parse_json_body(body: bytes) -> dict:
    """The request body as a JSON object; malformed JSON is a 400, any other JSON value a 422."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, >4300-digit ints, deep nesting
        raise RequestError(400, f"request body: not valid JSON ({str(error)[:120]})") from None
    if not isinstance(payload, dict):
        raise RequestError(422, f"request body: expected a JSON object, got {_type_name(payload)}")
    return payload


def _session_id(payload: dict, required: bool) -> str | None:
    session_id = payload.get("session_id")
    if session_id is None and not required:
        return None
    if session_id is None:
        raise RequestError(422, "session_id: missing")
    if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID_CHARS:
        got = f"{len(session_id)} characters" if isinstance(session_id, str) else _type_name(session_id)
        raise RequestError(422, f"session_id: expected a non-empty string of at most {MAX_SESSION_ID_CHARS} "
                                f"characters, got {got}")
    return session_id


# ---- the policy behind a lock, with per-session histories -----------------------------------------------


class PolicyService:
    """The policy, its sessions and the locks; no HTTP in here, so it can be tested and reused directly.

    `sessions` maps a session id to the policy's saved history (None = next call starts an episode), in
    least-recently-used order; past `max_sessions`, the least recently used session is dropped.
    """

    def __init__(self, policy: "LanguagePolicy", max_sessions: int = 1024):
        if max_sessions < 1:
            raise UserError(f"max_sessions must be at least 1, got {max_sessions}")
        self.policy, self.max_sessions = policy, max_sessions
        config = policy.config
        self.task_mode = config["task_mode"]
        size = config["rt1"]["image_size"]
        self.image_keys = list(config["image_keys"])
        self.observation_shapes = {key: (len(policy.stats[key]["mean"]),) for key in config["low_dim_keys"]}
        self.observation_shapes.update({key: (size, size, 3) for key in self.image_keys})
        self.goal_shapes = {key: (len(policy.stats[key]["mean"]),) for key in config["goal_keys"]}
        self.vocabulary = set(config["instructions"])
        self.sessions: OrderedDict[str, dict | None] = OrderedDict()
        self.lock = threading.Lock()  # the policy, its history slot, the sessions, the instruction cache
        self.embed_lock = threading.Lock()  # the text model, used outside `lock` so it never stalls others

    # ---- request parsing ----

    def _observation(self, value: Any, shapes: dict[str, tuple[int, ...]], field: str) -> dict:
        if value is None:
            raise RequestError(422, f"{field}: missing; expected an object with keys {', '.join(shapes)}")
        if not isinstance(value, dict):
            raise RequestError(422, f"{field}: expected an object with keys {', '.join(shapes)}, "
                                    f"got {_type_name(value)}")
        arrays = {}
        for key, shape in shapes.items():
            name = f"{field}.{key}"
            if key not in value:
                raise RequestError(422, f"{name}: missing (the policy needs {', '.join(shapes)})")
            parse = parse_image if key in self.image_keys else parse_numbers
            arrays[key] = parse(value[key], shape, name)
        return arrays

    def _conditioning(self, payload: dict) -> dict:
        """The keyword arguments for `policy.act` that say which task: instruction, task id or goal."""
        if self.task_mode == "language":
            text = payload.get("instruction")
            if text is None:
                raise RequestError(422, "instruction: missing; this policy is conditioned on language")
            if not isinstance(text, str):
                raise RequestError(422, f"instruction: expected a string, got {_type_name(text)}")
            if not text.strip():
                raise RequestError(422, "instruction: must not be empty")
            if len(text) > MAX_INSTRUCTION_CHARS:
                raise RequestError(422, f"instruction: longer than {MAX_INSTRUCTION_CHARS} characters")
            return {"instruction": text}
        if self.task_mode == "onehot":
            task = payload.get("task")
            if not isinstance(task, str):
                raise RequestError(422, f"task: expected one of {', '.join(self.policy.config['tasks'])}; "
                                        "this policy is conditioned on task names")
            try:
                return {"task_id": self.policy.task_encoder.task_index(task)}
            except UserError as error:
                raise RequestError(422, f"task: {error}") from None
        return {"goal": self._observation(payload.get("goal"), self.goal_shapes, "goal")}

    def _embed(self, text: str):
        """The instruction's embedding, computing it (text model) outside the policy lock if it is new."""
        lookup = self.policy.task_encoder._lookup
        vector = lookup.get(text)
        if vector is None:
            with self.embed_lock:
                try:
                    vector = self.policy.task_encoder.instruction_vector(text)
                except UserError as error:
                    detail = f"instruction: cannot embed a new instruction ({error})"
                    raise RequestError(503, detail) from None
        return vector

    def _cache_instruction(self, text: str, vector) -> None:
        """Under `lock`: make sure `act` finds the instruction cached (it never runs the text model there),
        and drop the oldest cached non-vocabulary instructions beyond MAX_CACHED_INSTRUCTIONS."""
        lookup = self.policy.task_encoder._lookup
        lookup[text] = vector
        if len(lookup) > len(self.vocabulary) + MAX_CACHED_INSTRUCTIONS:
            extra = [key for key in list(lookup) if key not in self.vocabulary and key != text]
            for key in extra[:max(0, len(extra) + 1 - MAX_CACHED_INSTRUCTIONS)]:
                lookup.pop(key, None)

    # ---- endpoints ----

    def act(self, payload: dict) -> dict:
        """One action. With a session id the history window continues from the session's last call;
        without one the call is a fresh episode and nothing is kept."""
        session_id = _session_id(payload, required=False)
        observation = self._observation(payload.get("observation"), self.observation_shapes, "observation")
        conditioning = self._conditioning(payload)
        vector = self._embed(conditioning["instruction"]) if "instruction" in conditioning else None
        with self.lock:
            if vector is not None:
                self._cache_instruction(conditioning["instruction"], vector)
            self.policy.episode_memory = self.sessions.pop(session_id, None) if session_id is not None else None
            try:
                action = self.policy.act(observation, **conditioning)
                if session_id is not None:  # a failed call drops the session: its memory is half-updated
                    self.sessions[session_id] = self.policy.episode_memory
                    while len(self.sessions) > self.max_sessions:
                        self.sessions.popitem(last=False)
            finally:
                self.policy.episode_memory = None
        return {"action": action.tolist(), "session_id": session_id}

    def reset(self, payload: dict) -> dict:
        """Start a new episode in a session: its next `act` sees no history."""
        session_id = _session_id(payload, required=True)
        with self.lock:
            if session_id not in self.sessions:
                raise RequestError(404, f"session_id: unknown session {session_id!r} (never used with /act, "
                                        f"or dropped as least recently used beyond {self.max_sessions})")
            self.sessions[session_id] = None
            self.sessions.move_to_end(session_id)
        return {"session_id": session_id, "reset": True}

    def health(self) -> dict:
        config = self.policy.config
        info = {"status": "ok", "task_mode": self.task_mode,
                "observation_keys": {key: list(shape) for key, shape in self.observation_shapes.items()},
                "instructions": list(config["instructions"]),
                "action_dim": len(self.policy.stats["actions"]["min"]),
                "history": config["rt1"]["history"], "sessions": len(self.sessions)}
        if self.task_mode == "onehot":
            info["tasks"] = list(config["tasks"])
        if self.task_mode == "goal":
            info["goal_keys"] = {key: list(shape) for key, shape in self.goal_shapes.items()}
        return info


# ---- HTTP ----------------------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: checked from Content-Length before reading, then while reading
    (chunked bodies, lying headers), before any JSON parsing. The body is buffered and replayed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _error(self, scope, receive, send, status: int, detail: str) -> None:
        from starlette.responses import JSONResponse

        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = f"request body: larger than the {self.max_bytes}-byte limit"
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await self._error(scope, receive, send, 400, "request body: invalid Content-Length")
                    return
                if int(value) > self.max_bytes:
                    await self._error(scope, receive, send, 413, f"{limit} (Content-Length {int(value)})")
                    return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._error(scope, receive, send, 413, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(policy_dir: str, max_sessions: int = 1024, max_body_bytes: int = 4 * MiB,
               snap_cosine: float = 0.0) -> "FastAPI":
    """A FastAPI app serving the exported policy in `policy_dir`; `app.state.service` is its PolicyService."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from lcbc.policies.language_policy import LanguagePolicy

    service = PolicyService(LanguagePolicy.from_pretrained(policy_dir, snap_cosine), max_sessions)
    app = FastAPI(title="lcbc policy server", description="Actions from an exported lcbc LanguagePolicy.")
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return JSONResponse({"detail": error.detail}, status_code=error.status)

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError):
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"detail": "internal server error; see the server log"}, status_code=500)

    # JSON parsing, validation and the forward pass run in the thread pool: the event loop stays free to
    # accept connections and answer /health while a request waits for the policy lock.
    @app.post("/act")
    async def act(request: Request):
        """{"instruction" | "task" | "goal", "observation", "session_id"?} -> {"action", "session_id"}."""
        body = await request.body()
        return JSONResponse(await run_in_threadpool(lambda: service.act(parse_json_body(body))))

    @app.post("/reset")
    async def reset(request: Request):
        """{"session_id"} -> the session's next /act starts a new episode; 404 for an unknown session."""
        body = await request.body()
        return JSONResponse(await run_in_threadpool(lambda: service.reset(parse_json_body(body))))

    @app.get("/health")
    async def health():
        """Liveness, and what a client needs to build requests: task mode, shapes, instructions."""
        return JSONResponse(service.health())

    return app


def serve(policy_dir: str, host: str = "127.0.0.1", port: int = 8000, max_sessions: int = 1024,
          access_log: bool = True, snap_cosine: float = 0.0) -> None:
    """Run the server with uvicorn (one process; blocks). Binds loopback by default: there is no
    authentication, so expose it beyond this machine only behind something that provides it."""
    import torch
    import uvicorn

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0..65535, got {port}")
    torch.set_num_threads(1)  # small forward passes are several times faster single-threaded on few cores
    app = create_app(policy_dir, max_sessions=max_sessions, snap_cosine=snap_cosine)
    logging.basicConfig(level=logging.INFO)
    if host not in LOOPBACK_HOSTS:
        log.warning("serving on %s: reachable from other machines, with no authentication", host)
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")


def _cmd_serve(args: argparse.Namespace) -> None:
    serve(args.policy, host=args.host, port=args.port, max_sessions=args.max_sessions,
          access_log=not args.no_access_log, snap_cosine=args.snap)


SNAP_HELP = ("read an unseen instruction as its nearest trained one when their cosine is at least this (0, the "
             "default: off): a paraphrase of a trained task is then that task")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve --policy DIR [--host 127.0.0.1] [--port 8000]`; its handler is `args.run(args)`."""
    parser = subparsers.add_parser("serve", help="serve an exported policy over HTTP (POST /act)")
    parser.add_argument("--policy", required=True, help="exported policy folder (from `lcbc export`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-sessions", type=int, default=1024,
                        help="sessions kept; the least recently used beyond this are dropped")
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")
    parser.add_argument("--snap", type=float, default=0.0, metavar="COSINE", help=SNAP_HELP)
    parser.set_defaults(run=_cmd_serve)
    return parser

