"""Tiny random image-text-to-text models of several families, saved as plain transformers folders.

Each builder writes a folder that `AutoModelForImageTextToText.from_pretrained` and
`AutoProcessor.from_pretrained` load: random weights, MiniLM's word-piece vocabulary plus the
family's special tokens (built offline), an image processor with tiny sizes and a chat template in
the family's own layout. `vlm-sft` then trains it with `model.name=<folder>`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmtune.models.load import minilm_dir

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}

IDEFICS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %} {{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %} {{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<start_of_image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(special: list[str], eos: str | None = None, **named):
    """MiniLM's word pieces + the family's special tokens (eos: one of them, or [SEP]); `named`:
    special tokens the processor reads as tokenizer attributes (Gemma 3's `boi_token`…)."""
    from transformers import BertTokenizerFast

    # per-token outputs are the processor's (token type ids mean image or prefix tokens there)
    tok = BertTokenizerFast.from_pretrained(
        str(minilm_dir()), model_input_names=["input_ids", "attention_mask"], extra_special_tokens=named
    )
    tok.add_special_tokens({"additional_special_tokens": special})
    tok.eos_token = eos or tok.sep_token
    tok.bos_token = tok.cls_token
    return tok


def _llama(tok, **kw) -> dict:
    return {
        **SMALL,
        "vocab_size": len(tok),
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
        **kw,
    }


def idefics3(folder: Path) -> Path:
    """Idefics3: a 32 px image splits into 2×2 crops of 16 px + the whole image, 4 tokens each."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    special = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid]
    tok = _tokenizer(special, eos="<end_of_utterance>")
    vision = {**SMALL, "image_size": 16, "patch_size": 4}
    config = Idefics3Config(
        text_config={"model_type": "llama", **_llama(tok)},
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )
    images = Idefics3ImageProcessor(
        do_image_splitting=True, size={"longest_edge": 32}, max_image_size={"longest_edge": 16}
    )
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS_TEMPLATE
    )
    return _save(Idefics3ForConditionalGeneration(config), processor, folder)


def paligemma(folder: Path) -> Path:
    """PaliGemma: SigLIP 32 px / 8 px patches → 16 image tokens; a Gemma prefix-LM (no chat
    template of its own: mmtune's prefix/suffix template is saved with it)."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    from mmtune.models.vlm import PREFIX_LM_TEMPLATE

    tok = _tokenizer(["<image>"])
    images = SiglipImageProcessor(size={"height": 32, "width": 32})
    images.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok, chat_template=PREFIX_LM_TEMPLATE)
    tok = processor.tokenizer  # the processor added its location and segmentation tokens
    text = {"model_type": "gemma", **_llama(tok, head_dim=8, tie_word_embeddings=True)}
    config = PaliGemmaConfig(
        text_config=text,
        vision_config={"model_type": "siglip_vision_model", **SMALL, "image_size": 32, "patch_size": 8},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projection_dim=32,
        hidden_size=32,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
    )
    return _save(PaliGemmaForConditionalGeneration(config), processor, folder)


def llava(folder: Path) -> Path:
    """The `tiny-llava` preset (CLIP 32 px / 8 px patches → 16 image tokens) as a folder."""
    from mmtune.models.vlm import tiny_llava

    return _save(*tiny_llava(), folder)


def gemma3(folder: Path) -> Path:
    """Gemma 3: SigLIP 32 px / 8 px patches pooled 2×2 → 4 soft tokens between <start_of_image> and
    <end_of_image>; token type ids mark them (attended bidirectionally)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(["<start_of_turn>", "<end_of_turn>"], eos="<end_of_turn>", **named)
    text = _llama(tok, head_dim=8, sliding_window=64, tie_word_embeddings=True)
    config = Gemma3Config(
        text_config=text,
        vision_config={**SMALL, "image_size": 32, "patch_size": 8},
        mm_tokens_per_image=4,
        boi_token_id=tok.boi_token_id,
        eoi_token_id=tok.eoi_token_id,
        image_token_id=tok.image_token_id,
    )
    images = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=GEMMA_TEMPLATE, image_seq_length=4)
    return _save(Gemma3ForConditionalGeneration(config), processor, folder)


def qwen2_5_vl(folder: Path) -> Path:
    """Qwen2.5-VL: Qwen2-VL's processor and M-RoPE, a windowed-attention vision tower (SwiGLU MLPs,
    RMSNorm) whose merger projects to the LM's width."""
    return qwen2_vl(folder, version="2.5")


def qwen2_vl(folder: Path, version: str = "2") -> Path:
    """Qwen2-VL: dynamic resolution (each image resized to a multiple of 16 px within 256–1,024
    pixels, 8 px patches merged 2×2: a 32 px image → 4 tokens), every image's patches flattened into
    one tensor beside its (t, h, w) grid, M-RoPE positions, a ChatML template. Without torchvision
    its processor is mmtune's image-only one (the PIL image processor, no video processor)."""
    import transformers

    from mmtune.models.vlm import has_torchvision, image_only_processor

    family = "Qwen2VL" if version == "2" else "Qwen2_5_VL"

    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    tok = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", **named)
    sizes = {"min_pixels": 16 * 16, "max_pixels": 32 * 32, "patch_size": 8, "merge_size": 2, "temporal_patch_size": 2}
    if has_torchvision():
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        processor = getattr(transformers, f"{family}Processor")(
            image_processor=Qwen2VLImageProcessor(**sizes),
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(**sizes),
            chat_template=CHATML_TEMPLATE,
        )
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        images = Qwen2VLImageProcessorPil(**sizes)
        processor = image_only_processor(f"{family}Processor", images, tok, CHATML_TEMPLATE)
    text = {**_llama(tok), "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}}
    vision = {"depth": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 8, "spatial_merge_size": 2}
    if version == "2":
        vision |= {"embed_dim": 32, "mlp_ratio": 2}
    else:  # windows of 16 px (one merged token), the last block attending to the whole image
        vision |= {"intermediate_size": 64, "out_hidden_size": 32, "window_size": 16, "fullatt_block_indexes": [1]}
    config = getattr(transformers, f"{family}Config")(
        text_config=text,
        vision_config={**vision, "temporal_patch_size": 2},
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
    )
    return _save(getattr(transformers, f"{family}ForConditionalGeneration")(config), processor, folder)


def _save(model, processor, folder: Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


FAMILIES = {
    "llava": llava,
    "idefics3": idefics3,
    "paligemma": paligemma,
    "gemma3": gemma3,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
}


def build(family: str, folder: Path, seed: int = 0) -> Path:
    """Write the tiny `family` model (random weights drawn from `seed`) into `folder`."""
    torch.manual_seed(seed)
    return FAMILIES[family](folder)
