"""Supervised fine-tuning of multimodal LLMs (LLaVA and other image-text-to-text models).

The model: a local transformers folder, an earlier vlm-sft run or the `tiny-llava` preset
(`model.name`), or a LLaVA composed from `options.vision` + `options.language`. The data:
conversations (LLaVA or messages files, `mmtune.data.conversations`) and VQA/caption records
converted on the fly. The loss is on the assistant's tokens only unless `options.train_on_prompt`;
evaluation decodes greedily and scores VQA accuracy on question records, BLEU/CIDEr on caption
records.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mmtune.caption_metrics import caption_metrics
from mmtune.data.conversations import (
    IMAGE,
    ConversationRecord,
    as_conversation,
    caption_conversation,
    merge_questions,
)
from mmtune.data.images import BadImage, load_image
from mmtune.data.vqa_formats import check_curriculum
from mmtune.errors import DataError, UserError
from mmtune.models import vlm
from mmtune.runs import SPEC_FILE
from mmtune.tasks.base import Evaluation, Task
from mmtune.vqa_metrics import vqa_metrics


class VLMOptions(BaseModel):
    """`options:` of the vlm-sft task."""

    model_config = ConfigDict(extra="forbid")
    vision: str | None = Field(None, description="Compose a LLaVA: CLIP/SigLIP vision checkpoint folder.")
    language: str | None = Field(None, description="Compose a LLaVA: causal language model folder.")
    projector: str = Field("mlp2x_gelu", description="Composed LLaVA's projector (mlp2x_gelu).")
    vision_feature_layer: int = Field(
        -2, description="Composed LLaVA: the vision tower's layer the projector reads (-2: the penultimate)."
    )
    max_length: int = Field(2048, gt=0, description="Tokens per sample; cutting an image is an error.")
    train_on_prompt: bool = Field(False, description="Also learn the system and user tokens.")
    freeze_vision: bool = Field(True, description="Keep the vision tower fixed.")
    freeze_projector: bool = Field(False, description="Keep the projector fixed.")
    freeze_language: bool = Field(False, description="Keep the language model fixed.")
    lora_r: int = Field(0, ge=0, description="LoRA rank on the language model's linear layers (0: off).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator.")
    load_in_4bit: bool = Field(
        False, description="QLoRA: a 4-bit base through bitsandbytes (needs CUDA; refused without it)."
    )
    lr_vision: float = Field(1.0, ge=0, description="Learning-rate multiplier of the vision tower.")
    lr_projector: float = Field(1.0, ge=0, description="Learning-rate multiplier of the projector.")
    lr_language: float = Field(1.0, ge=0, description="Learning-rate multiplier of the language model.")
    max_new_tokens: int = Field(32, gt=0, description="Greedy decoding length at evaluation.")
    turns_per_image: int = Field(
        1,
        gt=0,
        description="Training: up to this many question records about one image (same image_id) "
        "form one multi-turn conversation, in a seeded random order (its image is encoded once); "
        "no conversation asks the same question twice.",
    )
    curriculum_types: list[str] = Field(
        default_factory=list,
        description="Training: in the first curriculum_epochs epochs, a scene's question conversations "
        "hold only questions whose question_type starts with one of these (e.g. [nonrel]); a scene "
        "with none keeps all of its questions.",
    )
    curriculum_epochs: int = Field(0, ge=0, description="Epochs of the curriculum_types-only phase (0: none).")
    describe: bool | Literal["only"] = Field(
        False,
        description="Question records that carry captions also give one 'Describe the image.' "
        "conversation per image: learnt in training, scored as caption.* in evaluation; 'only': "
        "those conversations alone, no questions (stage 1 of the two-stage recipe).",
    )


def _content(text: str) -> list[dict]:
    """Text with <image> marks → chat-template parts ({"type": "image"} / {"type": "text"})."""
    out = []
    for i, piece in enumerate(text.split(IMAGE)):
        if i:
            out.append({"type": "image"})
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def _pixels(image) -> Image.Image:
    return Image.fromarray(image).convert("RGB") if isinstance(image, np.ndarray) else load_image(image)


# per-token inputs some families read: Qwen2-VL's M-RoPE types, Gemma 3's and PaliGemma's token types
TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
# image tensors batched per sample (Idefics2/3, SmolVLM: (1, crops, …) with a pixel mask), not per image
PER_SAMPLE_KEYS = ("pixel_values", "pixel_attention_mask")


def pad_cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Concatenate along `dim`, zero-padding every other dimension to the largest."""
    if len({t.shape[:dim] + t.shape[dim + 1 :] for t in tensors}) > 1:
        size = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
        padded = []
        for t in tensors:
            grow = [(0, 0) if d == dim else (0, size[d] - t.shape[d]) for d in range(t.dim())]
            padded.append(torch.nn.functional.pad(t, [x for pair in reversed(grow) for x in pair]))
        tensors = padded
    return torch.cat(tensors, dim)


