"""Video captioning: frame positions and masked padding frames in the decoder's memory, and the
shipped configs/video-caption-shapes.yaml trained (2 steps, mini clips), reloaded and scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmtune.models.fusion.decoders import TextDecoder

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("av")


def _decoder() -> tuple[TextDecoder, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    dec = TextDecoder(list(range(20)), memory_dim=8, dim=16, layers=1, heads=2, max_len=8, frames=4).eval()
    return dec, torch.randint(0, 20, (2, 5)), torch.randn(2, 4, 3, 8)  # ids, tokens (B, T, N, D)


def test_padding_frames_do_not_change_the_caption_logits():
    """Clip 0 has 2 frames of 4: whatever its padding frames hold, its logits stay the same."""
    dec, ids, tokens = _decoder()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mem, mem_mask = dec.frame_memory(tokens, mask)
    assert mem.shape == (2, 12, 8) and mem_mask.tolist()[0] == [True] * 6 + [False] * 6
    other = tokens.clone()
    other[0, 2:] = torch.randn(2, 3, 8) * 10
    with torch.no_grad():
        a = dec(ids, mem, mem_mask)
        b = dec(ids, *dec.frame_memory(other, mask))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert not torch.allclose(a[1], dec(ids, *dec.frame_memory(other * 0 + 1, mask))[1])


def test_the_order_of_the_frames_reaches_the_decoder():
    """The same frames reversed give other logits (without frame positions a cross-attention over
    the pooled tokens could not tell a shape moving left from one moving right)."""
    dec, ids, tokens = _decoder()
    mask = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        fwd = dec(ids, *dec.frame_memory(tokens, mask))
        rev = dec(ids, *dec.frame_memory(tokens.flip(1), mask))
        dec.frame_pos.zero_()
        fwd0 = dec(ids, *dec.frame_memory(tokens, mask))
        rev0 = dec(ids, *dec.frame_memory(tokens.flip(1), mask))
    assert (fwd - rev).abs().max() > 1e-3
    torch.testing.assert_close(fwd0, rev0, rtol=0, atol=1e-5)  # order enters only through the positions


def test_more_frames_than_the_decoder_has_positions_is_an_error():
    dec, _, tokens = _decoder()
    with pytest.raises(ValueError, match="4 this decoder has positions for"):
        dec.frame_memory(torch.cat([tokens, tokens], 1), torch.ones(2, 8, dtype=torch.bool))


def test_the_shipped_video_caption_config_trains_reloads_and_scores(tmp_path):
    """configs/video-caption-shapes.yaml as `make video-caption-shapes` runs it (2 steps, mini
    clips); the run reopened from its folder scores the test clips exactly as it reported."""
    from mmtune.cli import main
    from mmtune.data import load_splits
    from mmtune.runs import open_run, run_config

    config = ROOT / "configs" / "video-caption-shapes.yaml"
    args = ["train", "-c", str(config), f"output_dir={tmp_path}", "data.dataset=shapes-video-mini"]
    args += ["data.batch_size=16", "train.max_steps=2", "train.progress=false", "data.eval_batch_size=24"]
    assert main(args) == 0
    run = tmp_path / "video-caption-shapes"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"caption.bleu4", "caption.cider", "caption.rouge_l"} <= set(metrics)
    assert metrics["data.test"] == 24
    cfg = run_config(run)
    task, model = open_run(run, cfg)
    again = task.evaluate(model.eval(), load_splits(cfg.data).test).metrics
    assert again["caption.bleu4"] == pytest.approx(metrics["caption.bleu4"], abs=1e-9)
    assert model.head["caption"].frames == cfg.data.frames == 4
