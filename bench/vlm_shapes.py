"""`make vlm-shapes`' last step: each stage's training seconds into runs/vlm-shapes/metrics.json.

The LLaVA's figures come from `mmtune train -c configs/vlm-shapes.yaml`; this adds the seconds its
parts took to train (the vision run's `train.seconds`, the scene LM's `seconds`, the projector
alignment's — configs/vlm-shapes-stage1.yaml — `train.seconds`) and the total, so
the file answers "how long did the whole demo train" on its own.

    python bench/vlm_shapes.py [--runs runs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs", help="the runs folder of make vlm-shapes")
    runs = Path(p.parse_args().runs)
    out = runs / "vlm-shapes" / "metrics.json"
    m = json.loads(out.read_text())
    vision = json.loads((runs / "vlm-shapes-vision" / "metrics.json").read_text())["train.seconds"]
    language = json.loads((runs / "vlm-shapes-parts" / "lm" / "train.json").read_text())["seconds"]
    stage1 = json.loads((runs / "vlm-shapes-stage1" / "metrics.json").read_text())
    m["parts.vision.train_seconds"] = vision
    m["parts.language.train_seconds"] = language
    m["parts.stage1.train_seconds"] = stage1["train.seconds"]
    m["parts.stage1.caption.bleu4"] = stage1.get("caption.bleu4")  # on val: stage 1 evaluates there
    m["train.total_seconds"] = round(vision + language + stage1["train.seconds"] + m["train.seconds"], 1)
    out.write_text(json.dumps(m, indent=2))
    keys = ["vqa.nonrel.acc", "vqa.rel.acc", "caption.bleu4", "model.trainable_params", "train.total_seconds"]
    print(json.dumps({k: m.get(k) for k in keys}, indent=2))


if __name__ == "__main__":
    main()
