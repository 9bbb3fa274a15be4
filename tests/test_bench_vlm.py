"""bench/bench_vlm.py (`make bench-vlm`) end to end at tiny settings: mmtune's vlm-sft beside TRL's
SFTTrainer, LoRA vs full memory, padding per batch — the JSON it writes has every figure, sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is the baseline of bench/bench_vlm.py: pip install -e '.[bench]'")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_vlm_writes_its_figures(tmp_path):
    """Tried: 3 steps of batch 4 on shapes-mini, one round; every ratio positive, both sides
    counted the same tokens (one epoch of the same samples), padding shares in [0, 1]."""
    out = tmp_path / "vlm.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_vlm.py"), "--out", str(out), "--dataset", "shapes-mini"]
    cmd += ["--batch", "4", "--steps", "3", "--warmup", "1", "--rounds", "1", "--max-length", "64", "--lora-r", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MMTUNE_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["throughput_ratio"] > 0 and len(r["throughput_ratios"]) == 1
    assert r["mmtune_tokens_per_s"] > 0 and r["trl_tokens_per_s"] > 0
    assert r["throughput_ratio"] == pytest.approx(r["mmtune_tokens_per_s"] / r["trl_tokens_per_s"])
    # the same samples through both collators: the same non-padding tokens over the timed steps
    assert r["mmtune_tokens_per_round"] == r["trl_tokens_per_round"]
    assert r["mmtune_tokens_per_round"][0] > 2 * 4 * 16  # 2 timed steps × 4 samples × 16 image tokens, at least
    assert 0 <= r["padding_share"] <= r["padding_share_max"] <= 1
    assert r["padding_share"] < r["padding_share_if_padded_to_max_length"] <= 1
    mem = r["memory"]
    assert (
        mem["lora"]["trainable_params"] < mem["full"]["trainable_params"] < mem["full_with_vision"]["trainable_params"]
    )
    assert 0 < r["memory_ratio_lora_vs_full"] < 1  # adapters: no gradients or moments for the language model
    # activations are alike on both sides: LoRA's share of the whole peak is nearer 1 than of the states
    assert 0 < r["state_memory_ratio_lora_vs_full"] < r["memory_ratio_lora_vs_full"]
    assert r["memory_ratio_lora_vs_full"] == pytest.approx(mem["lora"]["peak_bytes"] / mem["full"]["peak_bytes"])
