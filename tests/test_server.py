"""The HTTP policy server: actions equal `policy.act`, sessions keep history, bad requests are clean 4xx."""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from lcbc.policies.language_policy import LanguagePolicy
from lcbc.policies.rt1 import RT1Config
from lcbc.serving import server
from lcbc.serving.server import add_serve_parser, create_app

INSTRUCTIONS = ["open the drawer", "close the drawer"]
TASKS = ["drawer-open-v3", "drawer-close-v3"]
STATE_DIM, IMAGE_SIZE = 39, 16


def _stats(dims: dict[str, int]) -> dict:
    names = ["mean", "std", "min", "max", "q01", "q99"]
    return {key: dict(zip(names, [[0.0] * n, [1.0] * n, [-1.0] * n, [1.0] * n, [-1.0] * n, [1.0] * n]))
            for key, n in dims.items()}


def _export(policy: LanguagePolicy, directory) -> str:
    """Random weights instead of the zero-initialized head and FiLM: the action must depend on the
    observation, the instruction and the history, or the equality tests below would prove nothing."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    policy.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory):
    """Language-conditioned, a 39-d state and one 16 px camera, history 2 (built once: MiniLM loads here)."""
    rt1 = RT1Config.preset("rt1-tiny", history=2, image_size=IMAGE_SIZE, dropout=0.0)
    stats = _stats({"actions": 4, "state": STATE_DIM})
    policy = LanguagePolicy(rt1, stats, ["state"], ["corner"], INSTRUCTIONS, TASKS, "language")
    policy.task_encoder.embed_vocabulary()
    return _export(policy, tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="session")
def onehot_dir(tmp_path_factory):
    rt1 = RT1Config.preset("rt1-tiny", history=2, dropout=0.0)
    stats = _stats({"actions": 3, "state": 4})
    policy = LanguagePolicy(rt1, stats, ["state"], [], INSTRUCTIONS, TASKS, "onehot")
    return _export(policy, tmp_path_factory.mktemp("onehot"))


@pytest.fixture(scope="session")
def client(policy_dir):
    with TestClient(create_app(policy_dir)) as test_client:
        yield test_client


@pytest.fixture
def reference(policy_dir):
    return LanguagePolicy.from_pretrained(policy_dir)


def _observation(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"state": rng.normal(size=STATE_DIM).astype(np.float32),
            "corner": rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)}


def _encode(obs: dict[str, np.ndarray], image_as_lists: bool = False) -> dict:
    image = obs["corner"]
    corner = image.tolist() if image_as_lists else {"base64": base64.b64encode(image.tobytes()).decode(),
                                                    "shape": list(image.shape)}
    return {"state": obs["state"].tolist(), "corner": corner}


def _act(client, obs, instruction="open the drawer", **extra) -> dict:
    response = client.post("/act", json={"instruction": instruction, "observation": _encode(obs), **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["task_mode"] == "language"
    assert body["observation_keys"] == {"state": [STATE_DIM], "corner": [IMAGE_SIZE, IMAGE_SIZE, 3]}
    assert body["instructions"] == INSTRUCTIONS and body["action_dim"] == 4 and body["history"] == 2


def test_act_equals_policy_act(client, reference):
    obs = _observation(0)
    for instruction in INSTRUCTIONS:
        body = _act(client, obs, instruction)
        assert body["session_id"] is None and len(body["action"]) == 4
        reference.reset()
        np.testing.assert_array_equal(np.float32(body["action"]), reference.act(obs, instruction))
    # The image as nested lists gives the same action as the base64 form.
    lists = client.post("/act", json={"instruction": INSTRUCTIONS[1], "observation": _encode(obs, True)})
    assert lists.json()["action"] == body["action"]
    # The weights are random: the instruction matters.
    assert _act(client, obs, INSTRUCTIONS[0])["action"] != body["action"]


def test_new_instruction_is_embedded_and_cache_is_bounded(client, reference, monkeypatch):
    obs = _observation(1)
    new = "pull the drawer towards you"
    body = _act(client, obs, new)
    reference.reset()
    np.testing.assert_array_equal(np.float32(body["action"]), reference.act(obs, new))
    monkeypatch.setattr(server, "MAX_CACHED_INSTRUCTIONS", 1)
    _act(client, obs, "push the drawer shut")
    lookup = client.app.state.service.policy.task_encoder._lookup
    assert set(lookup) == {*INSTRUCTIONS, "push the drawer shut"}


def test_snap_serves_a_paraphrase_as_its_nearest_trained_instruction(policy_dir):
    obs, paraphrase = _observation(2), "pull the drawer towards you"
    _, cosine = LanguagePolicy.from_pretrained(policy_dir).task_encoder.nearest_instruction(paraphrase)
    for snap, same in ((cosine, True), (min(1.0, cosine + 0.01), False)):
        with TestClient(create_app(policy_dir, snap_cosine=snap)) as snapping:
            actions = [_act(snapping, obs, text)["action"] for text in (paraphrase, "open the drawer")]
        assert (actions[0] == actions[1]) == same


def test_session_keeps_history_and_reset_clears_it(client, reference):
    first, second = _observation(2), _observation(3)
    _act(client, first, session_id="episode-a")
    _act(client, _observation(9), session_id="episode-b")  # another session in between changes nothing
    continued = _act(client, second, session_id="episode-a")
    assert continued["session_id"] == "episode-a"
    reference.reset()
    reference.act(first, "open the drawer")
    np.testing.assert_array_equal(np.float32(continued["action"]), reference.act(second, "open the drawer"))
    reference.reset()
    fresh = reference.act(second, "open the drawer")
    assert not np.array_equal(fresh, np.float32(continued["action"])), "history made no difference"
    assert np.array_equal(np.float32(_act(client, second)["action"]), fresh)  # no session: a fresh episode

    response = client.post("/reset", json={"session_id": "episode-a"})
    assert response.status_code == 200 and response.json() == {"session_id": "episode-a", "reset": True}
    np.testing.assert_array_equal(np.float32(_act(client, second, session_id="episode-a")["action"]), fresh)


def test_a_session_takes_the_next_instruction_of_a_chain_with_its_history(client, reference):
    """Chained requests need nothing new: the client, who sees when a goal is reached, sends the next
    instruction in the same session, and the history window carries over as in `lcbc eval --chain`."""
    first, second = _observation(4), _observation(5)
    _act(client, first, "open the drawer", session_id="chain")
    chained = _act(client, second, "close the drawer", session_id="chain")
    reference.reset()
    reference.act(first, "open the drawer")
    np.testing.assert_array_equal(np.float32(chained["action"]), reference.act(second, "close the drawer"))


def test_reset_unknown_session_is_404(client):
    response = client.post("/reset", json={"session_id": "never-used"})
    assert response.status_code == 404 and "session_id" in response.json()["detail"]
    assert "never-used" in response.json()["detail"]


def test_least_recently_used_session_is_evicted(policy_dir):
    with TestClient(create_app(policy_dir, max_sessions=2)) as small:
        obs = _observation(4)
        for session in ("one", "two"):
            _act(small, obs, session_id=session)
        _act(small, obs, session_id="one")  # "two" is now the least recently used
        _act(small, obs, session_id="three")
        assert small.post("/reset", json={"session_id": "two"}).status_code == 404
        assert all(small.post("/reset", json={"session_id": s}).status_code == 200 for s in ("one", "three"))


def test_concurrent_sessions_keep_their_own_history(client, reference):
    """Threads interleave their calls; each session's actions equal its episode played alone."""
    steps, results = 4, {}

    def episode(worker: int) -> None:
        session = f"thread-{worker}"
        results[worker] = [_act(client, _observation(100 * worker + t), session_id=session)["action"]
                           for t in range(steps)]

    threads = [threading.Thread(target=episode, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker, actions in results.items():
        reference.reset()
        expected = [reference.act(_observation(100 * worker + t), "open the drawer") for t in range(steps)]
        np.testing.assert_array_equal(np.float32(actions), np.stack(expected))
    assert len(results) == 4


def _valid() -> dict:
    return {"instruction": "open the drawer", "observation": _encode(_observation(5))}


def _with(path: str, value) -> dict:
    """The valid request with one field (dotted path) replaced, or removed when value is ...."""
    body = _valid()
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return body


STATE = [0.0] * STATE_DIM
MALFORMED = [
    # (id, body: bytes or JSON-able, status, text the detail must contain)
    ("not-json", b'{"instruction": "open', 400, "JSON"),
    ("deep-json", b"[" * 100_000, 400, "JSON"),
    ("bad-utf8", b'{"instruction": "\xff"}', 400, "JSON"),
    ("json-array", [1, 2], 422, "JSON object"),
    ("no-observation", _with("observation", ...), 422, "observation"),
    ("observation-list", _with("observation", [1, 2]), 422, "observation"),
    ("no-instruction", _with("instruction", ...), 422, "instruction"),
    ("empty-instruction", _with("instruction", "  "), 422, "instruction"),
    ("instruction-number", _with("instruction", 3), 422, "instruction"),
    ("long-instruction", _with("instruction", "x" * 5000), 422, "instruction"),
    ("missing-key", _with("observation.state", ...), 422, "observation.state"),
    ("short-state", _with("observation.state", STATE[:38]), 422, "observation.state"),
    ("nested-state", _with("observation.state", [STATE]), 422, "observation.state"),
    ("state-string", _with("observation.state", "0.1, 0.2"), 422, "observation.state"),
    ("non-numeric", _with("observation.state", STATE[:3] + ["a"] + STATE[4:]), 422, "observation.state[3]"),
    ("boolean", _with("observation.state", STATE[:3] + [True] + STATE[4:]), 422, "observation.state[3]"),
    ("null", _with("observation.state", STATE[:3] + [None] + STATE[4:]), 422, "observation.state[3]"),
    ("nan", json.dumps(_with("observation.state", STATE[:3] + [float("nan")] + STATE[4:])).encode(), 422,
     "observation.state[3]"),
    ("infinity", json.dumps(_with("observation.state", [float("-inf")] + STATE[1:])).encode(), 422,
     "observation.state[0]"),
    ("float32-overflow", _with("observation.state", [1e300] + STATE[1:]), 422, "observation.state[0]"),
    ("huge-int", _with("observation.state", [10**400] + STATE[1:]), 422, "observation.state"),
    ("bad-base64", _with("observation.corner.base64", "not base64!!"), 422, "observation.corner.base64"),
    ("short-image", _with("observation.corner.base64", base64.b64encode(bytes(10)).decode()), 422,
     "observation.corner.base64"),
    ("image-shape", _with("observation.corner.shape", [8, 8, 3]), 422, "observation.corner.shape"),
    ("image-no-data", _with("observation.corner.base64", ...), 422, "observation.corner.base64"),
    ("image-pixel", _with("observation.corner", [[[256, 0, 0]] * IMAGE_SIZE] * IMAGE_SIZE), 422,
     "observation.corner[0][0][0]"),
    ("image-number", _with("observation.corner", 7), 422, "observation.corner"),
    ("session-number", {**_valid(), "session_id": 5}, 422, "session_id"),
    ("session-empty", {**_valid(), "session_id": ""}, 422, "session_id"),
]


@pytest.mark.parametrize("body,status,field", [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_act_is_a_clear_4xx(client, body, status, field):
    if isinstance(body, bytes):
        response = client.post("/act", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/act", json=body)
    assert response.status_code == status, response.text
    assert field in response.json()["detail"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("body,status", [(b"nope", 400), (b"{}", 422), (b'{"session_id": 1}', 422)])
def test_malformed_reset(client, body, status):
    response = client.post("/reset", content=body)
    assert response.status_code == status and "detail" in response.json()


def test_oversized_bodies_are_413_before_parsing(policy_dir):
    with TestClient(create_app(policy_dir, max_body_bytes=1000)) as small:
        response = small.post("/act", content=b"x" * 2000)  # Content-Length says too much
        assert response.status_code == 413 and "body" in response.json()["detail"]

        def chunks():  # no Content-Length: counted while reading
            for _ in range(20):
                yield b"x" * 100

        response = small.post("/act", content=chunks())
        assert response.status_code == 413 and "body" in response.json()["detail"]
        assert small.get("/health").status_code == 200
    with TestClient(create_app(policy_dir)) as default:  # a 4 MiB+ image is refused by the default limit
        response = default.post("/act", content=b" " * (4 * 1024 * 1024 + 1))
        assert response.status_code == 413


def test_onehot_policy_takes_a_task_name(onehot_dir):
    reference = LanguagePolicy.from_pretrained(onehot_dir)
    obs = {"state": [0.5, -0.25, 1.0, 0.0]}
    with TestClient(create_app(onehot_dir)) as onehot:
        health = onehot.get("/health").json()
        assert health["task_mode"] == "onehot" and health["tasks"] == TASKS
        for task_id, task in enumerate(TASKS):
            response = onehot.post("/act", json={"task": task, "observation": obs})
            assert response.status_code == 200, response.text
            reference.reset()
            np.testing.assert_array_equal(np.float32(response.json()["action"]),
                                          reference.act(obs, task_id=task_id))
        for body in ({"task": "reach-v3", "observation": obs}, {"instruction": "open", "observation": obs}):
            response = onehot.post("/act", json=body)
            assert response.status_code == 422 and "task" in response.json()["detail"]


def test_sessions_keep_their_own_action_chunks(tmp_path):
    """With temporal ensembling the policy also remembers its recent action chunks: each session its own."""
    rt1 = RT1Config.preset("rt1-tiny", history=2, action_chunk=3, dropout=0.0)
    policy = LanguagePolicy(rt1, _stats({"actions": 3, "state": 4}), ["state"], [], INSTRUCTIONS, TASKS, "onehot",
                            temporal_ensemble=0.5)
    directory = _export(policy, tmp_path / "chunked")
    reference = LanguagePolicy.from_pretrained(directory)
    observations = [{"state": np.random.default_rng(seed).normal(size=4).astype(np.float32)} for seed in range(3)]
    expected = [reference.act(obs, task_id=0) for obs in observations]
    reference.reset()
    reference.act(observations[0], task_id=0)
    reference.act(observations[1], task_id=0)
    reference.episode_memory = (reference._history, None)  # the chunks forgotten, the history kept
    assert not np.allclose(reference.act(observations[2], task_id=0), expected[2])  # so the chunks matter
    with TestClient(create_app(directory)) as chunked:
        for obs, action in zip(observations, expected):
            state = obs["state"].tolist()
            response = chunked.post("/act", json={"task": TASKS[0], "observation": {"state": state}, "session_id": "a"})
            other = {"task": TASKS[1], "observation": {"state": state[::-1]}, "session_id": "b"}
            assert chunked.post("/act", json=other).status_code == 200  # another episode in between
            np.testing.assert_allclose(np.float32(response.json()["action"]), action, rtol=1e-5, atol=1e-6)


def test_serve_parser_defaults_to_loopback(monkeypatch):
    import argparse

    calls = []
    monkeypatch.setattr(server, "serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--policy", "runs/policy"])
    assert (args.policy, args.host, args.port) == ("runs/policy", "127.0.0.1", 8000)
    args.run(args)
    assert calls == [(("runs/policy",), {"host": "127.0.0.1", "port": 8000, "max_sessions": 1024,
                                         "access_log": True, "snap_cosine": 0.0})]
