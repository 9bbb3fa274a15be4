"""Video captioning: the caption decoder cross-attending to the patch tokens of a clip's sampled
frames, each frame's tokens marked with a learnt frame position (so the order of the frames, and
with it the motion, is in the memory); padding frames are masked out. Trained and decoded as
the caption task; scored with the same BLEU/ROUGE-L/CIDEr-D. Data: video records with captions
(pairs files or MSR-VTT JSON of video files, the built-in `shapes-video`), frames sampled as in
video-contrastive (`data.frames`, `data.frame_pool`, training jitter)."""

from __future__ import annotations

import numpy as np
import torch

from mmtune.data.video import FrameCache, clip_dataset
from mmtune.errors import ConfigError
from mmtune.tasks.base import Task
from mmtune.tasks.caption import CaptionTask


class VideoCaptionTask(CaptionTask):
    """Describe a video clip in words."""

    name = "video-caption"
    routes = ()

    def __init__(self, ctx):
        super().__init__(ctx)
        self.cache = FrameCache(self.cfg.data.video_cache_mb * 2**20)  # shared by the splits' datasets

    def head_spec(self, texts: list[str]) -> dict:
        return {**super().head_spec(texts), "frames": self.cfg.data.frames}

    def load(self, folder):
        model = super().load(folder)
        frames = model.head["caption"].frames
        if self.cfg.data.frames > frames:
            raise ConfigError(
                f"data.frames={self.cfg.data.frames}: this model's caption decoder has frame positions for "
                f"{frames} frames (set data.frames to at most {frames})"
            )
        return model

    def count(self, records) -> int:
        return len(records)

    def dataset(self, records, train: bool):
        return clip_dataset(self.cfg, self.processor, [r for r in records if r.captions], train, self.cache)

    def collate(self, items):
        items = [it for it in items if it is not None]
        if not items:
            return {}
        return {
            "pixel_values": torch.from_numpy(np.stack([it["pixel_values"] for it in items])),
            "frame_mask": torch.from_numpy(np.stack([it["frame_mask"] for it in items])),
            **self.targets(items),
        }

    def memory(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch tokens of every frame (B·T frames through the image tower) with frame
        positions → memory (B, T·N, H) and its mask (padding frames out)."""
        px = batch["pixel_values"].to(self.ctx.device)
        b, t = px.shape[:2]
        tokens = model.image_tokens(px.flatten(0, 1))
        tokens = tokens.view(b, t, *tokens.shape[1:])
        return model.head["caption"].frame_memory(tokens, batch["frame_mask"].to(self.ctx.device))

    # captions of clips come from `evaluate` (and `describe`); `mmtune predict` and the server's
    # predict route take images, so this task makes no predictions there
    predict = Task.predict
    predict_inputs = Task.predict_inputs
    format_prediction = Task.format_prediction
