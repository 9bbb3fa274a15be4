"""The training loop: exact resume, accumulation, non-finite steps, checkpoint safety."""

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file

from mmtune import api
from mmtune.checkpoint import (
    clean_stale,
    is_complete,
    load_trainer_state,
    read_safetensors,
    save_checkpoint,
)
from mmtune.config import load_config
from mmtune.engine import adamw, epoch_batches, lr_factor, param_groups
from mmtune.errors import CheckpointError, UserError
from mmtune.report import read_jsonl
from tests.conftest import tiny_overrides


def _weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("accum, stop", [(1, 3), (3, 1)])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_cfg, tmp_path, accum, stop):
    """R1: k steps, stop, a new Trainer resumes to N: weights bitwise equal to the uninterrupted
    run (CPU, deterministic), optimizer state and schedule equal. R3: with accumulation 3 the
    stop falls after 3 micro-batches (an odd number): same step count and weights, no
    half-accumulated update. (R2, the data position: tests/test_reliability.py.)"""
    common = {"train.max_steps": 6, "train.grad_accum": accum, "train.deterministic": True, "data.augment": True}
    straight = tiny_cfg(name="straight", **common)
    api.train(straight)
    part = tiny_cfg(name="parts", **common, **{"train.stop_after_steps": stop})
    assert api.train(part) == {"train.steps": stop}
    meta = json.loads((part.run_dir / "checkpoints/last/meta.json").read_text())
    assert meta["state"]["step"] == stop and meta["state"]["batch"] == stop * accum
    resumed = tiny_cfg(name="parts", **common)
    api.train(resumed, resume="auto")  # a new Trainer, as a new process would build
    _assert_same_weights(_weights(straight.run_dir), _weights(resumed.run_dir))
    a = load_trainer_state(straight.run_dir / "checkpoints/last")
    b = load_trainer_state(resumed.run_dir / "checkpoints/last")
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["last_epoch"] == 6
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_resume_refuses_other_data_and_missing_paths(tiny_cfg):
    """R9: resuming with another batch size or other data is refused by the stored dataset
    fingerprint (never silently skipping new samples). R7: `--resume` of a missing path →
    "no valid checkpoint at …"; a run folder in use is never overwritten without --resume."""
    cfg = tiny_cfg(name="r", **{"train.stop_after_steps": 1})
    api.train(cfg)
    other = tiny_cfg(name="r", **{"data.batch_size": 16})
    with pytest.raises(CheckpointError, match="fingerprint differs"):
        api.train(other, resume="auto")
    other_data = tiny_cfg(name="r", **{"data.split_seed": 1})  # other training samples
    with pytest.raises(CheckpointError, match="fingerprint differs"):
        api.train(other_data, resume="auto")
    with pytest.raises(CheckpointError, match="no valid checkpoint at"):
        api.train(tiny_cfg(name="r2"), resume=str(cfg.run_dir / "nope"))
    with pytest.raises(UserError, match="already holds a run"):
        api.train(tiny_cfg(name="r"))


class _NaNAt:
    """Wraps a task so its loss is NaN on chosen micro-batches (1-based)."""

    def __init__(self, task, bad):
        self.task, self.bad, self.calls = task, set(bad), 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch):
        self.calls += 1
        out = self.task.loss(model, batch)
        if self.calls in self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


def _trainer(cfg, bad):
    from mmtune.engine import Trainer, make_accelerator
    from mmtune.tasks import Context, get_task

    splits = api.build_data(cfg)
    acc = make_accelerator(cfg, cfg.run_dir)
    inner = get_task("contrastive")(Context(cfg, splits, acc.device))
    model = inner.build()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, _NaNAt(inner, bad), model, acc, (splits.train, splits.val), cfg.run_dir)


