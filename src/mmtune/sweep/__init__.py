"""Hyper-parameter search on Optuna: `mmtune sweep` (see `mmtune.sweep.study`)."""

from __future__ import annotations


def objective_of(cfg) -> tuple[str, bool]:
    """The figure a sweep optimises and whether higher is better."""
    # the task contract will declare this per task; until then eval.metric names it
    name = cfg.eval.metric
    return name, not name.endswith("loss")
