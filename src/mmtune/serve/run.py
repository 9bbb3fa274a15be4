"""Run an app with uvicorn: graceful SIGTERM/SIGINT (requests in flight finish) and exit code 0."""

from __future__ import annotations

import signal


def _exit_quietly(signum, frame):
    raise SystemExit(0)


def run_server(app, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True) -> None:
    """Serve until SIGTERM/SIGINT; uvicorn stops accepting, lets requests in flight finish.

    uvicorn re-raises the signal it caught once it has shut down; the handler installed here
    turns that into a normal exit (code 0) instead of death by signal.
    """
    import sys

    import uvicorn

    # The model thread re-takes the GIL after every torch op; with the default 5 ms switch
    # interval a busy event loop makes it wait that long each time (a forward has hundreds).
    sys.setswitchinterval(0.0002)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)
    config = uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level="info")
    try:
        uvicorn.Server(config).run()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