def refuse_4bit(device: torch.device) -> None:
    """options.load_in_4bit: one line saying why it cannot run here."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UserError(
            "options.load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes, and this machine has no CUDA "
            "device: set it to false (options.lora_r keeps LoRA on the full-precision model)"
        )
    raise UserError(
        "options.load_in_4bit (QLoRA) is not built yet in mmtune; use options.lora_r with train.precision=bf16"
    )


class Encoder:
    """Conversations → input ids, labels (-100 where not learnt), per-token type ids and the
    processor's image tensors, each image expanded as its family does (LLaVA patches, Idefics3
    crops, PaliGemma's prefix)."""

    def __init__(self, processor, max_length: int, train_on_prompt: bool):
        from mmtune.models.vlm import is_prefix_lm

        self.processor, self.max_length, self.train_on_prompt = (
            processor,
            max_length,
            train_on_prompt,
        )
        self.tok = processor.tokenizer
        self.image_token = getattr(processor, "image_token", IMAGE)
        # the ids an image expands to (Gemma 3: soft tokens, not its <start_of_image> placeholder)
        marked = {i for i in getattr(processor, "image_token_ids", ()) if i is not None}
        self.image_ids = marked or {self.tok.convert_tokens_to_ids(self.image_token)}
        self.prefix_lm = is_prefix_lm(processor)
        # a tokenizer's own type ids (BERT's segments) are no model input; the processor's are
        self.token_keys = [k for k in TOKEN_KEYS if k not in self.tok.model_input_names or self.prefix_lm]

    def render(self, messages: list[dict], generation: bool = False) -> str:
        msgs = [{"role": m["role"], "content": _content(m["content"])} for m in messages]
        if not msgs:
            return ""
        return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)

    def segments(self, messages: list[dict], generation: bool = False) -> list[tuple[str, bool]]:
        """(text, is the assistant's reply) pieces whose concatenation is the rendered chat."""
        out, done = [], ""
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = self.render(messages[:k], generation=True)
                out.append((self._after(done, prompt), False))
                done = prompt
            full = self.render(messages[: k + 1])
            out.append((self._after(done, full), m["role"] == "assistant"))
            done = full
        if generation:
            out.append((self._after(done, self.render(messages, generation=True)), False))
        return out

    @staticmethod
    def _after(prefix: str, text: str) -> str:
        if not text.startswith(prefix):
            raise DataError("the chat template renders a conversation's turns differently as it grows")
        return text[len(prefix) :]

    def piece(self, text: str, images: list) -> dict:
        """One segment's ids and tensors (a prefix-LM's text is tokenised here: its processor
        would wrap every piece in its own <bos> … newline layout)."""
        if self.prefix_lm:
            n = self.processor.image_seq_length
            ids = self.tok(text.replace(self.image_token, self.image_token * n), add_special_tokens=False)
            out = {"input_ids": torch.tensor([ids["input_ids"]])}
            if images:
                out.update(self.processor.image_processor(images, return_tensors="pt"))
            return out
        return self.processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt")

    def encode(self, rec: ConversationRecord, generation: bool = False) -> dict:
        """{"input_ids" (L,), "labels" (L,), token type ids (L,), image tensors…} of one conversation."""
        images = [_pixels(im) for im in rec.images]
        messages = rec.messages[:-1] if generation and rec.messages[-1]["role"] == "assistant" else rec.messages
        ids, labels, extra, used, replied, seen = [], [], {}, 0, False, set()
        types = {k: [] for k in self.token_keys}
        for text, reply in self.segments(messages, generation):
            n = text.count(self.image_token)
            enc = self.piece(text, images[used : used + n])
            used += n
            piece = enc["input_ids"][0].tolist()
            ids += piece
            learn = reply or (self.train_on_prompt and not generation)
            labels += [t if learn and t not in self.image_ids else -100 for t in piece]
            replied = replied or reply
            for key in self.token_keys:
                given = enc.get(key)
                if self.prefix_lm and key == "token_type_ids":  # 0: the prefix before the first reply
                    given = torch.full((1, len(piece)), int(replied))
                seen.update([key] if given is not None else [])
                types[key] += given[0].tolist() if given is not None else [0] * len(piece)
            for key, value in enc.items():
                if key not in ("input_ids", "attention_mask", *TOKEN_KEYS) and torch.is_tensor(value):
                    extra.setdefault(key, []).append(value)
        if len(ids) > self.max_length:
            if self.image_ids & set(ids[self.max_length :]):
                raise DataError(f"sample {rec.id}: options.max_length={self.max_length} would cut its image tokens")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not generation and all(t == -100 for t in labels):
            raise DataError(f"sample {rec.id}: no assistant token is left to learn within options.max_length")
        out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        per_sample = "pixel_attention_mask" in extra
        for key, values in extra.items():
            out[key] = pad_cat(values, 1 if per_sample and key in PER_SAMPLE_KEYS else 0)
        out.update({k: torch.tensor(v[: len(ids)]) for k, v in types.items() if k in seen})
        return out


