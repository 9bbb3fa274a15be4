"""Quiet surprises a new user met, each now said in one line or fixed: which split the final
figures come from, `--resume auto` on a new run, empty run folders after a failure, `data check`
naming the bad files, class-aware positives on repeated captions, retrieval on repeated captions,
progress without the bar, and a batch larger than the training set."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mmtune import api, engine
from mmtune.cli import main
from mmtune.config import load_config
from mmtune.data import Record, load_splits
from mmtune.errors import CheckpointError, UserError
from mmtune.tasks import Context, get_task
from tests.conftest import tiny_overrides, write_image


def _pairs(tmp_path, n=40, caption=lambda i: "a red square" if i % 2 == 0 else "a blue square", label=None):
    """A pairs CSV of `n` small images (red for even i, blue for odd) with captions (and labels)."""
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    head = "image,caption" + (",label" if label else "")
    rows = [head]
    for i in range(n):
        write_image(folder / f"i{i}.png", color=(220, 20, 20) if i % 2 == 0 else (20, 20, 220))
        rows.append(f"imgs/i{i}.png,{caption(i)}" + (f",{label(i)}" if label else ""))
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _cfg(tmp_path, **extra):
    over = {"data.dataset": str(_pairs(tmp_path)), "data.batch_size": 8, **extra}
    return load_config(None, tiny_overrides(tmp_path, **over))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ------------------------------------------------------------ a. which split the figures come from


def test_one_file_without_test_says_the_figures_are_on_val_and_records_it(tmp_path, caplog):
    """Before: one data file and no data.test silently evaluated val (4 images) as if it were test."""
    cfg = _cfg(tmp_path, **{"train.eval_every": 2})
    with caplog.at_level(logging.WARNING, logger="mmtune"):
        metrics = api.train(cfg)
    said = _warnings(caplog)
    assert "no data.test: the final figures are on the validation split (4 samples), which also picked " in said[0]
    assert any("the final figures are on 4 val samples: they mean little" in m for m in said)
    saved = json.loads((cfg.run_dir / "metrics.json").read_text())
    assert saved["eval.split"] == metrics["eval.split"] == "val"
    assert saved["data.val"] == 4 and saved["data.test"] == 0


def test_no_validation_data_says_so_and_reports_no_figures(tmp_path, caplog):
    """Before: data.val_fraction=0 with one file evaluated an empty split without a word."""
    cfg = _cfg(tmp_path, **{"data.val_fraction": 0.0})
    with caplog.at_level(logging.WARNING, logger="mmtune"):
        metrics = api.train(cfg)
    assert any(m.startswith("no validation or test data") for m in _warnings(caplog))
    assert metrics["eval.split"] is None
    assert not [k for k in metrics if k.startswith(("retrieval.", "zeroshot."))]
    assert (cfg.run_dir / "checkpoints" / "last" / "COMPLETE").exists()


def test_a_tiny_validation_split_that_picks_best_is_warned_about(tmp_path, caplog):
    """Before: best/ chosen on 4 validation images, with a fair test split, said nothing."""
    data = str(_pairs(tmp_path))
    cfg = _cfg(tmp_path, **{"data.test": data, "train.eval_every": 2})
    splits = load_splits(cfg.data, cfg.seed)
    with caplog.at_level(logging.WARNING, logger="mmtune"):
        assert api.final_eval_split(cfg, splits) == "test"
    assert _warnings(caplog) == ["checkpoints/best/ is picked on 4 validation samples: a choice that means little"]


def test_val_never_falls_back_to_test(tmp_path, caplog):
    """eval.split=val without validation data gives no figures rather than test ones (a search on
    val must never see test); before, an empty split was evaluated."""
    cfg = _cfg(tmp_path, **{"data.val_fraction": 0.0, "eval.split": "val"})
    splits = load_splits(cfg.data, cfg.seed)
    splits.test = splits.train[:30]
    with caplog.at_level(logging.WARNING, logger="mmtune"):
        assert api.final_eval_split(cfg, splits) is None
    assert _warnings(caplog) == [
        "no validation data: eval.split=val has no figures (the test split never stands in for it)"
    ]


def test_eval_of_a_missing_split_names_the_split_it_used(tmp_path, caplog):
    """Before: `mmtune eval --split test` without test data fell back to val and said nothing."""
    cfg = _cfg(tmp_path, **{"data.val_fraction": 0.5})
    api.train(cfg)
    with caplog.at_level(logging.WARNING, logger="mmtune"):
        metrics = api.evaluate(cfg.run_dir, cfg, split="test")
    assert metrics["eval.split"] == "val"
    assert any(
        "no data.test: the final figures are on the validation split (20 samples)" in m for m in _warnings(caplog)
    )


def test_a_split_of_fair_size_is_not_warned_about(tmp_path, caplog):
    """The warnings are for surprises only: digits' own test split (360 images) gets none."""
    cfg = load_config(None, tiny_overrides(tmp_path, **{"train.max_steps": 1}))
    splits = load_splits(cfg.data, cfg.seed)
    with caplog.at_level(logging.WARNING, logger="mmtune"):
        assert api.final_eval_split(cfg, splits) == "test"
    assert _warnings(caplog) == []


