"""`csm serve --ray`: the affinity router's keys and hashing, the flags, and (slow) 2 replicas of the tiny model on a
local Ray instance behind Ray Serve's proxy: the same audio per seed as one `csm serve`, a session stays on its
replica, a voice saved through one replica speaks on the other, and a replica killed under load ends its streams
with an error (never a hang) while new requests go to the living one."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving import SAMPLES_PER_FRAME, demo_checkpoint, serve, speak

from csm.ray_serve import affinity_key, rendezvous
from csm.server import ServerSettings


def test_affinity_key_comes_from_session_headers_then_the_query_string():
    def scope(headers=(), query=b""):
        return {"headers": [(k.encode(), v.encode()) for k, v in headers], "query_string": query}

    assert affinity_key(scope([("x-session-id", "abc")])) == "x-session-id=abc"
    assert affinity_key(scope([("x-conversation-id", "c1"), ("x-prefix-key", "p")])) == "x-conversation-id=c1"
    assert affinity_key(scope([("x-prefix-key", "voice:ana")])) == "x-prefix-key=voice:ana"
    assert affinity_key(scope(query=b"session_id=s9&x=1")) == "session_id=s9"
    assert affinity_key(scope([("authorization", "Bearer k")])) is None and affinity_key(None) is None
    assert len(affinity_key(scope([("x-session-id", "a" * 10_000)]))) < 300


def test_rendezvous_is_stable_and_a_leaving_replica_moves_only_its_keys():
    replicas = ["r1", "r2", "r3"]
    keys = [f"session-{i}" for i in range(300)]
    owner = {k: rendezvous(k, replicas)[0] for k in keys}
    assert owner == {
        k: rendezvous(k, list(reversed(replicas)))[0] for k in keys
    }  # order of the list: no matter
    assert all(100 * 0.7 < list(owner.values()).count(r) < 100 * 1.3 for r in replicas)
    after = {k: rendezvous(k, ["r1", "r3"])[0] for k in keys}
    assert all(after[k] == owner[k] for k in keys if owner[k] != "r2")


def test_replicas_without_ray_is_a_one_line_error(capsys):
    from csm.cli.main import main

    assert main(["serve", "--model", "nowhere", "--replicas", "2"]) == 2
    assert "go with --ray" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["serve", "--ray", "--autoscale", "3:1"])
    assert "MIN <= MAX" in capsys.readouterr().err


def test_serve_ray_without_ray_installed_says_how_to_install_it(capsys, monkeypatch):
    import sys
    from types import SimpleNamespace

    from csm.ray_serve import run

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert run(SimpleNamespace(model="m"), ServerSettings()) == 1
    assert "pip install 'csm-speech[ray]'" in capsys.readouterr().out


# ---- 2 replicas on a local Ray ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory)


FRAMES = 40  # per request: ~1 s of work on the tiny model, so that a kill finds streams in flight


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet(checkpoint, tmp_path_factory):
    """2 replicas behind Ray Serve's proxy on a local Ray (2 CPUs); yields an httpx client for the proxy."""
    ray = pytest.importorskip("ray")
    serve_api = pytest.importorskip("ray.serve")
    from dataclasses import asdict

    from csm.ray_serve import deployment

    voices = tmp_path_factory.mktemp("shared-voices")
    # batched_decode off: a seeded request's audio is then the same bit for bit alone or batched with others
    settings = asdict(
        ServerSettings(max_frames=FRAMES, chunk_frames=2, voices_dir=str(voices), batched_decode=False)
    )
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        serve_api.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(str(checkpoint), settings, replicas=2, cpus_per_replica=0.5)
        serve_api.run(app, name="csm", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        serve_api.shutdown()
        ray.shutdown()


def replica_of(client, key: str) -> str:
    """The replica a key routes to (its csm_replica_info in /metrics)."""
    text = client.get("/metrics", headers={"x-session-id": key}).text
    return next(x for x in text.splitlines() if x.startswith("csm_replica_info{"))


def speech_count(client, key: str) -> float:
    text = client.get("/metrics", headers={"x-session-id": key}).text
    prefix = 'csm_requests_total{endpoint="/v1/audio/speech",status="200"} '
    return sum(float(x[len(prefix) :]) for x in text.splitlines() if x.startswith(prefix))


@pytest.mark.slow
def test_two_replicas_give_the_same_audio_per_seed_as_one_server(fleet, checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, batched_decode=False, max_frames=FRAMES) as one:
        local = [speak(one, response_format="pcm", seed=s).content for s in (1, 2, 3)]
    with ThreadPoolExecutor(6) as pool:  # concurrent: both replicas serve
        ray = list(
            pool.map(lambda s: speak(fleet, response_format="pcm", seed=s).content, [1, 2, 3, 1, 2, 3])
        )
    assert ray == local + local


@pytest.mark.slow
def test_a_session_stays_on_its_replica_and_voices_are_shared(fleet):
    keys = [f"s{i}" for i in range(12)]
    where = {k: replica_of(fleet, k) for k in keys}
    assert len(set(where.values())) == 2  # both replicas own sessions
    key = keys[0]
    before = speech_count(fleet, key)
    for _ in range(5):
        r = fleet.post(
            "/v1/audio/speech",
            json={"input": "Turn after turn.", "response_format": "pcm"},
            headers={"x-session-id": key},
        )
        assert r.status_code == 200, r.text
    assert speech_count(fleet, key) - before == 5  # all five turns on the replica of turn one
    assert all(replica_of(fleet, k) == where[k] for k in keys)
    # a voice saved through one replica speaks on the other
    mine, other = key, next(k for k in keys if where[k] != where[key])
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(np.arange(12000) / 10)).astype(np.float32), 24000, format="WAV")
    files = {"audio_file": ("clip.wav", buf.getvalue(), "audio/wav")}
    r = fleet.post(
        "/v1/voices",
        files=files,
        data={"name": "shared", "transcript": "Hi."},
        headers={"x-session-id": mine},
    )
    assert r.status_code == 201, r.text
    r = fleet.post(
        "/v1/audio/speech",
        json={"input": "Hello.", "voice": "shared", "response_format": "pcm"},
        headers={"x-session-id": other},
    )
    assert r.status_code == 200, r.text


