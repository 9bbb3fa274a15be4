"""Determinism (X1-X3) and distributed faults (F1, F2) of RELIABILITY.md; F1, F2 and X3 start
2 real processes (gloo) — F1 and F2 through `torchrun` running the `mmtune train` entry point."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mmtune import api
from mmtune.report import read_jsonl
from tests.conftest import tiny_overrides
from tests.test_distributed import free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]


def _weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def _trainer(cfg):
    """The Trainer `api.train` builds, without running it."""
    from mmtune.engine import Trainer, make_accelerator
    from mmtune.tasks import Context, get_task

    api.set_seed(cfg.seed, cfg.train.deterministic)
    splits = api.build_data(cfg)
    acc = make_accelerator(cfg, cfg.run_dir)
    task = get_task(cfg.task)(Context(cfg, splits, acc.device))
    return Trainer(cfg, task, task.build(), acc, (splits.train, splits.val), cfg.run_dir)


def test_same_seed_twice_gives_identical_losses_and_weights(tiny_cfg):
    """X1: same seed and config twice → identical losses and bitwise-identical weights."""
    common = {"data.augment": True, "train.deterministic": True, "train.max_steps": 5}
    a, b = tiny_cfg(name="a", **common), tiny_cfg(name="b", **common)
    api.train(a)
    api.train(b)
    losses = [[r["loss"] for r in read_jsonl(c.run_dir / "metrics.jsonl") if r["kind"] == "train"] for c in (a, b)]
    assert len(losses[0]) == 5 and losses[0] == losses[1]
    wa, wb = _weights(a.run_dir), _weights(b.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = tiny_cfg(name="c", seed=1, **common)  # guard: another seed trains differently
    api.train(c)
    wc = _weights(c.run_dir)
    assert any(not torch.equal(wc[k], wa[k]) for k in wa)


def test_zero_and_two_workers_give_identical_batches(tiny_cfg):
    """X2: 0 vs 2 loader workers with augmentation → identical batches."""
    cfg0 = tiny_cfg(**{"data.augment": True})
    cfg2 = tiny_cfg(**{"data.augment": True, "data.num_workers": 2})
    b0 = list(_trainer(cfg0)._loader(epoch=1, start=0))[:6]
    b2 = list(_trainer(cfg2)._loader(epoch=1, start=0))[:6]
    for x, y in zip(b0, b2, strict=True):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["captions"] == y["captions"]
    plain = list(_trainer(tiny_cfg())._loader(epoch=1, start=0))[0]
    assert not torch.equal(plain["pixel_values"], b0[0]["pixel_values"])  # augmentation is on


def _rank_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    from mmtune.config import load_config

    cfg = load_config(None, tiny_overrides(tmp, **{"data.augment": True}))
    trainer = _trainer(cfg)
    model = trainer.acc.unwrap_model(trainer.model)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    batch = next(iter(trainer._loader(0, 0)))
    torch.save(
        {
            "weights": digest.hexdigest(),
            "pixels": batch["pixel_values"],
            "indices": trainer._loader(0, 0).batch_sampler,
        },
        f"{tmp}/rank{rank}.pt",
    )
    trainer.acc.wait_for_everyone()


@pytest.mark.distributed
def test_two_ranks_share_weights_but_not_augmentation(tmp_path):
    """X3 [dist]: 2 ranks: identical initial weights, different augmentation draws."""
    mp.start_processes(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["weights"] == r1["weights"]  # the same initial weights on every rank
    seen0 = {i for b in r0["indices"] for i in b}
    seen1 = {i for b in r1["indices"] for i in b}
    assert seen0 and not seen0 & seen1  # each rank draws other samples, seeded by index
    assert not torch.equal(r0["pixels"], r1["pixels"])


# ---------------------------------------------------------------- F1, F2: torchrun


FAULTY = """
import os, sys
from mmtune import engine
save = engine.Trainer.save
def save_then_die(self, name="last"):
    save(self, name)
    marker = os.environ["MMTUNE_TEST_MARKER"]
    if self.rank == 1 and self.state.step >= 2 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)  # a rank lost right after a checkpoint
engine.Trainer.save = save_then_die
from mmtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(tmp_path, name, restarts: int, faulty: bool):
    script = tmp_path / ("faulty.py" if faulty else "plain.py")
    script.write_text(
        textwrap.dedent(FAULTY) if faulty else "import sys\nfrom mmtune.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    over = tiny_overrides(
        tmp_path,
        name=name,
        **{
            "train.max_steps": 5,
            "train.save_every": 2,
            "data.batch_size": 16,
            "train.deterministic": True,
            "train.dist_timeout_s": 60,
        },
    )
    cmd = [
        *TORCHRUN,
        "--max-restarts",
        str(restarts),
        "--master-port",
        str(free_port()),
        str(script),
        "train",
        "--resume",
        "auto",
        *(f"{k}={v}" for k, v in over.items()),
    ]
    env = {
        **os.environ,
        "MMTUNE_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MMTUNE_TEST_MARKER": str(tmp_path / f"{name}.killed"),
    }
    # the timeout only guards against a hang; the run takes seconds
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _why(run) -> str:
    """The error lines of a failed torchrun (its tail is the launcher's summary)."""
    lines = (run.stdout + run.stderr).splitlines()
    return "\n".join(ln for ln in lines if "Error" in ln or "error:" in ln)[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_restart_resumes_to_the_same_weights(tmp_path):
    """F1 [dist]: torchrun --max-restarts 1, rank 1 killed after a checkpoint: all restart,
    resume automatically and finish with the uninterrupted run's weights. R8 [dist]: after the
    saves of 2 ranks and a restart, exactly `last` (+ `best`) remain: no rank left a temp or
    trash folder (only rank 0 writes and replaces checkpoints)."""
    straight = _torchrun(tmp_path, "straight", 0, faulty=False)
    assert straight.returncode == 0, _why(straight)
    restarted = _torchrun(tmp_path, "restarted", 1, faulty=True)
    assert restarted.returncode == 0, _why(restarted)
    assert (tmp_path / "restarted.killed").exists()  # the fault did happen
    assert "resumed from" in restarted.stderr
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "restarted")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    for name in ("straight", "restarted"):
        kept = sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir())
        assert kept in (["last"], ["best", "last"]), kept  # no temp or trash folder of any rank


@pytest.mark.distributed
@pytest.mark.slow
def test_lost_rank_without_restarts_fails_naming_the_rank(tmp_path):
    """F2 [dist]: a rank lost without restarts → non-zero exit naming the rank, no hang."""
    run = _torchrun(tmp_path, "lost", 0, faulty=True)
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "rank: 1" in out and "exitcode: 3" in out