# ------------------------------------------------------------ b. --resume


def test_resume_auto_on_a_new_run_says_it_starts_from_scratch(tmp_path, capsys):
    """Before: `--resume auto` on a run that never existed trained from step 0 without a word."""
    cfg = _cfg(tmp_path, **{"train.max_steps": 1})
    api.train(cfg, resume="auto")
    assert f"no checkpoint under {cfg.run_dir / 'checkpoints'}: starting from scratch" in capsys.readouterr().out


def test_resume_from_a_path_that_does_not_exist_is_an_error(tmp_path):
    """Already so before (checked here beside `--resume auto`); and it leaves no run folder."""
    cfg = _cfg(tmp_path, **{"train.max_steps": 1})
    with pytest.raises(CheckpointError, match="no valid checkpoint at"):
        api.train(cfg, resume=str(tmp_path / "nowhere"))
    assert not cfg.run_dir.exists()


# ------------------------------------------------------------ c. no empty run folders


def test_failed_classify_leaves_no_run_folder(tmp_path, capsys):
    """Before: `mmtune classify` on labelled data without a test split failed and left RUN/ behind."""
    data = _pairs(tmp_path, n=12, label=lambda i: "red" if i % 2 == 0 else "blue")
    args = [f"{k}={v}" for k, v in tiny_overrides(tmp_path, name="cls").items()]
    code = main(["classify", *args, f"data.dataset={data}", "data.label_column=label", "options.method=zeroshot"])
    assert code == 2 and "no test split" in capsys.readouterr().err
    assert not (tmp_path / "cls").exists()


def test_failed_train_leaves_no_run_folder_but_keeps_one_that_existed(tmp_path):
    """Before: a batch larger than the data failed after config.yaml and model/ were written."""
    cfg = _cfg(tmp_path, **{"data.batch_size": 64})
    with pytest.raises(UserError):
        api.train(cfg)
    assert not cfg.run_dir.exists()
    cfg.run_dir.mkdir(parents=True)  # a folder the user made: never removed
    with pytest.raises(UserError):
        api.train(cfg)
    assert cfg.run_dir.is_dir()


# ------------------------------------------------------------ d. data check names the bad files


def test_data_check_lists_every_bad_file(tmp_path, capsys):
    """Before: `data check` printed counts by reason; only the first bad file was ever named."""
    data = _pairs(tmp_path, n=30)
    for i in range(24):  # 24 missing images, 1 truncated one
        (tmp_path / "imgs" / f"i{i}.png").unlink()
    (tmp_path / "imgs" / "i29.png").write_bytes((tmp_path / "imgs" / "i28.png").read_bytes()[:60])
    listed = tmp_path / "bad.jsonl"
    assert main(["data", "check", str(data), "--list", str(listed)]) == 1
    out = capsys.readouterr().out
    assert "30 samples, 5 good, 25 bad" in out
    shown = [line for line in out.splitlines() if "/imgs/i" in line]
    assert len(shown) == 20 and all(line.rstrip().endswith("missing") for line in shown)
    assert "… and 5 more" in out
    rows = [json.loads(line) for line in listed.read_text().splitlines()]
    assert len(rows) == 25
    assert {r["sample"] for r in rows if r["reason"] == "missing"} == {
        str(tmp_path / f"imgs/i{i}.png") for i in range(24)
    }
    assert [r["sample"] for r in rows if r["reason"] == "truncated"] == [str(tmp_path / "imgs/i29.png")]


# ------------------------------------------------------------ e. class_aware: auto


def _task(tmp_path, records, **options):
    from mmtune.data import Splits

    cfg = load_config(None, tiny_overrides(tmp_path, **{f"options.{k}": v for k, v in options.items()}))
    return get_task("contrastive")(Context(cfg, Splits(records, [], []), torch.device("cpu")))


def _records(captions, labels=None):
    labels = labels or [None] * len(captions)
    return [
        Record(image=f"x{i}.png", captions=[c], label=lb, id=str(i))
        for i, (c, lb) in enumerate(zip(captions, labels, strict=True))
    ]


