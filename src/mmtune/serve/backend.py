"""What a server serves: one model (+ processor), an optional index, the tasks' `predict` and
`chat`.

The batch functions here run on the server's single model thread; they take and return plain
numpy arrays so the event loop never touches torch.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from mmtune.data.video import BadVideo, probe_video
from mmtune.errors import CheckpointError

log = logging.getLogger("mmtune.serve")


class Backend:
    """Model, processor, optional `VectorIndex` and task objects (for `predict` and `chat` routes).

    `encoder` embeds in the model's place (an `OnnxDualEncoder`); `predict` routes use the model.
    """

    def __init__(
        self,
        model,
        processor,
        index=None,
        tasks: dict | None = None,
        name: str = "",
        embeds: bool = True,
        encoder=None,
        prompts: tuple[list[str], list[str]] | None = None,
        chat=None,
        video=None,
    ):
        """`tasks`: name → task whose `predict` is served; `embeds`: the model has the embedding
        verbs (`encode_image` / `encode_text`, a dual encoder) behind /v1/embed, classify, search;
        `prompts`: the run's (classes, templates), /v1/classify's classes when a request has none;
        `chat`: the task whose `chat` answers /v1/chat/completions; `video`: the task whose
        `clip_item` samples an uploaded video's frames for `encode_video` (/v1/embed with a video)."""
        self.model, self.processor, self.index = model.eval(), processor, index
        self.encoder = model if encoder is None else encoder.eval()
        self.tasks = tasks or {}
        self.chat_task = chat
        self.video_task = video
        self.name = name
        self.device = next(model.parameters()).device
        self._transform = processor.transform() if embeds else None
        self.dim = int(self.embed_texts(["x"]).shape[1]) if embeds else None
        if index is not None and index.dim != self.dim:
            raise CheckpointError(
                f"the index holds {index.dim}-d vectors but the model embeds {self.dim}-d: "
                "build the index with this model's embeddings"
            )
        self.classes: list[str] = []
        self.class_weights: np.ndarray | None = None  # (C, D): mean prompt embedding per class
        if prompts is not None and embeds:
            from mmtune.metrics import zeroshot_weights

            classes, templates = prompts
            texts = [t.format(c) for c in classes for t in templates]
            emb = torch.from_numpy(
                np.concatenate([self.embed_texts(texts[i : i + 256]) for i in range(0, len(texts), 256)])
            )
            self.classes = list(classes)
            self.class_weights = zeroshot_weights(emb, len(classes), len(templates)).numpy()

    @classmethod
    def from_run(
        cls,
        checkpoint: str | Path,
        index_dir=None,
        task_names=None,
        backend: str = "torch",
        quantize: str = "none",
        overrides: dict | None = None,
    ):
        """Load a run / checkpoint / exported model folder and the index; the run's task serves
        what its `routes` declare (its `predict` unless `task_names` leaves it out). `overrides`:
        dotted keys of the run's config (`options.templates`, `data.classnames`)."""
        from mmtune.onnx_encoder import maybe_onnx
        from mmtune.retrieval import VectorIndex
        from mmtune.runs import open_run, resolve_checkpoint, run_config

        cfg = run_config(resolve_checkpoint(checkpoint)[0], overrides) if overrides else None
        task, model = open_run(checkpoint, cfg)
        index = VectorIndex.load(index_dir) if index_dir else None
        wanted = "predict" in task.routes and (task_names is None or task.name in task_names)
        tasks = {task.name: task} if wanted else {}
        embeds = "embed" in task.routes
        encoder = maybe_onnx(model, task.processor, backend, quantize) if embeds else None
        prompts = task.class_prompts()
        chat = task if "chat" in task.routes else None
        video = task if "video" in task.routes else None
        return cls(model, task.processor, index, tasks, str(checkpoint), embeds, encoder, prompts, chat, video)

    def scale(self) -> float:
        return float(self.encoder.scale().detach())

    def preprocess(self, image) -> np.ndarray:
        """A decoded RGB PIL image → (3, S, S) float32, as the model's processor prepares it."""
        return self._transform(image)

    @torch.no_grad()
    def embed_pixels(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Batch function: list of (3, S, S) → (B, D) normalised float32."""
        px = torch.from_numpy(np.stack(pixels)).to(self.device)
        return self.encoder.encode_image(px).float().cpu().numpy()

    def prepare_video(self, data: bytes, max_seconds: float, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
        """Upload bytes → (frames (T, 3, S, S), frame_mask (T,)) sampled as the run evaluates a clip;
        BadVideo when it is empty, not a video, runs over `max_seconds` or has frames over `max_pixels`."""
        with tempfile.TemporaryDirectory(prefix="mmtune-video-") as folder:
            path = Path(folder) / "upload"
            path.write_bytes(data)
            probe_video(str(path), max_seconds, max_pixels)
            item = self.video_task.clip_item(path, max_seconds)
        if item is None:
            raise BadVideo("upload", "zero_length", "no frame decodes")
        return item["pixel_values"], item["frame_mask"]

    @torch.no_grad()
    def embed_clips(self, clips: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Batch function: list of (frames, frame_mask) → (B, D) normalised float32 (`encode_video`)."""
        px = torch.from_numpy(np.stack([c[0] for c in clips])).to(self.device)
        mask = torch.from_numpy(np.stack([c[1] for c in clips])).to(self.device)
        return self.model.encode_video(px, mask).float().cpu().numpy()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Batch function: list of strings → (B, D) normalised float32."""
        tok = {k: v.to(self.device) for k, v in self.processor.tokenize(texts).items()}
        return self.encoder.encode_text(**tok).float().cpu().numpy()

    def predict(self, task_name: str, inputs: list[dict]) -> list[dict]:
        """The task's own `predict` (VQA, captioning… add routes by registering tasks)."""
        with torch.no_grad():
            return self.tasks[task_name].predict(self.model, inputs)

    def chat(self, messages: list[dict], images: list, settings: dict) -> dict:
        """The chat task's next assistant turn (`Task.chat`)."""
        with torch.no_grad():
            return self.chat_task.chat(self.model, messages, images, settings)
