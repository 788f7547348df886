"""GET /metrics: Prometheus' text format, read back with prometheus_client's own parser; the API key guards it
unless `metrics_public`; counters move where the events happen; the prefix cache is read at scrape time."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import assert_error, demo_checkpoint, serve, speak

from csm.server.metrics import ServerMetrics, error_code


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory)


def scrape(client, **headers) -> dict:
    """{(sample name, frozenset(labels)): value} of one GET /metrics."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_speech_requests_move_the_counters_and_histograms(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_batch_size=4) as client:
        before = scrape(client)
        assert value(before, "csm_rows_capacity") == 4 and value(before, "csm_up") == 1
        assert value(before, "process_resident_memory_bytes") > 0
        for seed in (1, 2):
            assert speak(client, response_format="pcm", seed=seed).status_code == 200
        assert_error(speak(client, voice="ghost"), 404, "voice")
        after = scrape(client)
    route = "/v1/audio/speech"
    assert value(after, "csm_requests_total", endpoint=route, status="200") == 2
    assert value(after, "csm_requests_total", endpoint=route, status="404") == 1
    assert value(after, "csm_errors_total", status="404", code="invalid_request_error") == 1
    assert value(after, "csm_time_to_first_audio_seconds_count") == 2
    assert value(after, "csm_realtime_ratio_count") == 2
    assert value(after, "csm_audio_seconds_total") == pytest.approx(2 * 4 * 0.08)  # 4 frames of 80 ms each
    assert value(after, "csm_frames_total") == 8
    assert (
        value(after, "csm_queue_wait_seconds_count") == 2 and value(after, "csm_prefill_seconds_count") == 2
    )
    assert value(after, "csm_batch_rows_count") >= 4  # a step per frame at least
    assert value(after, "csm_jobs_total", outcome="completed") == 2
    assert value(after, "csm_rows_in_use") == 0 and value(after, "csm_queue_waiting") == 0


def test_an_unknown_path_is_counted_under_one_label_not_its_own(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path) as client:
        for path in ("/nope-1", "/nope-2"):
            assert client.get(path).status_code == 404
        samples = scrape(client)
    assert value(samples, "csm_requests_total", endpoint="other", status="404") == 2
    assert not [k for k in samples if "/nope" in str(k)]


def test_the_api_key_guards_metrics_unless_they_are_public(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path / "a", api_key="k3y") as client:
        assert_error(client.get("/metrics"), 401)
        assert value(scrape(client, authorization="Bearer k3y"), "csm_up") == 1
    with serve(checkpoint, tmp_path / "b", api_key="k3y", metrics_public=True) as client:
        assert value(scrape(client), "csm_up") == 1
        assert_error(client.get("/v1/models"), 401)  # only /metrics is public


def test_metrics_still_answer_while_draining(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path) as client:
        client.app.state.scheduler.draining = True
        try:
            assert speak(client).status_code == 503
            samples = scrape(client)
        finally:
            client.app.state.scheduler.draining = False
    assert value(samples, "csm_draining") == 1 and value(samples, "csm_up") == 0
    assert value(samples, "csm_errors_total", status="503", code="server_error") == 1


def test_sessions_gauge_and_voices_are_exposed(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path) as client:
        sessions = client.app.state.service.sessions  # what the session route keeps: read at scrape time
        sessions.update({"a": None, "b": None})
        try:
            samples = scrape(client)
        finally:
            sessions.clear()
    assert value(samples, "csm_sessions_open") == 2
    assert value(samples, "csm_voices") == 0 and ("csm_voices_cached", frozenset()) in samples


def test_prefix_store_counters_are_read_at_scrape_time_and_absent_when_it_is_off(checkpoint, tmp_path):
    body = {"model": "csm", "input": "Hello again.", "response_format": "pcm", "seed": 1}
    with serve(checkpoint, tmp_path, prefix_cache_mb=0) as client:
        client.post("/v1/audio/speech", json=body)
        off = scrape(client)
    assert not [k for k in off if k[0].startswith("csm_prefix_cache")]
    with serve(checkpoint, tmp_path) as client:
        for _ in range(2):  # the second finds the first's prompt whole
            assert client.post("/v1/audio/speech", json=body).status_code == 200
        samples = scrape(client)
        store = client.get("/health").json()["scheduler"]["prefix_cache"]
    assert store["hits"] >= 1
    assert value(samples, "csm_prefix_cache_hits_total") == store["hits"]
    assert value(samples, "csm_prefix_cache_misses_total") == store["misses"]
    assert value(samples, "csm_prefix_cache_positions_saved_total") == store["positions_saved"] > 0
    assert value(samples, "csm_prefix_cache_bytes") == store["bytes"] > 0
    assert value(samples, "csm_prefix_cache_max_bytes") == store["max_bytes"]
    assert value(samples, "csm_prefix_cache_entries") == store["entries"]


