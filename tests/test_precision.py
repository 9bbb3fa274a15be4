"""bf16 requests run in fp32 where the CPU has no native bf16 matmul (and say so)."""

import logging

from mmtune import precision


def test_bf16_kept_only_where_native(monkeypatch, caplog):
    monkeypatch.delenv("MMTUNE_FORCE_BF16", raising=False)
    precision._warned.clear()
    with caplog.at_level(logging.WARNING, logger="mmtune"):
        got = precision.effective_precision("bf16", "cpu")
    if precision.native_bf16("cpu"):
        assert got == "bf16" and not caplog.records
    else:
        assert got == "fp32"
        assert "no native bf16" in caplog.text and "MMTUNE_FORCE_BF16" in caplog.text
    assert precision.effective_precision("fp32", "cpu") == "fp32"


def test_force_keeps_bf16(monkeypatch):
    monkeypatch.setenv("MMTUNE_FORCE_BF16", "1")
    assert precision.effective_precision("bf16", "cpu") == "bf16"
