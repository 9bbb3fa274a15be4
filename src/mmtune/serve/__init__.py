"""Serving: a FastAPI app with micro-batched model calls, an index search and a search page.

`create_app(Backend.from_run(run, index_dir), ServeConfig())` → an ASGI app for uvicorn;
`mmtune serve RUN --index DIR` does the same from the command line.
"""

from mmtune.serve.app import create_app
from mmtune.serve.backend import Backend
from mmtune.serve.batcher import MicroBatcher, Overloaded
from mmtune.serve.limits import ServeConfig

__all__ = ["Backend", "MicroBatcher", "Overloaded", "ServeConfig", "create_app"]
