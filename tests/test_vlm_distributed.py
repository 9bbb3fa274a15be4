"""vlm-sft under `torchrun` with 2 gloo processes: the engine's `TrainStep` wrapped in DDP, each rank
on its half of a global batch, gives the single-process loss and gradients on the whole batch.

The loss is the mean over learnt tokens; the ranks' means average to the global mean when each
rank learns as many tokens, as here (one-word replies of one word piece each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtune.config import Config
from mmtune.data.conversations import ConversationRecord
from mmtune.tasks import Context, get_task
from tests.test_distributed import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
COLOURS = ["red", "blue", "green", "pink"]
WORKER = "import sys\nfrom tests.test_vlm_distributed import rank_main\nrank_main(sys.argv[1])\n"


def setup():
    """(task, model, encoded global batch items): tiny-llava, projector + LM trained, seeded."""
    cfg = Config(task="vlm-sft", model={"name": "tiny-llava"}, options={"max_length": 128})
    task = get_task("vlm-sft")(Context(cfg))
    torch.manual_seed(0)
    model = task.build()
    items = []
    for i, colour in enumerate(COLOURS):
        px = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        turns = [{"role": "user", "content": "<image>\nwhat colour"}, {"role": "assistant", "content": colour}]
        items.append(task.encoder.encode(ConversationRecord(image=px, id=str(i), messages=turns, images=[px])))
    return task, model, items


def rank_main(out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mmtune.tasks.base import TrainStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    task, model, items = setup()
    step = DDP(TrainStep(task, model))
    share = len(items) // WORLD
    local = step(task.collate(items[rank * share : (rank + 1) * share]))["loss"]
    local.backward()
    mean = local.detach().clone()
    dist.all_reduce(mean)
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"loss": mean / WORLD, "local": local.detach(), "grads": grads}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_two_torchrun_processes_give_the_full_batch_loss_and_gradients(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD)]
    cmd += ["--master-port", str(free_port()), str(script), str(tmp_path / "ranks.pt")]
    path = os.pathsep.join([str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "MMTUNE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "ranks.pt")
    task, model, items = setup()
    whole = task.loss(model, task.collate(items))["loss"]
    whole.backward()
    torch.testing.assert_close(got["loss"], whole.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got["local"], whole.detach()), "a rank's own half is not the whole batch"
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(got["grads"]) == set(trained) and len(trained) > 10
    for name, grad in trained.items():
        torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