def test_class_aware_turns_itself_on_for_repeated_captions(tmp_path, caplog):
    """Before: class_aware defaulted to false, so two images captioned "a red square" in one
    batch were each other's negatives. Now `auto` makes them positives, and says why."""
    task = _task(tmp_path, _records(["a red square", "A red square ", "a blue square"]))
    batch = {"labels": torch.tensor([-1, -1, -1]), "captions": ["a red square", "a blue square", "a red square"]}
    batch["pixel_values"] = torch.zeros(3, 1)
    with caplog.at_level(logging.INFO, logger="mmtune"):
        groups = task._group_ids(batch)
    assert groups.tolist() == [0, 1, 0]
    said = [r.getMessage() for r in caplog.records if "class_aware on (auto)" in r.getMessage()]
    assert len(said) == 1 and "1 of 2 distinct training captions" in said[0] and "same caption" in said[0]


def test_class_aware_auto_keys_on_labels_when_every_record_has_one(tmp_path):
    """Before: off by default, so two images of one class were negatives; `auto` groups by label."""
    task = _task(tmp_path, _records(["a three", "a three", "a four"], [3, 3, 4]))
    batch = {"labels": torch.tensor([3, 4, 3]), "captions": ["x", "y", "z"], "pixel_values": torch.zeros(3, 1)}
    assert task._group_ids(batch).tolist() == [3, 4, 3]


def test_class_aware_auto_stays_off_for_unique_captions_and_explicit_false_wins(tmp_path):
    """`auto` changes nothing where captions are unique; an explicit setting is obeyed either way."""
    batch = {"labels": torch.tensor([-1, -1]), "captions": ["a", "a"], "pixel_values": torch.zeros(2, 1)}
    assert _task(tmp_path, _records(["a red square", "a blue square"]))._group_ids(batch) is None
    repeated = _records(["a red square", "a red square"])
    assert _task(tmp_path, repeated, class_aware=False)._group_ids(batch) is None
    assert _task(tmp_path, _records(["p", "q"]), class_aware=True)._group_ids(batch).tolist() == [0, 0]


# ------------------------------------------------------------ f. retrieval on repeated captions


def test_retrieval_on_repeated_captions_is_explained(tmp_path, caplog):
    """Before: R@1 on captions shared by many images came with no word on what counts as a hit."""
    records = load_splits(_cfg(tmp_path).data).train[:10]
    task = _task(tmp_path, records)
    model = task.build()
    with caplog.at_level(logging.INFO, logger="mmtune"):
        metrics = task.evaluate(model.eval(), records).metrics
        task.evaluate(model, records)
    assert metrics["retrieval.shared_captions"] == 2  # "a red square" and "a blue square"
    said = [r.getMessage() for r in caplog.records if "belong to several images" in r.getMessage()]
    assert len(said) == 1 and "identical text as a hit" in said[0] and "only the exact pair" in said[0]
    unique = _records([f"caption {i}" for i in range(10)])
    for rec, src in zip(unique, records, strict=True):
        rec.image = src.image
    assert "retrieval.shared_captions" not in task.evaluate(model, unique).metrics


# ------------------------------------------------------------ g. progress without the bar


def test_without_the_bar_a_progress_line_is_printed(tmp_path, capsys, monkeypatch):
    """Before: train.progress=false printed nothing until the run ended."""
    monkeypatch.setattr(engine, "PLAIN_LOG_SECONDS", 0.0)  # a line after every step
    api.train(_cfg(tmp_path, **{"train.eval_every": 2}))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    steps = [int(line.split()[1].split("/")[0]) for line in lines if "eval" not in line]
    assert steps == [1, 2, 3, 4] and all("/4  loss " in line and "steps/s  ETA " in line for line in lines)
    evals = [line for line in lines if "eval" in line]
    assert [line.split()[1] for line in evals] == ["2/4", "4/4"]
    assert all("retrieval.t2i.R@1" in line or "val.loss" in line for line in evals)


# ------------------------------------------------------------ h. batch larger than the data


def test_batch_larger_than_the_training_set_suggests_the_largest_that_fits(tmp_path):
    """Before: the refusal named the settings but not what would work."""
    with pytest.raises(UserError) as e:
        api.train(_cfg(tmp_path, **{"data.batch_size": 64}))
    msg = str(e.value)
    assert "the training split has 36 samples" in msg and "set data.batch_size=36 (the largest" in msg
    assert "\n" not in msg


def test_suggestions_with_gradient_accumulation_and_processes():
    """Hand-worked: 36 samples, batch 32 × accumulation 4 → batch 9 or accumulation 1 fits."""
    msg = engine.too_few_samples(36, 32, 4)
    assert "set data.batch_size=9 or train.grad_accum=1 (" in msg
    msg = engine.too_few_samples(100, 40, 2, world=2)
    assert "× 2 processes" in msg and "set data.batch_size=25 or train.grad_accum=1 (" in msg
