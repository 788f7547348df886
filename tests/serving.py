"""Shared pieces of the server tests: the demo checkpoint, a real uvicorn on a loopback port, request helpers."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from csm.demo import write_demo_checkpoint
from csm.server import ServerSettings, load_app, uvicorn_config

SAMPLES_PER_FRAME = 1920


def demo_checkpoint(tmp_path_factory):
    """The demo checkpoint (model and processor in one folder): its codec's audio depends on the codes."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("server-ckpt") / "demo")


@contextmanager
def serve(checkpoint, tmp_path, sndbuf: int = 0, **overrides):
    """Run the app under uvicorn on 127.0.0.1, an ephemeral port; yields an httpx client for it."""
    fields = {"max_frames": 4, "chunk_frames": 2, "voices_dir": str(tmp_path / "voices"), **overrides}
    settings = ServerSettings(**fields)
    app = load_app(str(checkpoint), settings=settings)  # a model per server: the engine's caches live in it
    sock = socket.socket()
    if sndbuf:  # small kernel buffers: a client that stops reading blocks the server's writes soon
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            client.app = app
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def speak(client, **fields):
    return client.post("/v1/audio/speech", json={"model": "csm", "input": "Hello from the server.", **fields})


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
