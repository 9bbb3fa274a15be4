"""The study: Optuna storage, sampler and pruner, stale-trial recovery and the worker loop."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmtune.errors import ConfigError, UserError
from mmtune.sweep import objective_of
from mmtune.sweep.space import Base, Space

log = logging.getLogger("mmtune.sweep")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
MAX_ERRORS = 3  # trials in a row that raise before a worker gives up


@dataclass
class Sweep:
    """Everything a worker needs to run trials (picklable: it crosses to spawned processes)."""

    base: Base
    space: Space
    folder: Path
    name: str
    trials: int
    sampler: str = "tpe"
    pruner: str = "median"
    storage: str | None = None
    cache: bool = True
    seed: int = 0
    objective: tuple[str, bool] = field(default=("", True))

    @property
    def url(self) -> str:
        return self.storage or f"sqlite:///{(self.folder / 'study.db').resolve()}"


def make_sampler(sw: Sweep, offset: int):
    import optuna

    seed = sw.seed + offset  # each worker (and each resumed session) draws its own points
    if sw.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sw.sampler == "grid":
        return optuna.samplers.GridSampler(sw.space.grid(), seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(8, max(2, sw.trials // 3)))


def make_pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(sw: Sweep, offset: int = 0):
    """Create or load the sweep's study (SQLite in the sweep folder unless --storage)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # SQLite lets one writer in at a time; the others wait instead of failing at once
    storage = optuna.storages.RDBStorage(sw.url, engine_kwargs={"connect_args": {"timeout": 120}})
    direction = "maximize" if sw.objective[1] else "minimize"
    try:
        return optuna.create_study(
            study_name=sw.name,
            storage=storage,
            direction=direction,
            sampler=make_sampler(sw, offset),
            pruner=make_pruner(sw.pruner),
            load_if_exists=True,
        )
    except ValueError as e:  # e.g. the stored study optimises in the other direction
        raise UserError(f"study {sw.name} in {sw.url}: {e}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study) -> int:
    """Mark RUNNING trials whose process is gone FAIL and queue their parameters again."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get("host") == socket.gethostname() and _alive(attrs.get("pid", -1)):
            continue  # another sweep process on this machine is still running it
        # Study.tell only accepts trials this process asked for; the storage takes any
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        n += 1
    return n


@contextlib.contextmanager
def _lock(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # count-then-ask must be atomic across workers
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def counted(study) -> int:
    """Trials that count towards --trials: finished (complete or pruned) and running ones."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


def work(sw: Sweep, worker: int = 0) -> int:
    """Ask for trials and run them until the study holds `sw.trials`; return how many ran here."""
    from mmtune.sweep.cache import trial_cache

    study = open_study(sw, offset=1000 * worker + len(study_trials(sw)))
    ran, errors = 0, 0
    with trial_cache(sw.cache):
        while True:
            with _lock(sw.folder / ".ask.lock"):
                if counted(study) >= sw.trials:
                    return ran
                trial = study.ask()
                trial.set_user_attr("pid", os.getpid())
                trial.set_user_attr("host", socket.gethostname())
            ok = run_trial(sw, study, trial)
            ran += 1
            errors = 0 if ok else errors + 1
            if errors >= MAX_ERRORS:
                raise UserError(f"{MAX_ERRORS} trials in a row failed; see the log above")


def study_trials(sw: Sweep) -> list:
    """The study's trials so far (none when it does not exist yet)."""
    import optuna

    try:
        return optuna.load_study(study_name=sw.name, storage=sw.url).get_trials(deepcopy=False)
    except KeyError:
        return []


def planned_steps(cfg, n_train: int) -> int:
    """The optimizer steps a run of `cfg` is planned to take (single process)."""
    per_epoch = n_train // cfg.data.batch_size // cfg.train.grad_accum
    return cfg.train.max_steps or math.ceil(cfg.train.epochs * per_epoch)


def trial_cfg(sw: Sweep, params: dict, number: int):
    """A trial's config: the base, the space's fixed values and this trial's parameters."""
    # the final evaluation runs on val, and shift splits (digits-shift is made from the test
    # digits) stay out of every trial: the search never sees the test data
    extra = {
        "output_dir": str(sw.folder),
        "name": f"trial-{number:04d}",
        "eval.split": "val",
        "data.shift": [],
        "train.progress": False,
    }
    return sw.base.load({**sw.space.fixed, **params, **extra})


def run_trial(sw: Sweep, study, trial) -> bool:
    """Train one trial, reporting val figures at each evaluation; tell the study how it ended."""
    from optuna.trial import TrialState

    from mmtune import api
    from mmtune.engine import Pruned
    from mmtune.sweep.cache import splits_of

    params = {p.key: p.suggest(trial) for p in sw.space.params}
    cfg = trial_cfg(sw, params, trial.number)
    metric, _ = objective_of(cfg)
    planned = planned_steps(cfg, len(splits_of(cfg).train))
    trial.set_user_attr("planned_steps", planned)
    trial.set_user_attr("run", cfg.name)
    start = time.perf_counter()

    def on_eval(step: int, metrics: dict) -> None:
        _require_metric(metric, metrics)
        if step < planned:  # the last evaluation is the trial's result, not a reason to prune
            trial.report(float(metrics[metric]), step)
            if trial.should_prune():
                raise Pruned(f"trial {trial.number} pruned at step {step}")

    state, value = TrialState.COMPLETE, None
    try:
        metrics = api.train(cfg, on_eval=on_eval)
        _require_metric(metric, metrics)
        value = float(metrics[metric])
    except Pruned:
        state = TrialState.PRUNED
    except ConfigError:
        study.tell(trial, state=TrialState.FAIL)
        raise  # a wrong --metric or config: every trial would fail the same way
    except Exception as e:  # a diverged trial is a result of the search, not the end of it
        log.warning("trial %d failed: %s", trial.number, e)
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        state = TrialState.FAIL
    trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
    trial.set_user_attr("steps", _last_step(sw.folder / cfg.name))
    study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    shown = f"{metric} {value:.4f}" if value is not None else state.name.lower()
    print(f"trial {trial.number}: {shown}  {json.dumps(params)}", flush=True)
    return state != TrialState.FAIL


def _require_metric(metric: str, metrics: dict) -> None:
    if metrics.get(metric) is None:
        known = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, float)))
        raise ConfigError(f"metric '{metric}': the run reports no such figure ({known})")


def _last_step(run_dir: Path) -> int:
    from mmtune.report import read_jsonl

    steps = [r.get("step", 0) for r in read_jsonl(run_dir / "metrics.jsonl")]
    return max(steps, default=0)