def collate_encoded(items: list[dict], pad_id: int, left: bool = False) -> dict:
    """Pad ids (pad_id), labels (-100), token type ids (0) and the attention mask; concatenate
    image tensors (zero-padded where their sizes differ)."""
    longest = max(len(it["input_ids"]) for it in items)
    per_token = [k for k in TOKEN_KEYS if k in items[0]]
    batch = {"input_ids": [], "labels": [], "attention_mask": [], **{k: [] for k in per_token}}
    for it in items:
        gap = longest - len(it["input_ids"])
        for key, fill in (("input_ids", pad_id), ("labels", -100), *((k, 0) for k in per_token)):
            pad = torch.full((gap,), fill, dtype=torch.long)
            batch[key].append(torch.cat([pad, it[key]] if left else [it[key], pad]))
        mask = torch.cat(
            [torch.zeros(gap), torch.ones(len(it["input_ids"]))]
            if left
            else [torch.ones(len(it["input_ids"])), torch.zeros(gap)]
        ).long()
        batch["attention_mask"].append(mask)
    out = {k: torch.stack(v) for k, v in batch.items()}
    for key in {k for it in items for k in it} - set(out):
        out[key] = pad_cat([it[key] for it in items if key in it])
    return out


def pack_distinct(recs: list, conversations: int, turns: int) -> list[list]:
    """Question records of one image, in order, into up to `conversations` lists of up to `turns`
    each (first fit) such that no list asks the same question twice: a repeat would let a later
    turn copy an earlier answer instead of reading the image, which single-question evaluation
    never rewards. A record that fits nowhere (every list with room already asks it) is left out."""
    packed: list[list] = [[] for _ in range(conversations)]
    asked: list[set] = [set() for _ in range(conversations)]
    for rec in recs:
        for conv, seen in zip(packed, asked, strict=True):
            if len(conv) < turns and rec.question not in seen:
                conv.append(rec)
                seen.add(rec.question)
                break
    return [p for p in packed if p]


