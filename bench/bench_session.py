"""Realtime session latency (WebSocket /v1/audio/session) on a server run in this process.

    python bench/bench_session.py                                  # tiny demo checkpoint (overhead)
    flock /tmp/csm-bench.lock python bench/bench_session.py --size full --rounds 3 --frames 6

A conversation through the package's client: each round the user adds a turn (`--user-seconds` of audio
with its transcript) and the agent's reply streams in as text deltas (a word each, `--delta-ms` apart). Per
round it prints the time from the delta that completes the sentence (its flush) to the sentence's first audio
(`first audio`), the time between the frames after it (the server sends every frame: chunk_frames=1) and
what the first audio took beyond one frame (`over one frame`: planning, prefill, the trip through the
scheduler and the socket; the goal is one chunk's frames + 50 ms). Then a long sentence is cancelled after
its third frame: the frames the scheduler generated after the cancel reached the session (`frames after
cancel`), the audio that was already in flight, and the time to the `cancelled` acknowledgement.
Random weights never say end-of-audio, so every sentence takes `--frames` frames.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from csm.client.session import SessionClient  # noqa: E402
from csm.server import ServerSettings, create_app, load_app, uvicorn_config  # noqa: E402
from csm.server import service as server_service  # noqa: E402
from csm.server import session as server_session  # noqa: E402

REPLIES = [
    "Sure, I can tell you about that right now.",
    "That is a good question, and the answer is yes.",
    "I think we should meet again next week to talk.",
    "Let me check my notes before I answer that one.",
    "We could also try a different approach this time.",
    "Thanks for waiting, here is what I found out today.",
]


def full_size_app(settings: ServerSettings, dtype: str):
    """A csm-1b size model with random weights (as bench_generate builds it) behind the app."""
    from csm import CsmForConditionalGeneration
    from csm.config import CsmConfig
    from csm.demo import CHAT_TEMPLATE, demo_tokenizer
    from csm.processor import CsmProcessor

    torch.manual_seed(0)
    # the demo tokenizer's special ids (no real tokenizer offline); the sizes are csm-1b's
    ids = dict(bos_token_id=1, pad_token_id=2, eos_token_id=0, audio_token_id=2, audio_eos_token_id=3)
    model = CsmForConditionalGeneration(CsmConfig(**ids)).eval()
    with torch.no_grad():
        model.lm_head.weight[2048:] = 0  # as a trained model would: never pick ids the codec lacks
        model.depth_decoder.codebooks_head.weight[..., 2048:] = 0
    if dtype == "bf16":
        model.quantize("bf16")
    model.generation_config = {"do_sample": True, "temperature": 0.9, "top_k": 50}
    return create_app(model, CsmProcessor(demo_tokenizer(), CHAT_TEMPLATE), settings)


def start_server(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"ws://127.0.0.1:{sock.getsockname()[1]}/v1/audio/session"


async def reply(s: SessionClient, text: str, delta_s: float) -> tuple[float, list[float], int]:
    """Stream `text` a word at a time, flush; (first audio after the flush, arrival times of audio, frames)."""
    words = text.split(" ")
    for i, word in enumerate(words):
        await s.text_delta(word if i == 0 else " " + word)
        await asyncio.sleep(delta_s)
    t0 = time.perf_counter()
    await s.flush()
    arrivals = []
    while True:
        event = await s.recv()
        if event["type"] == "audio":
            arrivals.append(time.perf_counter() - t0)
        elif event["type"] == "turn.done":
            return arrivals[0], arrivals, event["frames"]
        elif event["type"] == "error":
            raise RuntimeError(event)


async def converse(url: str, args, cancelled_at: dict, jobs: list) -> None:
    rng = np.random.default_rng(0)
    async with await SessionClient.connect(url, seed=1, speaker=0) as s:
        print("round | first audio ms | frame interval ms | over one frame ms | frames")
        for r in range(args.rounds):
            user = (0.1 * rng.standard_normal(int(24000 * args.user_seconds))).astype(np.float32)
            await s.user_turn(f"This is what the user said in round {r}, more or less.", user)
            assert (await s.recv())["type"] == "user.turn.added"
            first, arrivals, frames = await reply(s, REPLIES[r % len(REPLIES)], args.delta_ms / 1000)
            step = statistics.median(np.diff(arrivals)) if len(arrivals) > 2 else float("nan")
            print(
                f"{r + 1} | {1000 * first:.0f} | {1000 * step:.0f} | {1000 * (first - step):.0f} | {frames}"
            )

        # cancel: a long sentence, stopped after its third frame
        server_service.frames_for_text = lambda text, rate: args.cancel_frames
        await s.text_delta("Now I will talk for a long time about nothing in particular at all.")
        await s.flush()
        seen = 0
        while seen < 3:
            event = await s.recv()
            seen += event["type"] == "audio"
        t0 = time.perf_counter()
        await s.cancel()
        in_flight = 0
        while (event := await s.recv())["type"] != "cancelled":
            in_flight += event["type"] == "audio"
        ack = time.perf_counter() - t0
        await asyncio.sleep(max(1.0, 5 * args.frame_s))
        after = len(jobs[-1].codes) - cancelled_at["frames"]
        print(
            f"cancel: frames after cancel {after} (generated when it arrived: {cancelled_at['frames']}), "
            f"audio messages in flight {in_flight}, `cancelled` after {1000 * ack:.1f} ms"
        )


def main() -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # close reasons
    logging.getLogger("websockets").setLevel(logging.DEBUG if "--debug-ws" in sys.argv else logging.INFO)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], default="bf16", help="full size: 16-bit weights or fp32"
    )
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--frames", type=int, default=12, help="frames per sentence")
    p.add_argument("--cancel-frames", type=int, default=200)
    p.add_argument("--user-seconds", type=float, default=4.0)
    p.add_argument("--delta-ms", type=float, default=20.0)
    p.add_argument("--debug-ws", action="store_true", help="log the websockets library's frames (pings)")
    p.add_argument(
        "--encode-on-reply",
        action="store_true",
        help="as before: a user turn's clip is encoded on the scheduler thread when the reply's first sentence "
        "is prepared, not when the turn arrives",
    )
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    settings = ServerSettings(chunk_frames=1, max_frames=4000, max_batch_size=2)
    server_service.frames_for_text = lambda text, rate: args.frames
    if args.encode_on_reply:
        server_session.encode_audio = lambda model, audio: None  # the job's embed encodes it instead
    t = time.perf_counter()
    if args.size == "tiny":
        from csm.demo import write_demo_checkpoint

        folder = write_demo_checkpoint(Path(tempfile.mkdtemp()) / "demo")
        app = load_app(str(folder), settings=settings)
    else:
        app = full_size_app(settings, args.dtype)
    print(
        f"size={args.size} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"encode_on_reply={args.encode_on_reply} load {time.perf_counter() - t:.1f} s"
    )

    jobs, cancelled_at = [], {"frames": -1}
    scheduler = app.state.scheduler
    submit = scheduler.submit
    scheduler.submit = lambda job: (jobs.append(job), submit(job))[1]
    cancel = server_session.Session.cancel

    async def timed_cancel(self):
        cancelled_at["frames"] = len(self.job.codes) if self.job is not None else -1
        return await cancel(self)

    server_session.Session.cancel = timed_cancel
    server, url = start_server(app)
    args.frame_s = 0.05 if args.size == "tiny" else 1.0
    try:
        asyncio.run(converse(url, args, cancelled_at, jobs))
    finally:
        server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