def test_each_app_has_its_own_registry():
    a, b = ServerMetrics(), ServerMetrics()
    a.frames.inc(5)
    assert b.frames._value.get() == 0
    assert error_code(b'{"error": {"code": "voice_taken", "type": "x"}}') == "voice_taken"
    assert error_code(b"<html>") == "unknown"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus package")
def test_a_real_prometheus_scrapes_metrics_with_the_api_key(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, api_key="k3y") as client:
        client.headers["authorization"] = "Bearer k3y"
        assert speak(client, response_format="pcm").status_code == 200
        target = client.base_url.netloc.decode()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        web = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.close()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: csm\n"
            "    authorization: {credentials: k3y}\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n"
        )
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address={web}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            query = f"http://{web}/api/v1/query?query=csm_requests_total"
            found, deadline = "", time.time() + 60
            while time.time() < deadline and "/v1/audio/speech" not in found:
                time.sleep(1)
                try:
                    found = urllib.request.urlopen(query, timeout=5).read().decode()
                except OSError:
                    pass
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert '"endpoint":"/v1/audio/speech"' in found and '"status":"200"' in found


def bucket_counts(samples: dict, name: str) -> dict[float, float]:
    return {float(dict(k[1])["le"]): v for k, v in samples.items() if k[0] == f"{name}_bucket"}


@pytest.mark.slow  # ~6 s: a 20 s clip encoded and prefilled while another request streams
def test_a_joining_prefill_shows_in_the_running_rows_inter_frame_gap(checkpoint, tmp_path):
    """The gap histogram is what issue 30's "streams never stall" goal reads: a request whose long context is
    prefilled while another streams makes that stream wait at least as long as the prefill took."""
    import base64
    import io
    import threading

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(np.arange(24000 * 20) / 7)).astype(np.float32), 24000, format="WAV")
    clip = base64.b64encode(buf.getvalue()).decode()
    # prefill_chunk=None: the joiner is prefilled whole between two frames (the default slices it)
    with serve(checkpoint, tmp_path, max_frames=400, max_seq_len=2048, prefill_chunk=None) as client:
        first_audio, joined, outlived = threading.Event(), threading.Event(), threading.Event()

        def runner():  # streams (up to 400 frames) until the joining request is done, then hangs up
            # one sentence: one job, so its row runs throughout (two would leave a moment with no row)
            body = {
                "model": "csm",
                "input": "A stream that runs on and on while another request joins it" * 2,
            }
            with client.stream("POST", "/v1/audio/speech", json={**body, "response_format": "pcm"}) as r:
                for _ in r.iter_bytes():
                    first_audio.set()
                    if joined.is_set():
                        outlived.set()  # still streaming after the joiner was done
                        break

        thread = threading.Thread(target=runner)
        thread.start()
        assert first_audio.wait(30)
        before = scrape(client)  # the stream's own prefill (alone, maybe a first-call warm-up) is left out
        context = [{"speaker": 1, "text": "Twenty seconds of a tone.", "audio": clip}]
        assert speak(client, response_format="pcm", context=context).status_code == 200
        joined.set()
        thread.join(60)
        samples = scrape(client)
    assert outlived.is_set(), "the running stream ended before the joiner: nothing to measure"

    old = bucket_counts(before, "csm_prefill_seconds")
    prefill = {le: n - old[le] for le, n in bucket_counts(samples, "csm_prefill_seconds").items()}
    gaps = bucket_counts(samples, "csm_inter_frame_gap_seconds")
    total_gaps = gaps[float("inf")]
    assert prefill[float("inf")] == 1 and total_gaps > 10  # the joiner's prefill alone
    # the joiner's prefill took more than b seconds, b the largest bucket bound it does not fit under ...
    b = max(le for le, n in prefill.items() if n < 1)
    # ... so a gap of the running row is longer than b: the largest gap bound at or below b misses one
    below = max(le for le in gaps if le <= b)
    assert gaps[below] < total_gaps, (b, gaps)