def test_nan_step_is_skipped_weights_untouched(tiny_cfg):
    """D6: NaN in one batch: that step is skipped — weights unchanged, optimizer and scheduler
    not stepped — and counted."""
    cfg = tiny_cfg(**{"train.on_nonfinite": "skip", "train.max_steps": 3})
    tr = _trainer(cfg, bad={2})
    seen = []
    original = tr._optimizer_step

    def adam_steps():
        return {float(s["step"]) for s in tr.opt.state_dict()["state"].values()}

    def spy(bad):
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        lr, steps = tr.sched.get_last_lr()[0], adam_steps()
        original(bad)
        if bad:
            after = tr.model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
            assert adam_steps() == steps  # the optimizer did not step
            seen.append((before, lr))

    tr._optimizer_step = spy
    state = tr.fit()
    assert state.step == 3 and state.skipped_steps == 1
    ((before, lr),) = seen
    after_skip_lr = [r["lr"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl")][1]
    assert after_skip_lr == lr  # the schedule did not advance on the skipped step
    assert tr.sched.last_epoch == 3
    assert adam_steps() == {3.0}  # 3 optimizer steps; the skipped batch is not one of them


def test_nan_stops_with_the_step_named(tiny_cfg):
    """D6: non-finite by default, or K=2 consecutive non-finite steps: the run stops naming it."""
    tr = _trainer(tiny_cfg(), bad={2})
    with pytest.raises(UserError, match=r"non-finite loss at step 2 \(epoch 0, batch 2\)"):
        tr.fit()
    tr = _trainer(tiny_cfg(**{"train.on_nonfinite": "skip", "train.max_nonfinite": 2}), bad={1, 2})
    with pytest.raises(UserError, match="non-finite loss at step 1"):
        tr.fit()


def test_nan_metric_keeps_jsonl_valid(tmp_path):
    """D7: a NaN/inf metric is written as null: metrics.jsonl stays valid JSON."""
    from mmtune.engine import append_jsonl

    append_jsonl(tmp_path / "m.jsonl", {"loss": float("nan"), "x": float("inf"), "y": 1.0})
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"loss": None, "x": None, "y": 1.0}


# ---------------------------------------------------------------- checkpoints


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    """R4: the writer raises after the first file: the previous checkpoint is intact, no temp
    folder is left. (SIGKILL mid-save: tests/test_reliability.py.)"""
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "last", model, {"a": torch.ones(1)}, {"v": 1})
    with torch.no_grad():
        model.weight.add_(1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)  # the writer fails after the weights file
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "last", model, {"a": torch.ones(1)}, {"v": 2})
    assert is_complete(tmp_path / "last")
    assert json.loads((tmp_path / "last/meta.json").read_text()) == {"v": 1}
    assert not list(tmp_path.glob(".tmp-*"))


def test_stale_temp_and_half_swapped_folders_are_repaired(tmp_path):
    """R4: stale temp folders are removed at the next start; a checkpoint killed between the
    two renames of the swap is restored."""
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "last", model)
    (tmp_path / "last").rename(tmp_path / ".trash-last")  # killed between the two renames
    (tmp_path / ".tmp-best-123").mkdir()  # killed while writing
    clean_stale(tmp_path)
    assert is_complete(tmp_path / "last") and not (tmp_path / ".tmp-best-123").exists()


def test_read_only_folder_fails_loudly(tmp_path):
    """R6: saving into a read-only folder raises (a full disk: tests/test_reliability.py)."""
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ro" / "last", torch.nn.Linear(2, 2))


def test_truncated_and_malformed_safetensors_give_clear_errors(tmp_path):
    """R5: a truncated weights file → an error naming it. S4: a header length past the file end
    or over 100 MB → a clear error before any large allocation."""
    save_checkpoint(tmp_path / "c", torch.nn.Linear(30, 30))
    f = tmp_path / "c" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_safetensors(f)
    f.write_bytes(struct.pack("<Q", 10**12) + b"{}")  # header length far past the file end
    with pytest.raises(CheckpointError, match="damaged safetensors header"):
        read_safetensors(f)
    f.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(f)


