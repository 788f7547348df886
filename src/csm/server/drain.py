"""Running the app under uvicorn with a graceful drain: on SIGTERM (or Ctrl-C) the listener stays open and new
requests get 503 while those in flight finish, for up to `grace` seconds; then those still running are ended
(their clients see an aborted transfer, logged in one line each) and the server exits. A second signal exits
at once."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("csm.server")


def run_server(app, host: str, port: int, grace: float, log_level: str = "info") -> None:
    """Serve `app` (made by `create_app`) on host:port until a signal, then drain as the module says."""
    import uvicorn

    from .limits import uvicorn_config

    scheduler = app.state.scheduler
    logger = logging.getLogger("csm")
    if not logger.handlers:  # the app's own lines (access log, failures) go to stderr beside uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(log_level.upper())
    # uvicorn's access log has neither the duration nor the request id: the app logs its own line (csm.access).
    config = uvicorn_config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)

    def drain() -> None:
        deadline = time.monotonic() + grace
        while scheduler.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if scheduler.in_flight:
            log.warning(
                "%d request(s) still running after the %g s shutdown grace: ending them",
                scheduler.in_flight,
                grace,
            )
            scheduler.stop()  # their jobs fail: each request ends as an aborted transfer or a 503
            deadline = time.monotonic() + 5
            while scheduler.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
        server.should_exit = True

    def on_signal(sig, frame) -> None:
        if scheduler.draining:  # a second signal: no more waiting
            server.force_exit = server.should_exit = True
            return
        log.info("shutting down: new requests get 503; %d in flight get %g s", scheduler.in_flight, grace)
        scheduler.draining = True
        threading.Thread(target=drain, name="csm-drain", daemon=True).start()

    server.handle_exit = on_signal  # uvicorn installs it for SIGINT and SIGTERM while it runs
    server.run()