class ConversationDataset(torch.utils.data.Dataset):
    """One encoded conversation per record (None for an unreadable image: skipped by collate)."""

    def __init__(self, records, encoder: Encoder, curriculum: tuple[list, int] = ((), 0)):
        self.records, self.encoder = [as_conversation(r) for r in records], encoder
        self._lengths: list[int] | None = None
        # (conversations of the first epochs, how many epochs): one per conversation of `records`
        self.all_records, (self.early, self.early_epochs) = self.records, curriculum

    def set_epoch(self, epoch: int) -> None:
        """Curriculum: the early conversations while it lasts, then all of them."""
        records = self.early if epoch < self.early_epochs else self.all_records
        if records is not self.records:
            self.records, self._lengths = records, None

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """Each conversation's length for `data.group_by_length`: its rendered text's tokens plus,
        per image, the tokens one image adds in the first conversation with one (read once)."""
        if self._lengths is None:
            enc = self.encoder
            texts = [enc.render(r.messages) for r in self.records]
            counts = [len(ids) for ids in enc.tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
            first = next((k for k, r in enumerate(self.records) if r.images), None)
            per_image = 0.0
            if first is not None:
                try:
                    exact = len(enc.encode(self.records[first])["input_ids"])
                    per_image = (exact - counts[first]) / len(self.records[first].images)
                except (BadImage, DataError):
                    pass  # an unreadable or too-long first sample: text lengths alone still group
            self._lengths = [round(n + len(r.images) * per_image) for n, r in zip(counts, self.records, strict=True)]
        return self._lengths

    def __getitem__(self, i: int) -> dict | None:
        try:
            return self.encoder.encode(self.records[i])
        except BadImage:
            return None


class VLMSFTTask(Task):
    """Fine-tune a multimodal LLM on conversations; answer questions about images."""

    name = "vlm-sft"
    Options = VLMOptions
    metric, higher_is_better = "vqa.acc", True
    routes = ("predict", "chat")
    exports = ("hf",)  # merged LoRA, the processor and its chat template: plain transformers loads it

    # ------------------------------------------------------------ model

    def build(self):
        o = self.opts
        if o.load_in_4bit:
            refuse_4bit(self.ctx.device)
        if o.vision or o.language:
            if not (o.vision and o.language):
                raise DataError("compose a LLaVA with both options.vision and options.language")
            model, self.processor = vlm.compose_llava(o.vision, o.language, o.projector, o.vision_feature_layer)
        else:
            model, self.processor = self._from_run(self.cfg.model.name) or vlm.load_vlm(self.cfg.model.name)
        return self._adapt(model)

    def _from_run(self, path: str):
        """(model, processor) of an earlier vlm-sft run, its LoRA adapters merged: stage 2 of a
        two-stage recipe starts from stage 1's run (`model.name: runs/STAGE1`); None when `path`
        is not an mmtune run."""
        from mmtune.errors import CheckpointError, ConfigError
        from mmtune.export import merge_adapters
        from mmtune.runs import open_run, resolve_checkpoint, run_config

        try:
            spec_dir, _ = resolve_checkpoint(path)
        except CheckpointError:
            return None
        task = run_config(spec_dir).task
        if task != self.name:
            raise ConfigError(f"model.name: {path} is an mmtune {task} run, not a {self.name} one")
        earlier, model = open_run(path)
        merge_adapters(model)
        return model, earlier.processor

    def _adapt(self, model):
        """LoRA on the language model (when asked), then freezing by part."""
        o = self.opts
        if o.lora_r:
            from mmtune.models.lora import add_lora

            add_lora(model, vlm.language_model(model), r=o.lora_r, alpha=o.lora_alpha)
        vlm.set_trainable(
            model, {"vision": o.freeze_vision, "projector": o.freeze_projector, "language": o.freeze_language}
        )
        return model

    def save(self, model, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        vlm.save_vlm(model, self.processor, folder)
        spec = {"kind": "vlm", "lora_r": self.opts.lora_r, "lora_alpha": self.opts.lora_alpha}
        (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))

    def load(self, folder: Path):
        model, self.processor = vlm.rebuild_vlm(folder)
        spec = json.loads((folder / SPEC_FILE).read_text())
        if spec.get("lora_r"):
            from mmtune.models.lora import add_lora

            add_lora(model, vlm.language_model(model), r=spec["lora_r"], alpha=spec["lora_alpha"])
        return model

    # ------------------------------------------------------------ data

    @property
    def encoder(self) -> Encoder:
        return Encoder(self.processor, self.opts.max_length, self.opts.train_on_prompt)

    def conversations(self, records, train: bool, types: tuple[str, ...] = ()) -> list[ConversationRecord]:
        """The records as conversations: with `turns_per_image` > 1 (training) a scene's questions
        are grouped into multi-turn conversations, none asking a question twice (`pack_distinct`:
        a repeated question is asked once per conversation); with `describe` each scene also gets one
        caption conversation. Records without a question or image_id stay as they are. `types`
        (the curriculum): a scene's question conversations ask only questions of these types, as
        many conversations as it has without them (its questions of these types, reshuffled)."""
        o = self.opts
        group = o.turns_per_image if train else 1
        if group == 1 and not o.describe:
            return [as_conversation(r) for r in records]
        scenes: dict[str, list] = {}
        out = []
        for r in records:
            key = getattr(r, "image_id", "") if getattr(r, "question", "") else ""
            if key:
                scenes.setdefault(key, []).append(r)
            else:
                out.append(as_conversation(r))
        rng = random.Random(self.cfg.seed)
        for recs in scenes.values():
            if o.describe and recs[0].captions:
                out.append(caption_conversation(recs[0]))
            if o.describe == "only":
                continue
            if group > 1:
                recs = rng.sample(recs, len(recs))
            asked = [r for r in recs if r.question_type.startswith(types)] if types else recs
            asked = asked or recs
            stream = []
            for i in range(0, len(recs), group):
                if asked is not recs and i and i % len(asked) == 0:
                    asked = rng.sample(asked, len(asked))
                j = i % len(asked)
                stream += asked[j : j + group]
            out += [merge_questions(turns) for turns in pack_distinct(stream, -(-len(recs) // group), group)]
        return out

    def dataset(self, records, train: bool):
        o = self.opts
        conversations = self.conversations(records, train)
        if not (train and o.curriculum_epochs):
            return ConversationDataset(conversations, self.encoder)
        check_curriculum(records, o.curriculum_types)
        early = self.conversations(records, train, tuple(o.curriculum_types))
        return ConversationDataset(conversations, self.encoder, (early, o.curriculum_epochs))

    def collate(self, items):
        items = [it for it in items if it is not None]
        return collate_encoded(items, self.processor.tokenizer.pad_token_id) if items else {}

    # ------------------------------------------------------------ training

    def loss(self, model, batch):
        inputs = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        out = model(**inputs)
        return {"loss": out.loss, "samples": len(batch["input_ids"])}

    def lr_scales(self, model) -> dict[str, float]:
        o = self.opts
        scale = {"vision": o.lr_vision, "projector": o.lr_projector, "language": o.lr_language}
        prefix = "model." if any(n.startswith("model.model.") for n, _ in model.named_parameters()) else ""
        return {prefix + n: scale[part] for n, part in vlm.parts(model).items()}

    # ------------------------------------------------------------ evaluation and use

    def reply(self, model, rec: ConversationRecord) -> str:
        """The model's greedy answer to a conversation's last user turn."""
        return self.replies(model, [rec])[0]

    def replies(self, model, convs: list[ConversationRecord], what: str = "answers") -> list[str]:
        """Greedy answers to each conversation's last user turn, `data.eval_batch_size` prompts at
        a time (left-padded: every reply starts right after its prompt)."""
        from tqdm.auto import tqdm

        size, pad = self.cfg.data.eval_batch_size, self.processor.tokenizer.pad_token_id
        out = []
        chunks = range(0, len(convs), size)
        for i in tqdm(chunks, desc=what, leave=False, disable=len(chunks) < 2 or not self.cfg.train.progress):
            batch = collate_encoded(
                [self.encoder.encode(c, generation=True) for c in convs[i : i + size]], pad, left=True
            )
            batch.pop("labels")
            batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
            with self.ctx.autocast():
                ids = vlm.generate_batch(model, self.processor, batch, self.opts.max_new_tokens)
            out += [self.processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
        return out

    @torch.no_grad()
    def evaluate(self, model, records) -> Evaluation:
        questions = [r for r in records if getattr(r, "question", "")]
        captioned = [r for r in records if not getattr(r, "question", "") and r.captions]
        if self.opts.describe:  # one caption per scene of the question records
            scenes = {getattr(r, "image_id", "") or r.id: r for r in questions if r.captions}
            captioned += list(scenes.values())
        if self.opts.describe == "only":
            questions = []
        metrics = {}
        if questions:
            preds = self.replies(model, [as_conversation(r) for r in questions])
            m = vqa_metrics(
                preds,
                [r.answers for r in questions],
                [r.question_type for r in questions],
                [r.answer_type for r in questions],
            )
            metrics.update({f"vqa.{k}": v for k, v in m.items()})
            exact = [
                p.strip().lower() in {a.strip().lower() for a in r.answers}
                for p, r in zip(preds, questions, strict=True)
            ]
            metrics["vqa.exact_match"] = float(np.mean(exact))
        if captioned:
            hyps = self.replies(model, [caption_conversation(r) for r in captioned], "captions")
            m = caption_metrics(hyps, [r.captions for r in captioned])
            metrics.update({f"caption.{k}": v for k, v in m.items()})
        return Evaluation(metrics)

    def predict_inputs(self, records) -> list[dict]:
        conv = [as_conversation(r) for r in records]
        return [
            {
                "image": _pixels(c.images[0]) if c.images else None,
                "question": c.messages[0]["content"].replace(IMAGE, "").strip(),
            }
            for c in conv
        ]

    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each {"image": PIL/path, "question": str} → {"answer"}."""
        out = []
        for inp in inputs:
            image = inp.get("image")
            content = f"{IMAGE}\n{inp['question']}" if image is not None else inp["question"]
            image = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
            rec = ConversationRecord(
                image=image,
                id="input",
                images=[image] if image is not None else [],
                messages=[{"role": "user", "content": content}],
            )
            out.append({"answer": self.reply(model, rec)})
        return out

    def format_prediction(self, output: dict) -> str:
        return output["answer"]

    def chat(self, model, messages: list[dict], images: list, settings: dict) -> dict:
        """The assistant's next turn after `messages` (see `Task.chat`), through the run's chat
        template; a prompt longer than `options.max_length` is refused, never cut."""
        marks = sum(m["content"].count(IMAGE) for m in messages)
        if marks != len(images):
            raise UserError(f"the conversation has {marks} {IMAGE} marks for {len(images)} images")
        if not messages or messages[-1]["role"] != "user":
            raise UserError("the conversation must end with a user message")
        rec = ConversationRecord(image=images[0] if images else "", id="chat", messages=messages, images=list(images))
        enc = Encoder(self.processor, 1 << 62, False).encode(rec, generation=True)
        n = len(enc["input_ids"])
        if n > self.opts.max_length:
            raise UserError(
                f"the conversation is {n} tokens, more than the run's options.max_length={self.opts.max_length}"
            )
        batch = collate_encoded([enc], self.processor.tokenizer.pad_token_id)
        batch = {k: v.to(self.ctx.device) for k, v in batch.items() if k != "labels"}
        limit = settings.get("max_new_tokens") or self.opts.max_new_tokens
        with self.ctx.autocast():
            ids, finish = vlm.chat_reply(
                model,
                self.processor,
                batch,
                limit,
                settings.get("temperature") or 0.0,
                settings.get("seed") or 0,
                settings.get("max_time"),
            )
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return {"text": text, "prompt_tokens": n, "completion_tokens": len(ids), "finish_reason": finish}
