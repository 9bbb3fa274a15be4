"""Hyper-parameter search on Optuna: `mmtune sweep` (see `mmtune.sweep.study`)."""

from __future__ import annotations


def objective_of(cfg) -> tuple[str, bool]:
    """The figure a sweep optimises and whether higher is better: the task's selection metric."""
    from mmtune.tasks import get_task, selection_metric

    return selection_metric(cfg, get_task(cfg.task))
