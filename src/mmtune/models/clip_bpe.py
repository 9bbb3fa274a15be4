"""CLIP's byte-level BPE tokenizer as a transformers `CLIPTokenizer`, built offline.

open_clip tokenizes with OpenAI CLIP's BPE, whose merges ship inside the open_clip package as
`bpe_simple_vocab_16e6.txt.gz` (nothing to download). The vocabulary is derived from the merges
the way CLIP defines it: the 256 byte symbols, the same with the end-of-word marker `</w>`, one
token per merge (the first 48,894), then `<|startoftext|>` and `<|endoftext|>` — 49,408 ids.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from mmtune.errors import CheckpointError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49,408 = 2·256 byte symbols + merges + 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The printable character GPT-2/CLIP byte-level BPE uses for each byte 0…255, in id order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # bytes without a printable glyph of their own get one past 255, in byte order
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [mapping[b] for b in printable + others]


def find_bpe_file() -> Path:
    """open_clip's merges file, located without importing open_clip (its package needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / BPE_FILE).is_file():
            return Path(folder) / BPE_FILE
    raise CheckpointError(
        f"the CLIP tokenizer is built from open_clip's {BPE_FILE}: install it with "
        "`pip install open-clip-torch --no-deps`, or put tokenizer files beside the checkpoint"
    )


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """The first N_MERGES merge pairs of a CLIP merges file (its first line is a header)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable BPE merges ({e})") from None
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{path}: not CLIP's BPE merges ({len(merges)} merge lines)")
    return merges


def clip_tokenizer(context_length: int = 77, bpe_file: str | Path | None = None):
    """A transformers CLIPTokenizer equal to open_clip's default tokenizer (ids 0…49407)."""
    from transformers import CLIPTokenizer

    merges = read_merges(bpe_file or find_bpe_file())
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)
