"""Typed run configuration: YAML files, dotted command-line overrides, one clear error per mistake."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmtune.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "lit-minilm",
        description="Preset (`lit-minilm`, `photo-minilm`, `tiny-clip`), a transformers checkpoint (hub id or "
        "local folder) or a run folder / checkpoint folder of mmtune.",
    )
    vision: str | None = Field(
        None,
        description="Compose a dual encoder: vision checkpoint (ViT-like) for the image tower.",
    )
    text: str | None = Field(
        None, description="Compose a dual encoder: text checkpoint (BERT-like) for the text tower."
    )
    embed_dim: int = Field(256, gt=0, description="Shared embedding size of a composed model.")
    image_size: int | None = Field(
        None,
        gt=0,
        description="Built-in presets: input resolution in pixels (null: the preset's — "
        "lit-minilm 16, tiny-clip 16, photo-minilm 224). A checkpoint keeps its own.",
    )
    patch_size: int | None = Field(None, gt=0, description="Built-in presets: pixels per token side (null: 4, 4, 16).")
    vision_width: int | None = Field(
        None, gt=0, description="Built-in presets: image tower hidden size (null: 192, 32, 256)."
    )
    vision_layers: int | None = Field(None, gt=0, description="Built-in presets: image tower blocks (null: 4, 2, 4).")
    vision_heads: int | None = Field(None, gt=0, description="Built-in presets: attention heads (null: 4, 4, 4).")
    vision_stem: Literal["patch", "conv"] | None = Field(
        None,
        description="Built-in presets: `patch` (ViT patch embedding) or `conv` (log2(patch_size) "
        "stride-2 3×3 convolutions; better from scratch on little data). null: patch, patch, conv.",
    )
    vision_pos_init: Literal["normal", "sincos2d"] | None = Field(
        None,
        description="Built-in presets with a patch stem: the image tower's position embeddings start "
        "as `normal` noise (transformers' init, quiet beside the patches' content) or as a unit 2-D "
        "sine/cosine grid (`sincos2d`, MAE's; still learnt), so patch tokens carry where they are. "
        "null: normal.",
    )
    lock_text: bool | None = Field(
        None,
        description="Freeze the text tower (LiT); its features are cached. None: preset default.",
    )
    lock_image: bool = Field(False, description="Freeze the image tower.")
    unfreeze_top_k: int | None = Field(None, ge=0, description="With a locked tower, still train its top k blocks.")
    freeze: list[str] = Field(default_factory=list, description="Extra parameter-name patterns (fnmatch) to freeze.")
    grad_checkpointing: bool = Field(False, description="Recompute tower activations in backward.")
    patch_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of image patch tokens dropped at random while training (ViT towers; "
        "FLIP / open_clip: 2-3x faster at little cost). 0 disables; evaluation keeps all.",
    )
    trust_remote_code: bool = Field(False, description="Allow checkpoints that ship their own modelling code.")


class DataConfig(_Section):
    dataset: str = Field(
        "digits",
        description="Built-in name (`digits`, `shapes-video`…) or a path: CSV/TSV/JSONL pairs file, COCO "
        "captions JSON, MSR-VTT-style JSON, or a folder of images with same-stem .txt captions. The "
        "media of pairs files and class folders may be images or video files (.mp4 .webm .avi .mkv .mov).",
    )
    format: Literal["auto", "csv", "tsv", "jsonl", "coco", "folder", "imagefolder", "conversations", "msrvtt"] = Field(
        "auto",
        description="Reader to use; `auto` decides from the path. `imagefolder`: a sub-folder "
        "of images (or video clips) per class (the folder name is the label). `conversations`: LLaVA "
        "conversation or messages records (JSON list or JSONL; `auto` finds them too). `msrvtt`: "
        "JSON with `sentences` of {video_id, caption} (or a list of {video_id, caption(s)}), the "
        "video `VIDEO_ID.mp4` (or another video extension) under `image_root` (`auto` finds it too).",
    )
    val: str | None = Field(None, description="Validation data path (same formats).")
    test: str | None = Field(None, description="Test data path (same formats).")
    image_column: str = Field("image", description="Column holding the image path.")
    caption_column: str | None = Field("caption", description="Column holding the caption; null for label-only files.")
    label_column: str | None = Field(None, description="Optional column holding a class label.")
    classnames: str | list[Any] | dict[Any, Any] | None = Field(
        None,
        description="The classes in order (label index = position): a list, or a text file of one "
        "class a line (blank lines and `#` comments ignored); an entry `key: display name` shows "
        "folder / label `key` as that name in prompts and tables (a `{key: name}` mapping or a "
        ".yaml file of one works too). Default: the folder names / label values sorted "
        "(numerically when all are integers).",
    )
    label_pattern: str | None = Field(
        None,
        description="Caption-only pairs data: a caption matching this pattern (`a photo of a {}.`) "
        "gives its image the label in the `{}` place, which makes zero-shot evaluation possible.",
    )
    image_root: str | None = Field(None, description="Folder image paths are relative to (default: the file's folder).")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Held out of a single file for validation when no `val`."
    )
    batch_size: int = Field(128, gt=0, description="Training batch size per process.")
    eval_batch_size: int = Field(256, gt=0, description="Evaluation batch size.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    group_by_length: bool = Field(
        False,
        description="Training batches of samples of similar length (less padding), still in a seeded "
        "random order; for tasks whose samples have lengths (vlm-sft).",
    )
    on_bad_sample: Literal["skip", "error"] = Field(
        "skip", description="A missing/corrupt/oversized image: skip and count, or stop."
    )
    max_bad_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Stop when more than this fraction of a split is bad."
    )
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Refuse images declaring more pixels (decompression bombs)."
    )
    frames: int = Field(
        8, gt=0, description="Frames sampled from each video clip (shorter clips are padded and masked)."
    )
    frame_pool: int = Field(
        32,
        gt=0,
        description="Frames of a clip decoded (evenly spaced) and cached; training samples `frames` of them "
        "with random temporal jitter, evaluation the middle of each of `frames` equal segments.",
    )
    max_video_seconds: float = Field(
        600.0,
        gt=0,
        description="Skip (count as `too_long`) videos longer than this; frame size is bounded by max_image_pixels.",
    )
    video_cache_mb: int = Field(
        1024, ge=0, description="Decoded video frames kept in memory per process, so later epochs do not decode again."
    )
    shift: list[str] = Field(
        default_factory=list,
        description="Extra evaluation splits (distribution shift): built-in names "
        "(`digits-shift`) or paths in the formats above, labelled with the training classes.",
    )
    augment: bool = Field(False, description="Random shifts and scale jitter on training images.")
    augment_rotate: float = Field(
        0.0,
        ge=0.0,
        le=180.0,
        description="With `augment` (contrastive, classify): also rotate each training image by a "
        "random angle within ±this many degrees (handwriting, scans; 0: off).",
    )
    shards: str | None = Field(
        None,
        description="WebDataset tar shards to stream the training split from: a folder of .tar "
        "or a brace pattern (`shards/{00000..00099}.tar`); `dataset` supplies val/test only.",
    )
    shuffle_buffer: int = Field(1000, ge=1, description="Samples held in the shuffle buffer when streaming shards.")
    split_seed: int = Field(0, description="Seed of the built-in datasets' train/val/test split.")


class TrainConfig(_Section):
    epochs: float = Field(10.0, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on biases, norms, logit scale).")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps before cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    clip_grad: float | None = Field(1.0, gt=0, description="Max gradient norm; null disables.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision; bf16 is fast on recent CPUs."
    )
    stop_after_steps: int | None = Field(
        None,
        gt=0,
        description="End this session after N steps, saving `last` (time-boxed jobs); continue "
        "later with --resume auto. The schedule still spans the whole run.",
    )
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps; 0: at the end only.")
    save_every: int = Field(0, ge=0, description="Save `last` every N steps; 0: at evals/end.")
    early_stopping: int | None = Field(
        None,
        ge=0,
        description="Stop once the selection metric (`eval.metric`) has gone this many evaluations "
        "in a row without improving by more than `early_stopping_min_delta` (needs "
        "`eval_every`); `last` is saved, the final evaluation uses `best`. null or 0: off.",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="Smallest change of the selection metric that counts as an improvement."
    )
    keep_last: int = Field(
        1,
        ge=1,
        description="Checkpoints kept besides `best`: `last` plus the N-1 before it "
        "(`checkpoints/step-NNNNNNNN/`); older ones are deleted (by rank 0).",
    )
    log_every: int = Field(10, gt=0, description="Append a train line to metrics.jsonl every N.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/inf loss: stop the run, or skip that step."
    )
    max_nonfinite: int = Field(5, gt=0, description="With `skip`, stop after this many consecutive bad steps.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml"]] = Field(
        default_factory=list,
        description="Experiment trackers (accelerate's) that also receive the logged metrics; "
        "tensorboard writes into the run folder's `tracking/`.",
    )
    progress: bool = Field(True, description="Show a progress bar.")
    deterministic: bool = Field(False, description="torch deterministic algorithms (resume tests).")
    compile: bool = Field(False, description="torch.compile the model (inductor).")
    dist_timeout_s: int = Field(
        600,
        gt=0,
        description="Process-group timeout (seconds): a rank that stops answering fails the run "
        "after this long instead of hanging it.",
    )

    @model_validator(mode="after")
    def _check_early_stopping(self) -> TrainConfig:
        if self.early_stopping and not self.eval_every:
            raise ValueError("train.early_stopping counts evaluations: set train.eval_every too")
        return self


class EvalConfig(_Section):
    split: Literal["val", "test"] = Field("test", description="Split for the final evaluation.")
    metric: str | None = Field(
        None,
        description="Validation figure that picks the `best` checkpoint; null: the task's own "
        "(e.g. `zeroshot.top1` for contrastive, `val.loss` for tasks without a score).",
    )
    mode: Literal["max", "min"] | None = Field(
        None,
        description="Whether a higher or lower `metric` is better; null: the task's declaration "
        "for its own metric, else higher unless the name ends in `loss`.",
    )


class Config(_Section):
    task: str = Field("contrastive", description="Task name (see `mmtune.tasks`).")
    name: str = Field("run", description="Run name: the run folder is output_dir/name.")
    output_dir: str = Field("runs", description="Parent folder of run folders.")
    seed: int = Field(0, description="Seed for weights, data order and augmentation.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    options: dict[str, Any] = Field(default_factory=dict, description="Task-specific options, validated by the task.")

    @model_validator(mode="after")
    def _check(self) -> Config:
        if (self.model.vision is None) != (self.model.text is None):
            raise ValueError("model.vision and model.text must be given together")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += all_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def unknown_key_error(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(Config), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _format_validation(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return str(unknown_key_error(loc))
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    where = f"config key '{loc}'" if loc else "config"
    return f"{where}: {first['msg']}{shown}"


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`a.b=1` or `--a.b 1` tokens → {"a.b": 1} with YAML typing of values."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("--"):
            tok = tok[2:]
            if "=" not in tok:
                if i + 1 >= len(args):
                    raise ConfigError(f"override '--{tok}' has no value")
                tok = f"{tok}={args[i + 1]}"
                i += 1
        if "=" not in tok:
            raise ConfigError(f"cannot read override '{tok}': write key=value, e.g. train.lr=1e-4")
        key, raw = tok.split("=", 1)
        out[key.strip()] = _typed(raw)
        i += 1
    return out


def _typed(raw: str) -> Any:
    """YAML typing of a command-line value; `1e-4` is a number (YAML 1.1 reads it as text)."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if p == "options":  # free-form task options take the rest of the key verbatim
            node = node.setdefault("options", {})
            node[".".join(parts[parts.index(p) + 1 :])] = value
            return
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise unknown_key_error(key)
        node = nxt
    node[parts[-1]] = value


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ConfigError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e.__class__.__name__}: {e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys")
    return tree


# Keys that moved into a task's options: the old spelling is a one-line error naming the new one.
MOVED = {
    "train.loss": "options.loss (task contrastive)",
    "train.class_aware": "options.class_aware (task contrastive)",
    "train.gather_features": "options.gather_features (task contrastive)",
    "train.gradcache_chunk": "options.gradcache_chunk (task contrastive)",
    "eval.zeroshot": "options.zeroshot (task contrastive)",
    "eval.retrieval": "options.retrieval (task contrastive)",
    "eval.templates": "options.templates (tasks contrastive and classify)",
    "data.twins": "options.twins (task contrastive)",
    "train.tensorboard": "train.report_to: [tensorboard]",
}


def _refuse_moved(tree: dict) -> None:
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(tree.get(section), dict) and key in tree[section]:
            raise ConfigError(f"config key '{old}' has moved: write {new}")


def _migrate(tree: dict) -> None:
    """A run's saved config of an earlier version: each moved key goes into `options` when the
    run's task has that option, and is dropped when it does not (that task never read it)."""
    from mmtune.tasks import get_task

    fields = get_task(tree.get("task", "contrastive")).Options.model_fields
    for old, new in MOVED.items():
        section, key = old.split(".")
        if not isinstance(tree.get(section), dict) or key not in tree[section]:
            continue
        value = tree[section].pop(key)
        if old == "train.tensorboard" and value:
            tree["train"].setdefault("report_to", ["tensorboard"])
        elif new.startswith("options.") and key in fields:
            tree.setdefault("options", {}).setdefault(key, value)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, saved_run: bool = False
) -> Config:
    """Read a YAML config (or defaults), apply dotted overrides, validate; ConfigError on mistakes.
    `saved_run`: the config.yaml of a run, whose keys of earlier versions are carried over."""
    tree = read_yaml_mapping(path) if path is not None else {}
    if saved_run:
        _migrate(tree)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    _refuse_moved(tree)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation(e)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    data = cfg.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def validate_options(cfg: Config, options_model: type[BaseModel]) -> BaseModel:
    """Validate `cfg.options` against a task's options model, naming the bad key."""
    try:
        return options_model.model_validate(cfg.options)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            names = ", ".join(options_model.model_fields)
            raise ConfigError(f"unknown config key 'options.{loc}' (task options: {names})") from None
        raise ConfigError(f"config key 'options.{loc}': {first['msg']}") from None
