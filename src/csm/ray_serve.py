"""`csm serve --ray`: the same FastAPI app as N Ray Serve replicas behind Ray Serve's HTTP proxy (needs the `ray`
extra). Each replica loads its own model and runs its own scheduler; `csm.server` does not know Ray exists.

Routing: `AffinityRouter` (a `ray.serve.request_router.RequestRouter`) sends every request carrying a session or
conversation id (`X-Session-Id`, `X-Conversation-Id`, or `session_id` / `conversation_id` in the query string, for
WebSockets) to the same replica: rendezvous hashing of the id over the live replicas, so every proxy agrees
without shared state, and only the ids of a replica that leaves move. A stateless request may send
`X-Prefix-Key` (any string naming its prompt prefix, e.g. a hash of its voice and `context`) to get the same
treatment. Ray Serve's HTTP proxy routes on the request head only (the body streams to the replica after it is
chosen), so the router cannot read a body's `context` itself. Requests without a key go to the less loaded of
two replicas drawn at random (power of two choices, Ray's default).

Voices: every replica reads and writes one voice folder (`--voices-dir`, on shared storage across machines); a
voice saved through one replica is read from disk by the others on first use."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import signal
import threading
from dataclasses import asdict
from urllib.parse import parse_qs

log = logging.getLogger("csm.server")

AFFINITY_HEADERS = (b"x-session-id", b"x-conversation-id", b"x-prefix-key")
AFFINITY_QUERY = ("session_id", "conversation_id")
MAX_KEY_CHARS = 256


def affinity_key(scope: dict | None) -> str | None:
    """The session / conversation / prefix key of an ASGI scope's request head; None when it has none."""
    if not scope:
        return None
    headers = dict(scope.get("headers") or [])
    for name in AFFINITY_HEADERS:
        value = headers.get(name)
        if value:
            return f"{name.decode()}={value.decode('latin-1')[:MAX_KEY_CHARS]}"
    query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
    for name in AFFINITY_QUERY:
        if query.get(name):
            return f"{name}={query[name][0][:MAX_KEY_CHARS]}"
    return None


def request_scope(pending_request) -> dict | None:
    """The ASGI scope of a request from Ray Serve's HTTP proxy (a pickled `StreamingHTTPRequest`), else None."""
    for arg in pending_request.args if pending_request is not None else ():
        if isinstance(arg, bytes | bytearray):
            try:
                arg = pickle.loads(arg)  # what the proxy itself sends; never a client's bytes
            except Exception:
                continue
        scope = getattr(arg, "asgi_scope", None)
        if isinstance(scope, dict):
            return scope
    return None


def rendezvous(key: str, replica_ids: list[str]) -> list[str]:
    """`replica_ids` ordered by their rendezvous (highest random weight) score for `key`: first is the owner."""

    def score(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{rid}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=score, reverse=True)


def _router_class():
    from ray.serve.request_router import FIFOMixin, RequestRouter

    class AffinityRouter(FIFOMixin, RequestRouter):
        """A request with an affinity key goes to its key's replica (the next in rendezvous order when that one
        is full); one without, to the less loaded of two random replicas."""

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            if not candidate_replicas:
                return []
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            key = affinity_key(request_scope(pending_request))
            if key is not None:
                return [[by_id[rid]] for rid in rendezvous(key, list(by_id))]
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    AffinityRouter.__module__ = __name__
    return AffinityRouter


