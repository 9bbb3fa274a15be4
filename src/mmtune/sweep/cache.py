"""What trials of one sweep share in a worker process: the screened splits and the loaded model."""

from __future__ import annotations

import contextlib
import copy

_SPLITS: dict = {}
_MODELS: dict = {}
_ORIGINAL: dict = {}


def _originals() -> dict:
    if not _ORIGINAL:
        from mmtune import api, models

        _ORIGINAL.update(build_data=api.build_data, load_model=models.load_model)
    return _ORIGINAL


def splits_of(cfg):
    """The screened splits of `cfg.data`, read once per worker process."""
    key = (cfg.data.model_dump_json(), cfg.seed)
    if key not in _SPLITS:
        _SPLITS[key] = _originals()["build_data"](cfg)
    return copy.copy(_SPLITS[key])  # a shallow copy: trials only read the record lists


def model_of(model_cfg):
    """The model and processor of `cfg.model`, loaded once; each trial gets its own copy."""
    key = model_cfg.model_dump_json()
    if key not in _MODELS:
        _MODELS[key] = _originals()["load_model"](model_cfg)
    model, processor = _MODELS[key]
    return copy.deepcopy(model), processor  # a trial adds LoRA layers or a head in place


@contextlib.contextmanager
def trial_cache(enabled: bool = True):
    """While open (and enabled), `mmtune.api` reads data and models through these caches."""
    from mmtune import api, models

    original = _originals()
    if enabled:
        # api._train looks both names up at call time, so swapping them routes every trial here
        api.build_data, models.load_model = splits_of, model_of
    try:
        yield
    finally:
        api.build_data, models.load_model = original["build_data"], original["load_model"]
