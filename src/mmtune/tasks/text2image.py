"""Text-to-image (`task: text2image`): a decoder-only transformer prior over [caption tokens ;
image tokens] of a trained vq-autoencoder run (`options.vq_run`), DALL-E style.

Training: next-token cross-entropy on the image tokens; the caption is replaced by the empty one
with probability `options.caption_dropout`, so sampling can use classifier-free guidance.
Evaluation: reconstruction PSNR of the carried tokenizer, the prior's per-token NLL, and, for a
fixed prompt set (`options.prompts`, default the `shapes-gen` held-out combinations),
`options.candidates` samples per prompt scored by the shapes checker: `gen.checker_acc_no_rerank`
over all candidates, `gen.checker_acc` over the best `options.keep` after re-ranking with the
dual encoder `options.reranker`; `gen.clip_score` = 100 · mean cosine of the kept images.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmtune.data.builtin.shapes_check import check
from mmtune.errors import ConfigError
from mmtune.generation import (
    Reranker,
    compact_vocab,
    encode_captions,
    generate_images,
    grid,
    rerank,
)
from mmtune.models.load import load_processor, save_processor
from mmtune.models.prior import Text2ImageModel
from mmtune.models.vq import VQModel
from mmtune.tasks.base import Evaluation, Task
from mmtune.tasks.vq_autoencoder import reconstruction_metrics


class T2IOptions(BaseModel):
    """`options:` of the text2image task."""

    model_config = ConfigDict(extra="forbid")
    vq_run: str | None = Field(None, description="Run folder of the trained vq-autoencoder.")
    reranker: str | None = Field(None, description="Dual-encoder run that re-ranks candidates.")
    text_len: int = Field(24, ge=1, description="Caption prefix length in word pieces.")
    dim: int = Field(256, gt=0, description="Width of the prior.")
    layers: int = Field(4, ge=1, description="Transformer blocks of the prior.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the prior.")
    rope2d: bool = Field(False, description="2-D rotary positions on image tokens instead of learned embeddings.")
    caption_dropout: float = Field(
        0.15, ge=0, le=1, description="Probability of training on the empty caption (for CFG)."
    )
    guidance: float = Field(3.0, ge=0, description="Classifier-free guidance scale (1 = off).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_k: int | None = Field(None, ge=1, description="Sample among the k likeliest codes.")
    candidates: int = Field(8, ge=1, description="Samples per prompt at evaluation (N).")
    keep: int = Field(1, ge=1, description="Candidates kept after re-ranking (k).")
    prompts: list[str] | None = Field(
        None, description="Evaluation prompts; default: shapes-gen's held-out prompt set."
    )
    nll_samples: int = Field(500, ge=0, description="Records the evaluation NLL is measured on.")


class CodesDataset(Dataset):
    """Items {text_ids, codes}: captions as compact ids (dropped to empty with probability p,
    drawn from a Generator seeded by (seed, epoch, index)) and pre-computed image codes."""

    def __init__(self, text_ids: torch.Tensor, codes: torch.Tensor, p: float, seed: int):
        self.text_ids, self.codes, self.p, self.seed, self.epoch = text_ids, codes, p, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> dict:
        ids = self.text_ids[i]
        if self.p and np.random.default_rng([self.seed, self.epoch, i]).random() < self.p:
            ids = torch.zeros_like(ids)
        return {"text_ids": ids, "codes": self.codes[i], "index": i}


def _vq_dataset(records, processor, seed):
    from mmtune.data import ImageTextDataset

    return ImageTextDataset(records, processor.transform(augment=False), seed)


def _pixels_collate(items):
    items = [it for it in items if it is not None]
    return {
        "pixel_values": torch.from_numpy(np.stack([it["pixel_values"] for it in items])),
        "caption": [it["caption"] for it in items],
    }


class Text2ImageTask(Task):
    """Generate images from captions with a VQ prior."""

    name = "text2image"
    Options = T2IOptions
    metric, higher_is_better = "gen.checker_acc", True
    routes = ("predict",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self._vq = self._vocab = None  # training codes' tokenizer and vocabulary (build)

    # ------------------------------------------------------------ model

    def build(self):
        from mmtune.models.load import load_tokenizer
        from mmtune.runs import load_run

        o = self.opts
        if not o.vq_run:
            raise ConfigError("task text2image needs options.vq_run: a vq-autoencoder run folder")
        vq, vq_proc = load_run(o.vq_run)
        if not isinstance(vq, VQModel):
            raise ConfigError(f"options.vq_run {o.vq_run} is not a vq-autoencoder run")
        train = self.ctx.splits.train if self.ctx.splits else []
        texts = [c for r in train for c in r.captions]
        if not texts:
            raise ConfigError("task text2image needs training records with captions")
        tok = load_tokenizer(self.cfg.model.name)  # captions are word pieces of model.name's vocabulary
        self.processor = dataclasses.replace(vq_proc, tokenizer=tok)
        vocab = compact_vocab(tok, texts)
        prior = {
            "text_vocab": len(vocab),
            "text_len": o.text_len,
            "codes": vq.quantizer.codes,
            "tokens": vq.grid**2,
            "dim": o.dim,
            "layers": o.layers,
            "heads": o.heads,
            "dropout": o.dropout,
            "rope2d": o.rope2d,
        }
        t2i = Text2ImageModel({"vq": vq.spec(), "prior": prior, "vocab_ids": vocab})
        t2i.vq.load_state_dict(vq.state_dict())
        self._vq, self._vocab = t2i.vq, vocab
        return t2i

    def save(self, model, folder: Path) -> None:
        save_processor(self.processor, folder, {"text2image": model.spec()})

    def load(self, folder: Path):
        self.processor, spec = load_processor(folder)
        model = Text2ImageModel(spec.get("text2image") or spec["wrap"]["spec"])  # `wrap`: earlier runs
        self._vq, self._vocab = model.vq, model.vocab_ids
        return model

    @torch.no_grad()
    def encode_records(self, vq, records, desc="encoding images") -> tuple[torch.Tensor, list[str]]:
        """(codes (n, tokens), first captions) of records' images."""
        vq.eval()
        loader = DataLoader(
            _vq_dataset(records, self.processor, self.cfg.seed),
            batch_size=self.cfg.data.eval_batch_size,
            collate_fn=_pixels_collate,
        )
        codes, caps = [], []
        device = next(vq.parameters()).device
        for batch in tqdm(loader, desc=desc, leave=False, disable=len(loader) < 5):
            codes.append(vq.encode(batch["pixel_values"].to(device)).cpu())
            caps += batch["caption"]
        tokens = vq.grid**2
        return (torch.cat(codes) if codes else torch.zeros((0, tokens), dtype=torch.long)), caps

    def _text_ids(self, vocab_ids, texts):
        return encode_captions(self.processor.tokenizer, vocab_ids, texts, self.opts.text_len)

    def dataset(self, records, train: bool):
        if self._vq is None:
            raise ConfigError("text2image: build or load the model before reading data")
        vocab = self._vocab
        codes, caps = self.encode_records(self._vq, records)
        p = self.opts.caption_dropout if train else 0.0
        return CodesDataset(self._text_ids(vocab, caps), codes, p, self.cfg.seed)

    def collate(self, items):
        items = [it for it in items if it is not None]
        if not items:
            return {}
        return {
            "text_ids": torch.stack([it["text_ids"] for it in items]),
            "codes": torch.stack([it["codes"] for it in items]),
        }

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        return {"loss": model(batch["text_ids"], batch["codes"]), "samples": len(batch["codes"])}

    # ------------------------------------------------------------ evaluation

    def prompts(self) -> list[str]:
        if self.opts.prompts:
            return list(self.opts.prompts)
        from mmtune.data.builtin.shapes_gen import heldout_prompts

        return heldout_prompts()

    def evaluate(self, model, records) -> Evaluation:
        model.eval()
        proc, o = self.processor, self.opts
        metrics: dict[str, float] = {}
        if records:
            loader = DataLoader(
                _vq_dataset(records, proc, self.cfg.seed),
                collate_fn=_pixels_collate,
                batch_size=self.cfg.data.eval_batch_size,
            )
            vq_metrics, _ = reconstruction_metrics(model.vq, loader, proc)
            metrics.update({k: v for k, v in vq_metrics.items() if k != "vq.dead_restarts"})
            sub = records[: o.nll_samples]
            if sub:
                codes, caps = self.encode_records(model.vq, sub)
                ids = self._text_ids(model.vocab_ids, caps)
                nll = [
                    float(model.prior.loss(ids[i : i + 256], codes[i : i + 256])) * len(codes[i : i + 256])
                    for i in range(0, len(codes), 256)
                ]
                metrics["prior.nll"] = sum(nll) / len(codes)
        evaluation = self.generation_metrics(model)
        evaluation.metrics = {**metrics, **evaluation.metrics}
        return evaluation

    def generation_metrics(self, model) -> Evaluation:
        """Checker accuracy with and without re-ranking, CLIP-score; grids and a table."""
        o, prompts = self.opts, self.prompts()
        images = generate_images(
            model, self.processor, prompts, o.candidates, self.cfg.seed, o.guidance, o.temperature, o.top_k
        )
        ranker = Reranker(o.reranker) if o.reranker else None
        rows, ranked_rows, n_ok, kept_ok, kept_n, clip = [], [], 0, 0, 0, []
        for prompt, cands in zip(prompts, images, strict=True):
            ok = [all(check(im, prompt)) for im in cands]
            scores = ranker.scores(cands, prompt) if ranker else np.zeros(len(cands))
            best = rerank(scores, o.keep) if ranker else list(range(min(o.keep, len(cands))))
            n_ok += sum(ok)
            kept_ok += sum(ok[i] for i in best)
            kept_n += len(best)
            if ranker:
                clip += [100 * max(float(scores[i]), 0.0) for i in best]
            order = rerank(scores, len(cands)) if ranker else list(range(len(cands)))
            ranked_rows.append([cands[i] for i in order])
            rows.append(
                [
                    prompt,
                    round(sum(ok) / len(ok), 4),
                    int(all(ok[i] for i in best)),
                    round(float(scores[best[0]]), 4) if ranker else None,
                ]
            )
        total = sum(len(c) for c in images)
        out = {
            "gen.checker_acc_no_rerank": n_ok / max(total, 1),
            "gen.checker_acc": kept_ok / max(kept_n, 1),
            "gen.prompts": len(prompts),
        }
        if clip:
            out["gen.clip_score"] = float(np.mean(clip))
        table = {
            "title": "Generated samples per prompt (best re-ranked candidate)",
            "columns": ["prompt", "checker acc (all candidates)", "kept candidate correct", "best re-rank score"],
            "rows": rows,
        }
        samples = _labelled_grid(prompts, ranked_rows, GRID_COLUMNS)
        return Evaluation(out, tables={"gen_prompts": table}, images={"samples_prompts": samples})

    def predict_inputs(self, records) -> list[dict]:
        return [{"prompt": r.captions[0]} for r in records if r.captions]

    def generate(self, model, prompts: list[str], n: int, seed: int, settings: dict) -> list[list]:
        """n PIL images per prompt; settings: guidance, temperature, top_k (None: the run's)."""
        o = self.opts
        pick = {
            k: o.model_dump()[k] if settings.get(k) is None else settings[k]
            for k in ("guidance", "temperature", "top_k")
        }
        if pick["temperature"] <= 0:
            raise ConfigError(f"temperature must be positive (got {pick['temperature']})")
        return generate_images(
            model, self.processor, prompts, n, seed, float(pick["guidance"]), float(pick["temperature"]), pick["top_k"]
        )

    def default_reranker(self) -> str | None:
        return self.opts.reranker

    def predict(self, model, inputs: list[dict]) -> list[dict]:
        """Each input {"prompt": str} → {"images": [PIL × options.candidates]}."""
        o = self.opts
        images = generate_images(
            model,
            self.processor,
            [i["prompt"] for i in inputs],
            o.candidates,
            self.cfg.seed,
            o.guidance,
            o.temperature,
            o.top_k,
        )
        return [{"images": ims} for ims in images]


GRID_COLUMNS = 16  # the report's sample grid shows at most the 16 best candidates per prompt


def _labelled_grid(prompts: list[str], rows, columns: int = GRID_COLUMNS):
    """Sample grid with each row's prompt on its left (matplotlib), as a PIL image for the report."""
    from matplotlib.figure import Figure

    img = grid([r[:columns] for r in rows], scale=2)
    h = len(rows)
    fig = Figure(figsize=(12, 0.55 * h + 0.6))
    ax = fig.add_axes((0.36, 0.02, 0.63, 0.96 - 0.4 / (0.55 * h + 0.6)))
    ax.imshow(np.asarray(img))
    ax.set_yticks([(i + 0.5) * img.height / h for i in range(h)], prompts, fontsize=8)
    ax.set_xticks([])
    n = max(len(r) for r in rows)
    shown = f"the best {columns} of {n}" if n > columns else "all"
    ax.set_title(f"samples per prompt, re-ranked best first (left): {shown}", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, format="png")
    buf.seek(0)
    return Image.open(buf)