def __getattr__(name: str):  # `csm.ray_serve.AffinityRouter`, importable by path (Ray Serve's config) lazily
    if name == "AffinityRouter":
        cls = _router_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def deployment(
    model: str,
    settings: dict,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    replicas: int = 2,
    autoscale: tuple[int, int] | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
):
    """The bound Ray Serve application: `CsmReplica` with the affinity router, `replicas` copies (or autoscaled
    between `autoscale`'s bounds on ongoing requests)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    @serve.ingress()
    class CsmReplica:
        """One replica: the model, its scheduler and the whole FastAPI app of `csm serve`."""

        def __init__(self, model, settings, device, dtype, quantize):
            self.args = model, settings, device, dtype, quantize

        def __serve_build_asgi_app__(self):
            from csm.server import ServerSettings, load_app  # absolute: this class travels by value

            model, settings, device, dtype, quantize = self.args
            self.csm_app = load_app(model, device, dtype, ServerSettings(**settings), quantize=quantize)
            replica = serve.get_replica_context().replica_id.unique_id
            self.csm_app.state.metrics.replica.info({"replica": replica})  # csm_replica_info{replica=...}
            return self.csm_app

        def check_health(self):  # Ray restarts a replica whose scheduler died
            app = getattr(self, "csm_app", None)
            if app is not None and not app.state.scheduler.alive:
                raise RuntimeError("the scheduler thread is not running")

    batch = settings.get("max_batch_size", 8)
    options = {
        "request_router_config": RequestRouterConfig(request_router_class="csm.ray_serve.AffinityRouter"),
        # rows + waiting line per replica: beyond, the router tries another replica (or the proxy queues)
        "max_ongoing_requests": batch + settings.get("max_queue", 64),
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 30,
    }
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": batch,  # one full batch per replica
        }
    else:
        options["num_replicas"] = replicas
    return (
        serve.deployment(CsmReplica, name="csm")
        .options(**options)
        .bind(model, settings, device, dtype, quantize)
    )


def app_builder(args: dict):
    """The application for a Ray Serve config file (KubeRay's RayService): `import_path: csm.ray_serve:app_builder`
    with `args:` model (default $CSM_MODEL), device, dtype, quantize, replicas, and any `ServerSettings` field
    (api_key, max_batch_size, voices_dir, ...; voices_dir defaults to $CSM_VOICES_DIR). The config's
    `deployments:` section overrides replicas and resources as usual."""
    import dataclasses

    from csm.server import ServerSettings, model_id
    from csm.voice import voices_dir

    args = dict(args or {})
    model = str(args.pop("model", None) or os.environ.get("CSM_MODEL", "sesame/csm-1b"))
    device, dtype, quantize = (args.pop(k, None) for k in ("device", "dtype", "quantize"))
    replicas = int(args.pop("replicas", 2))
    fields = {f.name for f in dataclasses.fields(ServerSettings)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"unknown args for csm.ray_serve:app_builder: {', '.join(unknown)}")
    settings = ServerSettings(model_name=model_id(model), model_path=model, **args)
    settings.voices_dir = settings.voices_dir or str(voices_dir())
    settings.api_key = settings.api_key or os.environ.get("CSM_API_KEY")
    return deployment(model, asdict(settings), device, dtype, quantize, replicas=replicas)


def run(args, settings) -> int:
    """`csm serve --ray`: start (or join, with $RAY_ADDRESS) Ray, deploy, serve until SIGTERM or Ctrl-C."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        print(f"`csm serve --ray` needs the ray extra ({e.name or e}): pip install 'csm-speech[ray]'")
        return 1
    from csm.voice import voices_dir

    settings.voices_dir = settings.voices_dir or str(voices_dir())  # one folder for every replica
    ray.init(ignore_reinit_error=True, logging_level="WARNING")
    host = getattr(args, "host", None) or "127.0.0.1"
    port = getattr(args, "port", None)
    serve.start(http_options={"host": host, "port": 8000 if port is None else int(port)})
    app = deployment(
        str(args.model),
        {k: v for k, v in asdict(settings).items()},
        getattr(args, "device", None),
        getattr(args, "dtype", None),
        getattr(args, "quantize", None),
        replicas=getattr(args, "replicas", None) or 2,
        autoscale=getattr(args, "autoscale", None),
        cpus_per_replica=getattr(args, "cpus_per_replica", None) or 1.0,
        gpus_per_replica=getattr(args, "gpus_per_replica", None) or 0.0,
    )
    serve.run(app, name="csm", route_prefix="/")
    print(f"csm serving on http://{host}:{port} through Ray Serve; Ctrl-C or SIGTERM stops it", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()  # each replica drains: graceful_shutdown_timeout_s
    ray.shutdown()
    return 0
