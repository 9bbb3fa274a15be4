"""Multimodal LLMs: any transformers image-text-to-text model, or a LLaVA composed from parts.

`load_vlm(name)` reads a local `AutoModelForImageTextToText` folder (+ `AutoProcessor`), or builds
the `tiny-llava` preset (random weights, MiniLM's word-piece vocabulary); `compose_llava(vision,
language)` joins a CLIP/SigLIP vision checkpoint and a causal LM with a 2-layer GELU projector into
a plain `LlavaForConditionalGeneration` whose processor has an `<image>` token and a chat template.
`parts(model)` groups parameters into vision / projector / language for freezing and learning rates.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmtune.errors import ConfigError

# USER/ASSISTANT turns as in LLaVA-1.5; an assistant turn ends with the end-of-sequence token.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}ASSISTANT: {% elif m['role'] == 'user' %}USER: {% else %}SYSTEM: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Prefix-LM layout (PaliGemma, which ships no chat template): the first turn's images, <bos>, the
# prompt and a newline form the prefix; each reply ends with the end-of-sequence token.
PREFIX_LM_TEMPLATE = (
    "{% for m in messages %}{% set parts = [{'type': 'text', 'text': m['content']}] "
    "if m['content'] is string else m['content'] %}"
    "{% if m['role'] == 'assistant' %}{% for p in parts %}{{ p['text'] }}{% endfor %}{{ eos_token }}"
    "{% else %}{% if loop.first %}{% for p in parts if p['type'] == 'image' %}<image>{% endfor %}{{ bos_token }}"
    "{% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}"
    "{% else %}{% for p in parts %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endif %}{% endfor %}"
)
PRESETS = ("tiny-llava",)
# processors that wrap any text in their own prefix layout (<bos> after the images, a newline at
# the end): conversations are tokenised around them, and token type ids mark the prefix (0)
PREFIX_LM_PROCESSORS = ("PaliGemmaProcessor",)


def is_prefix_lm(processor) -> bool:
    """Whether the model attends bidirectionally over a prefix marked by token type ids 0 (PaliGemma)."""
    return type(processor).__name__ in PREFIX_LM_PROCESSORS


# processors whose video half needs torchvision (Qwen2-VL, Qwen2.5-VL): without it, mmtune builds
# them for images alone (the PIL image processor, no video processor) and saves them as the full one
VIDEO_PROCESSORS = {"Qwen2VLProcessor": "Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor"}


def has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def image_only_processor(base_name: str, image_processor, tokenizer, chat_template: str | None = None):
    """A `base_name` processor (Qwen2-VL's, Qwen2.5-VL's) for images alone, where its video processor
    cannot be built (no torchvision): the family's own `__call__` and image-token expansion, and a
    `save_pretrained` that writes the full processor's layout (`processor_class` = `base_name`, a
    `video_processor` entry with the image settings), so a machine with torchvision loads the folder
    with plain `AutoProcessor`."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    base = getattr(transformers, base_name)

    class ImageOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def to_dict(self):
            out = super().to_dict()
            out["processor_class"] = base_name
            images = {k: v for k, v in out.get("image_processor", {}).items() if k != "image_processor_type"}
            out.setdefault("video_processor", {**images, "video_processor_type": VIDEO_PROCESSORS[base_name]})
            return out

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{base_name}"
    return ImageOnly(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _processor_class(folder: Path) -> str | None:
    import json

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = Path(folder) / name
        if f.is_file():
            found = json.loads(f.read_text()).get("processor_class")
            if found:
                return found
    return None


def load_vlm_processor(folder):
    """`AutoProcessor.from_pretrained(folder)`; a Qwen2-VL-family folder on a machine without
    torchvision: its processor for images alone (`image_only_processor`)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    name = _processor_class(folder)
    if name not in VIDEO_PROCESSORS or has_torchvision():
        return AutoProcessor.from_pretrained(folder)
    template = Path(folder) / "chat_template.jinja"
    return image_only_processor(
        name,
        AutoImageProcessor.from_pretrained(folder, backend="pil"),
        AutoTokenizer.from_pretrained(folder),
        template.read_text() if template.is_file() else None,
    )


def _tokenizer_with_image(tok):
    """The tokenizer with `<image>` (special) and a pad token, and a chat template if it has none."""
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _llava_processor(tok, image_processor, patch_size: int, vision_type: str):
    from transformers import LlavaProcessor

    with_cls = vision_type.startswith("clip")  # SigLIP has no [CLS] token to drop
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default" if with_cls else "full",
        num_additional_image_tokens=1 if with_cls else 0,
        chat_template=tok.chat_template,
    )


def _llava_config(vision_config, text_config, tok, feature_layer: int = -2):
    from transformers import LlavaConfig

    with_cls = vision_config.model_type.startswith("clip")
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default" if with_cls else "full",
        image_seq_length=patches,
    )


def tiny_llava():
    """(model, processor): a random LLaVA small enough for tests (MiniLM's word pieces)."""
    from transformers import (
        BertTokenizerFast,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaForConditionalGeneration,
    )

    from mmtune.models.load import minilm_dir

    tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
    tok.eos_token, tok.bos_token = tok.sep_token, tok.cls_token
    tok = _tokenizer_with_image(tok)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        tie_word_embeddings=False,
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model = LlavaForConditionalGeneration(_llava_config(vision, text, tok))
    return model, _llava_processor(tok, images, 8, "clip_vision_model")


def compose_llava(vision: str, language: str, projector: str = "mlp2x_gelu", feature_layer: int = -2):
    """(LLaVA, processor) from a CLIP/SigLIP vision checkpoint and a causal-LM checkpoint; the
    projector reads the tower's hidden states of `feature_layer` (-2: LLaVA's penultimate layer)."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaForConditionalGeneration,
    )

    if projector != "mlp2x_gelu":
        raise ConfigError(f"options.projector: only mlp2x_gelu is built, not {projector!r}")
    run_tower = run_image_tower(vision)
    if run_tower is not None:
        vconf, source, image_processor = run_tower
    else:
        vconf = AutoConfig.from_pretrained(vision)
        vconf = getattr(vconf, "vision_config", vconf)  # a whole CLIP/SigLIP: its image side
        if not vconf.model_type.startswith(("clip", "siglip")):
            raise ConfigError(f"options.vision: {vision} is a {vconf.model_type}, not a CLIP/SigLIP checkpoint")
        source, image_processor = AutoModel.from_pretrained(vision), AutoImageProcessor.from_pretrained(vision)
    tok = _tokenizer_with_image(AutoTokenizer.from_pretrained(language))
    lm = AutoModelForCausalLM.from_pretrained(language)
    layers = vconf.num_hidden_layers
    if not -layers <= feature_layer <= layers or feature_layer == 0:
        raise ConfigError(
            f"options.vision_feature_layer: {feature_layer} is not a layer of the {layers}-layer vision tower "
            f"(1 … {layers}, or -1 … -{layers} counted from the last)"
        )
    model = LlavaForConditionalGeneration(_llava_config(vconf, lm.config, tok, feature_layer))
    source = getattr(source, "vision_model", source)  # a whole CLIP/SigLIP: its image side
    model.model.vision_tower.load_state_dict(source.state_dict())
    model.model.language_model.load_state_dict(lm.get_decoder().state_dict())
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    if len(tok) != model.get_input_embeddings().num_embeddings:  # <image> (and pad) were added
        model.resize_token_embeddings(len(tok))
    processor = _llava_processor(tok, image_processor, vconf.patch_size, vconf.model_type)
    return model, processor


def run_image_tower(path: str):
    """(vision config, vision tower, image processor) of an mmtune run's CLIP-family image tower
    (e.g. a `tiny-clip` contrastive run); None when `path` is not an mmtune run or checkpoint."""
    from mmtune.errors import CheckpointError
    from mmtune.export import clip_image_processor
    from mmtune.models.dual import HFDualEncoder
    from mmtune.runs import load_run, resolve_checkpoint

    try:
        resolve_checkpoint(path)
    except CheckpointError:
        return None
    model, processor = load_run(path)
    hf = getattr(model, "hf", None) if isinstance(model, HFDualEncoder) else None
    vconf = getattr(getattr(hf, "config", None), "vision_config", None)
    if vconf is None or not vconf.model_type.startswith(("clip", "siglip")):
        raise ConfigError(
            f"options.vision: {path} is an mmtune run whose image tower is not a CLIP/SigLIP one "
            f"({type(model).__name__}); a LLaVA takes e.g. a tiny-clip run's tower"
        )
    return vconf, hf.vision_model, clip_image_processor(processor)


def load_vlm(name: str):
    """(model, processor) of the `tiny-llava` preset or a local image-text-to-text folder."""
    from transformers import AutoModelForImageTextToText

    if name == "tiny-llava":
        return tiny_llava()
    if not Path(name).is_dir():
        raise ConfigError(f"model.name: {name!r} is neither a preset {PRESETS} nor a local model folder")
    processor = load_vlm_processor(name)
    if not processor.chat_template:
        if not is_prefix_lm(processor):
            raise ConfigError(f"model.name: {name} has no chat template (chat_template.jinja) to render conversations")
        processor.chat_template = PREFIX_LM_TEMPLATE
    return AutoModelForImageTextToText.from_pretrained(name), processor


def save_vlm(model: nn.Module, processor, folder: Path) -> None:
    """The transformers config and processor (no weights): what `rebuild_vlm` needs."""
    model.config.save_pretrained(folder)
    processor.save_pretrained(folder)


def rebuild_vlm(folder: Path):
    """(model with random weights, processor) from a folder written by `save_vlm`."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
    return model, load_vlm_processor(folder)


def parts(model: nn.Module) -> dict[str, str]:
    """{parameter name: "vision" | "projector" | "language"} (the LM head counts as language)."""
    inner = getattr(model, "model", model)
    vision = (
        getattr(inner, "vision_tower", None) or getattr(inner, "visual", None) or getattr(inner, "vision_model", None)
    )
    projector = getattr(inner, "multi_modal_projector", None) or getattr(inner, "connector", None)
    projector = projector or getattr(vision, "merger", None)  # Qwen2-VL keeps it in the vision side
    group = {}
    for part, module in (("projector", projector), ("vision", vision)):
        for p in module.parameters() if module is not None else ():
            group.setdefault(id(p), part)
    return {n: group.get(id(p), "language") for n, p in model.named_parameters()}


def language_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)
    if lm is None:
        raise ConfigError(f"{type(model).__name__}: no language model found for LoRA")
    return lm


def set_trainable(model: nn.Module, frozen: dict[str, bool]) -> None:
    """Freeze by part (`frozen["vision"]` …); with LoRA adapters only they train in the language side."""
    lora = any("lora_" in n for n, _ in model.named_parameters())
    for (name, p), part in zip(model.named_parameters(), parts(model).values(), strict=True):
        if lora and part == "language":
            p.requires_grad = "lora_" in name
        else:
            p.requires_grad = not frozen[part]


@torch.no_grad()
def generate_batch(model: nn.Module, processor, inputs: dict, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation ids of each left-padded prompt of a batch (up to its end of sequence)."""
    n = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {processor.tokenizer.eos_token_id}
    rows = []
    for row in out[:, n:].tolist():
        end = next((k for k, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


@torch.no_grad()
def chat_reply(
    model: nn.Module,
    processor,
    inputs: dict,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    max_time: float | None = None,
) -> tuple[list[int], str]:
    """(continuation ids, "stop" | "length") of one encoded prompt: greedy at temperature 0, else
    sampled from the whole softened distribution with `seed` (the global generator is left as it
    was); `max_time` seconds stop it early ("length")."""
    n = inputs["input_ids"].shape[1]
    if temperature > 0:
        how = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    else:
        how = {"do_sample": False}
    device = inputs["input_ids"].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            num_beams=1,
            max_time=max_time,
            pad_token_id=processor.tokenizer.pad_token_id,
            **how,
        )
    ids = out[0, n:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {processor.tokenizer.eos_token_id}
    return ids, "stop" if ids and ids[-1] in eos else "length"