@pytest.mark.slow
def test_a_killed_replica_ends_its_streams_with_an_error_and_new_requests_are_served(fleet):
    import ray

    def one(i):
        t0 = time.perf_counter()
        try:
            body = {"input": "A longer sentence to keep the rows busy for a while.", "response_format": "pcm"}
            r = fleet.post("/v1/audio/speech", json=body, timeout=30)
            return r.status_code, len(r.content), time.perf_counter() - t0
        except httpx.HTTPError as e:  # an aborted transfer: the clean end of a stream that cannot finish
            return type(e).__name__, 0, time.perf_counter() - t0

    names = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]
    ]
    assert len(names) == 2, names
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        time.sleep(0.5)
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        results = [f.result(timeout=60) for f in futures]
    print("after the kill:", sorted((str(s), n) for s, n, _ in results))
    assert all(took < 31 for _, _, took in results), results  # none hangs past its timeout
    full = FRAMES * SAMPLES_PER_FRAME * 2
    for status, size, _ in results:  # whole audio, an error status, or an aborted transfer: never a short 200
        assert (status == 200 and size == full) or status in (500, 502, 503) or isinstance(status, str), (
            results
        )
    assert sum(status == 200 for status, _, _ in results) >= 1, results  # the living replica's went on
    assert sum(status != 200 for status, _, _ in results) >= 1, results  # the kill did end streams
    deadline = time.time() + 120  # Ray restarts the dead replica; meanwhile the living one serves
    while time.time() < deadline:
        if speak(fleet, response_format="pcm").status_code == 200:
            break
        time.sleep(1)
    assert speak(fleet, response_format="pcm").status_code == 200
