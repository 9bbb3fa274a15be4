"""`mmtune sweep` end to end: workers, then best.yaml, trials.csv, the test figure and report."""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import yaml

from mmtune.errors import UserError
from mmtune.sweep.study import Sweep, open_study, recover, work


def run_sweep(sw: Sweep, jobs: int = 1, baseline: str | None = None) -> dict:
    """Run (or continue) the sweep until it holds `sw.trials` finished trials; write its folder."""
    sw.folder.mkdir(parents=True, exist_ok=True)
    study = open_study(sw)
    stale = recover(study)
    if stale:
        print(f"{stale} interrupted trial(s) marked failed and queued again", flush=True)
    start = time.perf_counter()
    if jobs == 1:
        work(sw)
    else:
        _work_in_processes(sw, jobs)
    seconds = time.perf_counter() - start
    return finish(sw, seconds, baseline)


def _threads_each(jobs: int) -> int:
    cores = int(os.environ.get("MMTUNE_THREADS") or os.cpu_count() or 1)
    return max(1, cores // jobs)


def _work_in_processes(sw: Sweep, jobs: int) -> None:
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch thread pool copied by fork
    old = os.environ.get("MMTUNE_THREADS")
    # each worker gets its share of the cores, or N torch pools would oversubscribe the CPU
    os.environ["MMTUNE_THREADS"] = str(_threads_each(jobs))
    try:
        procs = [ctx.Process(target=_worker, args=(sw, i)) for i in range(jobs)]
        for p in procs:
            p.start()
    finally:
        os.environ.pop("MMTUNE_THREADS") if old is None else os.environ.update(MMTUNE_THREADS=old)
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise UserError(f"{len(failed)} of {jobs} sweep workers failed (exit codes {failed})")


def _worker(sw: Sweep, index: int) -> None:
    _die_with_parent()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    work(sw, index)


def _die_with_parent() -> None:
    """Linux: a worker is killed with its sweep, so a killed sweep leaves no trial running."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def finish(sw: Sweep, seconds: float, baseline: str | None) -> dict:
    """best.yaml, the best trial's test figures, trials.csv and report.html."""
    from mmtune.sweep import report

    study = open_study(sw)
    rows = report.trial_rows(study)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done:
        raise UserError(f"sweep {sw.name}: no trial completed; nothing to report")
    best = study.best_trial
    run = sw.folder / best.user_attrs["run"]
    shift = sw.base.load().data.shift  # the trials ran without the base's shift splits
    write_best_yaml(run / "config.yaml", sw.folder / "best.yaml", f"{sw.name}-best", shift)
    summary = {
        "sweep": sw.name,
        "metric": sw.objective[0],
        "higher_is_better": sw.objective[1],
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "best_test": _test_metrics(run, shift),
        "search_seconds": round(seconds, 1),
        "trial_cache": sw.cache,
        "baseline_test": _baseline(baseline),
        **report.pruning_figures(rows),
    }
    (sw.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report.write_trials_csv(rows, sw.folder / "trials.csv")
    report.write_report(sw.folder, rows, summary, study)
    return summary


def write_best_yaml(src: Path, dst: Path, name: str, shift: list[str]) -> None:
    """The best trial's resolved config under a new run name, runnable with `mmtune train -c`."""
    tree = yaml.safe_load(src.read_text())
    tree["name"] = name
    tree["data"]["shift"] = shift
    note = (
        "# The best trial of the sweep, resolved. eval.split is val, as in the search: "
        "`mmtune train -c` reproduces its validation figure; set eval.split=test for the test one.\n"
    )
    dst.write_text(note + yaml.safe_dump(tree, sort_keys=False))


def _test_metrics(run: Path, shift: list[str]) -> dict:
    """The best trial evaluated once on the test split (the search itself never saw it)."""
    from mmtune import api
    from mmtune.config import load_config

    cfg = load_config(run / "config.yaml", {"eval.split": "test", "data.shift": shift})
    metrics = api.evaluate(run, cfg, split="test")
    return {k: v for k, v in metrics.items() if isinstance(v, float) and not k.startswith("data.")}


def _baseline(run: str | None) -> dict | None:
    if run is None:
        return None
    path = Path(run) / "metrics.json"
    if not path.is_file():
        raise UserError(f"--baseline {run}: no metrics.json there (train that run first)")
    metrics = json.loads(path.read_text())
    keep = {k: v for k, v in metrics.items() if isinstance(v, float) and not k.startswith("data.")}
    return {"run": str(run), "split": metrics.get("eval.split"), **keep}
