"""mmtune: fine-tune, evaluate and serve CLIP-family vision-language models.

The Python API mirrors the command line::

    import mmtune
    cfg = mmtune.load_config("configs/demo.yaml", {"train.epochs": 5})
    metrics = mmtune.train(cfg)                     # mmtune train
    metrics = mmtune.evaluate("runs/demo")          # mmtune eval
    model, processor = mmtune.load_run("runs/demo") # encode_image / encode_text
"""

from __future__ import annotations

from mmtune import threads as _threads

_threads.apply()  # before anything imports torch: libgomp reads its policy once, at load

__version__ = "0.1.0"

_LAZY = {
    "load_config": "mmtune.config",
    "Config": "mmtune.config",
    "train": "mmtune.api",
    "evaluate": "mmtune.api",
    "build_data": "mmtune.api",
    "load_model": "mmtune.models",
    "load_run": "mmtune.runs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    # Lazy: `import mmtune` stays light; torch/transformers load on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmtune' has no attribute {name!r}")