def test_pickle_that_runs_code_is_refused(tmp_path):
    """S1: a trainer_state.pt whose pickle would create a file is refused with our error; the
    file is never created. (Pickled model weights: tests/test_models.py.)"""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "trainer_state.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_trainer_state(tmp_path / "c")
    assert not marker.exists()


# ---------------------------------------------------------------- pieces


def test_schedule_warmup_then_cosine_to_floor():
    assert lr_factor(0, 4, 20) == pytest.approx(1 / 5)
    assert lr_factor(3, 4, 20) == pytest.approx(4 / 5)
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, floor=0.1) == pytest.approx(0.1)


def test_weight_decay_exclusions():
    from mmtune.config import ModelConfig
    from mmtune.models import load_model

    model, _ = load_model(ModelConfig(name="tiny-clip"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_names = {names[id(p)] for p in no_decay["params"]}
    assert "hf.logit_scale" in no_names
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert any("layer_norm" in n for n in no_names) and any(n.endswith("bias") for n in no_names)


def test_adamw_is_fused_where_it_can_be_and_steps_like_the_default():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    fused, plain = adamw(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x = torch.randn(16, 8)
    for model, opt in ((a, fused), (b, plain)):
        for _ in range(3):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_epoch_batches_cover_once_and_split_by_rank():
    full = epoch_batches(10, 2, seed=0, epoch=0)
    assert len(full) == 5 and sorted(i for b in full for i in b) == list(range(10))
    r0 = epoch_batches(10, 2, 0, 0, rank=0, world=2)
    r1 = epoch_batches(10, 2, 0, 0, rank=1, world=2)
    assert len(r0) == len(r1) == 2 and not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    assert epoch_batches(10, 2, 0, 1) != full


def test_length_grouped_batches_hold_similar_lengths_in_a_seeded_order():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(4000)]
    plain = epoch_batches(4000, 8, 0, 0)
    grouped = epoch_batches(4000, 8, 0, 0, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(4000))  # every sample once

    def padding(batches):  # the share of padding when each batch pads to its longest sample
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches) / sum(
            max(lengths[i] for i in b) * len(b) for b in batches
        )

    assert padding(grouped) < 0.1 < 0.4 < padding(plain)
    assert grouped == epoch_batches(4000, 8, 0, 0, lengths=lengths) != epoch_batches(4000, 8, 0, 1, lengths=lengths)
    firsts = [max(lengths[i] for i in b) for b in grouped[:20]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # not longest-first
    r0 = epoch_batches(4000, 8, 0, 0, rank=0, world=2, lengths=lengths)
    r1 = epoch_batches(4000, 8, 0, 0, rank=1, world=2, lengths=lengths)
    assert len(r0) == len(r1) == 250 and not {i for b in r0 for i in b} & {i for b in r1 for i in b}


def test_report_to_tensorboard_writes_the_logged_scalars(tiny_cfg):
    """train.report_to: [tensorboard] goes through accelerate's tracker into RUN/tracking/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(**{"train.report_to": ["tensorboard"], "train.eval_every": 2})
    api.train(cfg)
    events = list((cfg.run_dir / "tracking").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent)).Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    logged = [r["loss"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert losses == pytest.approx(logged, rel=1e-5)  # the same figures as metrics.jsonl
    assert "eval/zeroshot.top1" in acc.Tags()["scalars"]


def test_labels_free_pairs_choose_best_by_validation_loss_and_say_so(tmp_path, pairs_folder, caplog):
    """Caption-only data cannot give zeroshot.top1: best/ is chosen by val.loss, said once."""
    folder, rows = pairs_folder
    (folder / "pairs.csv").write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, c, _ in rows))
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            **{
                "data.dataset": str(folder / "pairs.csv"),
                "data.val_fraction": 0.25,
                "data.batch_size": 4,
                "train.eval_every": 1,
                "train.max_steps": 3,
            },
        ),
    )
    with caplog.at_level("WARNING", logger="mmtune"):
        api.train(cfg)
    warned = [r.getMessage() for r in caplog.records if "cannot be computed" in r.getMessage()]
    assert len(warned) == 1 and "val.loss" in warned[0] and "\n" not in warned[0]
    evals = [r for r in read_jsonl(cfg.run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 3 and all("val.loss" in r for r in evals)
    best = min(range(3), key=lambda i: evals[i]["val.loss"])
    meta = json.loads((cfg.run_dir / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["state"]["step"] == evals[best]["step"]  # the lowest validation loss was kept


def _evals(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "eval"]


def test_early_stopping_stops_before_max_steps_and_says_why(tiny_cfg, capsys):
    """train.early_stopping=2 with a min_delta no accuracy can beat: evaluations 2 and 3 bring no
    improvement, so the run stops at step 3 of 10 (before: early_stopping was an unknown key)."""
    cfg = tiny_cfg(
        **{
            "train.max_steps": 10,
            "train.eval_every": 1,
            "train.early_stopping": 2,
            "train.early_stopping_min_delta": 10,
        }
    )
    seen = []
    metrics = api.train(cfg, on_eval=lambda step, m: seen.append(step))
    assert seen == [1, 2, 3]  # the sweep's hook saw every evaluation
    assert [r["step"] for r in _evals(cfg.run_dir)] == [1, 2, 3]
    assert metrics["train.steps"] == 3 and metrics["train.stopped_early"] is True
    assert "zeroshot.top1" in metrics  # the final (test) evaluation still ran, from best
    saved = json.loads((cfg.run_dir / "metrics.json").read_text())
    assert saved["train.stopped_early"] is True and saved["train.steps"] == 3
    last = json.loads((cfg.run_dir / "checkpoints" / "last" / "meta.json").read_text())
    assert last["state"]["step"] == 3 and last["state"]["stopped_early"] is True
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "early stopping" in ln]
    assert len(lines) == 1 and "step 3 of 10" in lines[0] and "zeroshot.top1" in lines[0]


def test_early_stopping_with_large_patience_runs_to_the_end(tiny_cfg):
    cfg = tiny_cfg(**{"train.max_steps": 4, "train.eval_every": 1, "train.early_stopping": 100})
    metrics = api.train(cfg)
    assert metrics["train.steps"] == 4 and metrics["train.stopped_early"] is False
    assert [r["step"] for r in _evals(cfg.run_dir)] == [1, 2, 3, 4]


def test_early_stopping_follows_the_validation_loss_fallback(tmp_path, pairs_folder, capsys):
    """Caption-only data: best (and patience) go by val.loss; a min_delta of 100 stops at step 2."""
    folder, rows = pairs_folder
    (folder / "pairs.csv").write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, c, _ in rows))
    extra = {"data.dataset": str(folder / "pairs.csv"), "data.val_fraction": 0.25, "data.batch_size": 4}
    extra.update({"train.eval_every": 1, "train.max_steps": 6, "train.early_stopping": 1})
    cfg = load_config(None, tiny_overrides(tmp_path, **extra, **{"train.early_stopping_min_delta": 100}))
    metrics = api.train(cfg)
    assert metrics["train.steps"] == 2 and metrics["train.stopped_early"] is True
    out = capsys.readouterr().out
    assert "early stopping at step 2 of 6: val.loss" in out


def test_a_pruned_trial_is_still_pruned_with_early_stopping_on(tiny_cfg):
    from mmtune.engine import Pruned

    cfg = tiny_cfg(**{"train.max_steps": 6, "train.eval_every": 1, "train.early_stopping": 1})

    def prune(step, metrics):
        raise Pruned(f"pruned at {step}")

    with pytest.raises(Pruned):
        api.train(cfg, on_eval=prune)
    assert [r["step"] for r in _evals(cfg.run_dir)] == [1]


def test_early_stopping_needs_evaluations(tiny_cfg):
    with pytest.raises(UserError, match="train.eval_every"):
        tiny_cfg(**{"train.early_stopping": 3})
