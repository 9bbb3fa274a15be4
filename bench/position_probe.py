"""What do an image tower's patch tokens say about the object under them? A linear probe.

For each object of the built-in `shapes` scenes, take the token of the patch its centre falls in
(from layer `--layer` of the tower's hidden states; 0 is the embedding output) and fit a logistic
regression for the patch's column and row and the object's colour and shape on 400 training
scenes; print the accuracy on 400 validation scenes as JSON. The tower is a contrastive run's
(e.g. runs/vlm-shapes-vision) or a vlm-sft run's (its LLaVA's vision tower).

A tower whose position embeddings start as transformers' noise (std 0.02) and one started as a
2-D sine/cosine grid (`model.vision_pos_init=sincos2d`), each trained by
configs/vlm-shapes-vision.yaml, gave column 0.38 against 1.00 at layer -2 (README, Presets):

    python bench/position_probe.py runs/vlm-shapes-vision [--layer -2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def tower(run: str):
    """(vision tower, image processor) of a contrastive run or a vlm-sft run."""
    from mmtune.models.vlm import run_image_tower
    from mmtune.runs import open_run, run_config

    if run_config(Path(run)).task == "vlm-sft":
        task, model = open_run(run)
        return model.model.vision_tower, task.processor.image_processor
    _, vision, processor = run_image_tower(run)
    return vision, processor


@torch.no_grad()
def features(vision, processor, arrays: dict, scenes: int, layer: int):
    """(objects × width features, {label: objects}) for the first `scenes` scenes."""
    from mmtune.data.builtin import shapes

    images = list(arrays["images"][:scenes])
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    size = pixels.shape[-1]
    config = vision.config
    grid = size // config.patch_size
    tokens = vision(pixels, output_hidden_states=True).hidden_states[layer]
    tokens = tokens[:, tokens.shape[1] - grid * grid :]  # patch tokens (after a class token, if any)
    centres = arrays["centres"][:scenes] * size / shapes.IMAGE_SIZE  # (scenes, 6, 2) as (x, y) pixels
    cols = np.clip((centres[..., 0] // config.patch_size).astype(int), 0, grid - 1)
    rows = np.clip((centres[..., 1] // config.patch_size).astype(int), 0, grid - 1)
    index = torch.as_tensor(rows * grid + cols)
    x = torch.stack([tokens[s, index[s]] for s in range(scenes)]).flatten(0, 1).float().numpy()
    labels = {
        "column": cols.ravel(),
        "row": rows.ravel(),
        "colour": np.tile(np.arange(len(shapes.COLORS)), scenes),
        "shape": arrays["shapes"][:scenes].ravel(),
    }
    return x, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--layer", type=int, default=-2)
    p.add_argument("--scenes", type=int, default=400)
    a = p.parse_args()

    from sklearn.linear_model import LogisticRegression

    from mmtune.data.builtin import shapes

    arrays = shapes.load_arrays("shapes")
    vision, processor = tower(a.run)
    vision.eval()
    fit_x, fit_y = features(vision, processor, arrays["train"], a.scenes, a.layer)
    val_x, val_y = features(vision, processor, arrays["val"], a.scenes, a.layer)
    out = {"run": a.run, "layer": a.layer, "objects": {"train": len(fit_x), "val": len(val_x)}}
    for name in fit_y:
        probe = LogisticRegression(max_iter=3000).fit(fit_x, fit_y[name])
        out[f"val.{name}"] = round(float(probe.score(val_x, val_y[name])), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
