"""Visual question answering (and visual dialog) on a fusion encoder, or a no-fusion baseline.

Heads (`options.head`): `classifier` — an MLP over the answer vocabulary on the fused [CLS]
token, trained with BCE on VQA v2 soft scores; `generator` — a decoder that writes the answer
while cross-attending to the fused question tokens. `options.fusion: concat` is the baseline
without cross-attention: pooled image and question embeddings concatenated into the classifier MLP.
Dialog: a record's `history` (prior turns) is encoded after the question ([CLS] q [SEP] history).
Metric: the official VQA accuracy (`mmtune.vqa_metrics`), overall, per question and answer type.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch.utils.data import DataLoader

from mmtune.data.images import BadImage, load_image
from mmtune.data.vqa_formats import check_curriculum
from mmtune.errors import ConfigError
from mmtune.models.fusion import (
    FusionModel,
    FusionOptions,
    build_vocab,
    greedy_decode,
    load_fusion_spec,
    save_fusion_spec,
    unique_rows,
)
from mmtune.tasks.base import Evaluation, Task
from mmtune.vqa_metrics import normalize_answer, soft_scores, vqa_metrics


class VQAOptions(FusionOptions):
    """`options:` of the vqa task."""

    model_config = ConfigDict(extra="forbid")
    head: Literal["classifier", "generator"] = Field("classifier", description="Answer head.")
    fusion: Literal["cross-attention", "concat"] = Field(
        "cross-attention", description="concat: the baseline without cross-attention."
    )
    decoder_layers: int = Field(2, ge=1, description="Depth of the generative answer decoder.")
    max_answers: int = Field(3129, gt=0, description="Answer vocabulary: most frequent answers.")
    answer_max_len: int = Field(8, ge=3, description="Answer decoder length in tokens.")
    questions_per_image: int = Field(0, ge=0, description="Training: questions drawn per image per epoch (0: all).")
    curriculum_types: list[str] = Field(
        [],
        description="Training: in the first curriculum_epochs epochs, only questions whose "
        "question_type starts with one of these (e.g. [nonrel]) — easier questions first.",
    )
    curriculum_epochs: int = Field(0, ge=0, description="Epochs of the curriculum_types-only phase (0: no curriculum).")


def group_by_image(records) -> list[list]:
    """Records → lists of records sharing an image (first-seen order)."""
    groups: dict[str, list] = {}
    for r in records:
        key = getattr(r, "image_id", "") or (r.image if isinstance(r.image, str) else r.id)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


class QuestionsDataset(torch.utils.data.Dataset):
    """One item per image: its pixels and (a seeded draw of) its questions."""

    def __init__(self, records, transform, seed: int, per_image: int = 0, curriculum: tuple[list[str], int] = ([], 0)):
        self.groups, self.transform = group_by_image(records), transform
        self.seed, self.per_image, self.epoch = seed, per_image, 0
        self.curriculum_types, self.curriculum_epochs = tuple(curriculum[0]), curriculum[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups)

    def questions(self, i: int) -> list:
        """Image i's questions this epoch: the curriculum's types while it lasts (an image with
        none of them keeps all), then a seeded draw of `per_image`."""
        qs = self.groups[i]
        if self.epoch < self.curriculum_epochs:
            qs = [q for q in qs if q.question_type.startswith(self.curriculum_types)] or qs
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.per_image and len(qs) > self.per_image:
            qs = [qs[j] for j in sorted(rng.choice(len(qs), self.per_image, replace=False))]
        return qs

    def __getitem__(self, i: int) -> dict | None:
        qs = self.questions(i)
        try:
            img = load_image(qs[0].image)
        except BadImage:
            return None
        return {"pixel_values": self.transform(img), "records": qs}


def encode_questions(processor, records) -> dict[str, torch.Tensor]:
    """[CLS] question [SEP] history [SEP] (history only where there is one) → ids, mask."""
    questions = [r.question for r in records]
    history = [" ".join(getattr(r, "history", []) or []) for r in records]
    kw = dict(padding="longest", max_length=processor.max_length, return_tensors="pt")
    if any(history):  # dialog: long histories are cut, never the question
        enc = processor.tokenizer(questions, history, truncation="only_second", **kw)
    else:
        enc = processor.tokenizer(questions, truncation=True, **kw)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _vqa_forward(m: FusionModel, pixel_values, input_ids, attention_mask, image_index, head: str, decoder_in=None):
    """Classifier logits (B_q, A), or decoder logits (B_q, T, V) for `decoder_in`."""
    if m.fusion is None:  # baseline: pooled image ⊕ pooled question → MLP
        img = m.encode_image(pixel_values, normalize=False)[image_index]
        rows, inverse = unique_rows(input_ids, attention_mask)  # each distinct question once
        txt = m.encode_text(input_ids[rows], attention_mask[rows], normalize=False)[inverse]
        return m.head[head](torch.cat([img, txt.to(img.dtype)], dim=-1))
    fused = m.fuse(m.image_tokens(pixel_values), input_ids, attention_mask, image_index)
    if decoder_in is None:  # mean over the question's tokens: each word queries the image itself
        w = attention_mask.unsqueeze(-1).to(fused.dtype)  # (B_q, L, 1)
        return m.head[head]((fused * w).sum(1) / w.sum(1).clamp(min=1))
    return m.head[head](decoder_in, fused, attention_mask)


class VQATask(Task):
    """Answer questions about images; one image's questions share its image encoding."""

    name = "vqa"
    Options = VQAOptions
    metric, higher_is_better = "vqa.acc", True
    routes = ("predict",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.head_name = "vqa" if self.opts.head == "classifier" else "answer"
        self.answer_index: dict[str, int] | None = None

    # ------------------------------------------------------------ model

    def save(self, model, folder: Path) -> None:
        save_fusion_spec(model, self.processor, folder)

    def load(self, folder: Path):
        model, self.processor = load_fusion_spec(folder)
        return model

    def build(self):
        from mmtune.models import load_model

        model, self.processor = load_model(self.cfg.model)
        o, tok = self.opts, self.processor.tokenizer
        train = self.ctx.splits.train if self.ctx.splits else []
        if train and not all(hasattr(r, "question") for r in train):
            raise ConfigError("task vqa needs question records (VQA v2, VQA JSONL or shapes)")
        if o.head == "classifier":
            counts = Counter(normalize_answer(a) for r in train for a in r.answers)
            head = {
                "kind": "classifier",
                "answers": [a for a, _ in counts.most_common(o.max_answers)],
            }
        else:
            texts = sorted({normalize_answer(a) for r in train for a in r.answers})
            head = {
                "kind": "decoder",
                "vocab_ids": build_vocab(tok, texts),
                "layers": o.decoder_layers,
                "max_len": o.answer_max_len,
                "memory": "fusion",
            }
        if isinstance(model, FusionModel):  # e.g. after fusion pre-training: keep its encoder
            if o.fusion == "concat" or model.fusion is None:
                raise ConfigError("options.fusion must match the loaded fusion model")
            if o.spatial != model.spec().get("spatial", False):
                raise ConfigError(
                    f"options.spatial={o.spatial} does not match the loaded fusion model "
                    f"(spatial={model.spec().get('spatial', False)})"
                )
            model.add_head(self.head_name, head)
        else:
            model = FusionModel(model, o.fusion_spec({self.head_name: head}, fusion=o.fusion))
        return model

    def _head_spec(self, model) -> dict:
        if not isinstance(model, FusionModel) or self.head_name not in model.head:
            raise ConfigError(f"the model has no '{self.head_name}' head: train it with task vqa")
        return model.spec()["heads_spec"][self.head_name]

    # ------------------------------------------------------------ data

    def dataset(self, records, train: bool):
        tf = self.processor.transform(augment=False)  # shifts would move left/right answers
        o = self.opts
        if not train:
            return QuestionsDataset(records, tf, self.cfg.seed)
        if o.curriculum_epochs:
            check_curriculum(records, o.curriculum_types)
        curriculum = (o.curriculum_types, o.curriculum_epochs)
        return QuestionsDataset(records, tf, self.cfg.seed, o.questions_per_image, curriculum)

    def collate(self, items):
        items = [it for it in items if it is not None]
        if not items:
            return {}
        recs = [r for it in items for r in it["records"]]
        batch = {"pixel_values": torch.from_numpy(np.stack([it["pixel_values"] for it in items]))}
        batch["image_index"] = torch.tensor([i for i, it in enumerate(items) for _ in it["records"]], dtype=torch.long)
        batch.update(encode_questions(self.processor, recs))
        batch["records"] = recs
        return batch

    # ------------------------------------------------------------ training

    def _inputs(self, batch) -> dict:
        keys = ("pixel_values", "input_ids", "attention_mask", "image_index")
        return {k: batch[k] for k in keys}

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        spec = self._head_spec(model)
        recs = batch["records"]
        if spec["kind"] == "classifier":
            if self.answer_index is None:
                self.answer_index = {a: i for i, a in enumerate(spec["answers"])}
            target = torch.zeros(len(recs), len(spec["answers"]))
            for i, r in enumerate(recs):
                for a, s in soft_scores(r.answers).items():
                    if a in self.answer_index:
                        target[i, self.answer_index[a]] = s
            logits = _vqa_forward(model, **self._inputs(batch), head=self.head_name).float()
            target = target.to(logits.device)
            # summed over answers, averaged over questions (the VQA v2 convention)
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(recs)
            return {"loss": loss, "samples": len(recs)}
        ids = self._answer_ids(model, recs).to(batch["input_ids"].device)
        logits = _vqa_forward(model, **self._inputs(batch), head=self.head_name, decoder_in=ids[:, :-1]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=0)
        return {"loss": loss, "samples": len(recs)}

    def _answer_ids(self, model, recs) -> torch.Tensor:
        """(B, T) compact ids of each question's most frequent answer: [CLS] answer [SEP] [PAD]…"""
        best = [Counter(normalize_answer(a) for a in r.answers).most_common(1)[0][0] for r in recs]
        enc = self.processor.tokenizer(
            best, padding="longest", truncation=True, max_length=self.opts.answer_max_len, return_tensors="pt"
        )
        return model.head[self.head_name].to_compact(enc["input_ids"])

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def answer_batch(self, model, batch) -> list[tuple[str, float]]:
        """(answer, score) per question of a collated batch."""
        spec = self._head_spec(model)
        inputs = {k: v.to(self.ctx.device) for k, v in self._inputs(batch).items()}
        with self.ctx.autocast():
            if spec["kind"] == "classifier":
                probs = _vqa_forward(model, **inputs, head=self.head_name).float().sigmoid()
                score, idx = probs.max(-1)
                return [(spec["answers"][i], s) for i, s in zip(idx.tolist(), score.tolist(), strict=True)]
            fused = model.fuse(
                model.image_tokens(inputs["pixel_values"]),
                inputs["input_ids"],
                inputs["attention_mask"],
                inputs["image_index"],
            )
            tok = self.processor.tokenizer
            out = greedy_decode(
                model.head[self.head_name], fused, inputs["attention_mask"], bos=tok.cls_token_id, eos=tok.sep_token_id
            )
        return [(tok.decode(ids).strip(), 1.0) for ids in out]

    def evaluate(self, model, records) -> Evaluation:
        if not records or not hasattr(records[0], "question"):
            return Evaluation({})
        ds = self.dataset(records, train=False)
        bs = max(1, self.cfg.data.eval_batch_size // max(1, len(records) // max(1, len(ds))))
        loader = DataLoader(ds, batch_size=bs, collate_fn=self.collate, num_workers=0)
        preds, recs = [], []
        for batch in loader:
            preds += [a for a, _ in self.answer_batch(model, batch)]
            recs += batch["records"]
        m = vqa_metrics(
            preds, [r.answers for r in recs], [r.question_type for r in recs], [r.answer_type for r in recs]
        )
        rows = [[k[: -len(".acc")], round(v, 4)] for k, v in m.items() if k.endswith(".acc")]
        table = {"title": "VQA accuracy by question / answer type", "columns": ["type", "accuracy"], "rows": rows}
        return Evaluation({f"vqa.{k}": v for k, v in m.items()}, tables={"vqa_types": table})

    def predict_inputs(self, records) -> list[dict]:
        return [{"image": load_image(r.image), "question": r.question} for r in records]

    def format_prediction(self, output: dict) -> str:
        return output["answer"]

    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each input {"image": PIL/path, "question": str, "history": [...]} → {"answer", "score"}."""
        from mmtune.data.vqa_formats import QARecord, format_history

        recs = [
            QARecord(
                image=inp["image"],
                id=str(i),
                image_id=str(i),
                question=inp["question"],
                history=format_history(inp.get("history")),
            )
            for i, inp in enumerate(inputs)
        ]
        tf = self.processor.transform()
        items = [{"pixel_values": tf(load_image(r.image)), "records": [r]} for r in recs]
        answers = self.answer_batch(model, self.collate(items))
        return [{"question": r.question, "answer": a, "score": s} for r, (a, s) in zip(recs, answers, strict=True)]
