"""open_clip → transformers at full depth: embedding differences and a lossless round trip.

    .venv/bin/python bench/bench_openclip_full.py [ViT-B-32 ViT-B-16-quickgelu ViT-L-14 …]

tests/test_openclip.py checks each config cut to 2 blocks per tower; this builds the shipped
configs at their full depth (random weights, open_clip 3.3.0's own model code), converts them,
compares image and text embeddings with open_clip's forward pass, writes them back in open_clip's
layout and checks open_clip's state dict comes back bit for bit. Prints one line per config.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

TEXTS = ["a photo of a cat", "Hello, World!! it's 3.14", "naïve café 🙂", "x"]


def check(name: str, work: Path) -> str:
    """One config: build, save, convert, compare, write back; a line of figures."""
    from tests.openclip_ref import (
        load_open_clip_ref,
        open_clip_modules,
        save_open_clip,
        shipped_config,
    )

    from mmtune.models.dual import HFDualEncoder
    from mmtune.models.openclip import load_open_clip, write_open_clip

    _, tok = open_clip_modules()
    cfg = shipped_config(name, max_layers=None)
    ref = save_open_clip(cfg, work / "oc")
    start = time.perf_counter()
    hf, proc = load_open_clip(work / "oc")
    seconds = time.perf_counter() - start
    model = HFDualEncoder(hf)
    px = torch.randn(2, 3, proc.image_size, proc.image_size, generator=torch.Generator().manual_seed(0))
    ids = tok.SimpleTokenizer(context_length=proc.max_length)(TEXTS)
    with torch.no_grad():
        d_img = (F.normalize(ref.encode_image(px), dim=-1) - model.encode_image(px)).abs().max()
        d_txt = (F.normalize(ref.encode_text(ids), dim=-1) - model.encode_text(**proc.tokenize(TEXTS))).abs().max()
    (work / "back").mkdir()
    write_open_clip(hf, proc, work / "back")
    back = load_open_clip_ref(work / "back").state_dict()
    same = all(torch.equal(v, back[k]) for k, v in ref.state_dict().items())
    params = sum(p.numel() for p in hf.parameters()) / 1e6
    return (
        f"{name}: {params:.1f}M parameters; max |Δ| image {float(d_img):.1e}, text "
        f"{float(d_txt):.1e}; logit scale equal {bool(ref.logit_scale == hf.logit_scale)}; "
        f"round trip bit-exact {same}; convert {seconds:.1f} s"
    )


def main(names: list[str]) -> None:
    for name in names or ["ViT-B-32", "ViT-B-16-quickgelu", "ViT-L-14"]:
        work = Path(tempfile.mkdtemp(prefix="openclip-"))
        try:
            print(check(name, work), flush=True)
        finally:
            shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1:])
