"""Class names (`data.classnames`) and prompt templates (`options.templates`): reading, checks, built-in sets.

A class-names source fixes the class order (label index = position) and may give each folder /
label value a display name (`n01440764: tench`) used in prompts and tables. A templates source is
`eval` / `train` (the dataset's own sets), a built-in set name, one template, a list, or a file
of one template a line; every template holds exactly one placeholder, `{}` or `{c}`.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmtune.errors import ConfigError, DataError

log = logging.getLogger("mmtune.data")

SIMPLE = ("a photo of a {}.",)

# The 80 prompts OpenAI published for ImageNet zero-shot (CLIP's prompt-engineering notebook).
OPENAI_IMAGENET = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

BUILTIN_TEMPLATES = {"simple": SIMPLE, "openai-imagenet": OPENAI_IMAGENET}
DATASET_SETS = ("eval", "train")  # the dataset's own held-out / training prompt sets


# ------------------------------------------------------------------ templates


def check_template(template: str, where: str) -> str:
    """One template with exactly one placeholder (`{}` or CLIP_benchmark's `{c}`) → its `{}` form."""
    text = str(template).replace("{c}", "{}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{where}: template {template!r} is not a valid format string ({e})") from None
    if fields.count("") != 1 or len(fields) != 1:
        problem = "has no '{}'" if not fields else f"has {len(fields)} placeholders"
        raise ConfigError(f"{where}: template {template!r} {problem}; write exactly one '{{}}' where the class goes")
    return text


def is_template(value: str) -> bool:
    """Whether a string is a template itself rather than a set name or a file."""
    return "{}" in value or "{c}" in value


def check_templates_option(value: Any) -> Any:
    """`options.templates` as validated: a name/path string is kept, templates are checked."""
    if isinstance(value, str):
        return check_template(value, "options.templates") if is_template(value) else value
    if not value:
        raise ConfigError("options.templates: the list of templates is empty")
    return [check_template(t, "options.templates") for t in value]


def read_lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of a text file, `#` comments dropped; ConfigError when it is missing."""
    if not path.is_file():
        raise ConfigError(f"{what}: file not found: {path}")
    lines = []
    for raw in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    if not lines:
        raise ConfigError(f"{what}: {path} holds no entries")
    return lines


def resolve_templates(spec: str | Sequence[str], dataset_sets: dict[str, list[str]] | None) -> list[str] | None:
    """The templates `spec` names. `dataset_sets` ({"eval": …, "train": …}, from the data) is
    needed for `eval`/`train`; None then (no data read) gives None: the caller falls back on the
    run's record."""
    if isinstance(spec, str):
        if spec in DATASET_SETS:
            return None if dataset_sets is None else list(dataset_sets[spec])
        if spec in BUILTIN_TEMPLATES:
            return list(BUILTIN_TEMPLATES[spec])
        if is_template(spec):
            return [check_template(spec, "options.templates")]
        path = Path(spec)
        if not path.is_file():
            names = ", ".join((*DATASET_SETS, *BUILTIN_TEMPLATES))
            raise ConfigError(f"options.templates: {spec!r} is not a set name ({names}), a template or a file")
        return [check_template(t, f"options.templates ({path})") for t in read_lines(path, "options.templates")]
    return [check_template(t, "options.templates") for t in spec]


# ------------------------------------------------------------------ class names


@dataclass(frozen=True)
class ClassNames:
    """`data.classnames` read: folder names / label values in the user's order, display names."""

    keys: list[str]
    names: list[str]
    source: str  # for messages: "data.classnames (classes.txt)"


def _entry(item: Any, where: str) -> tuple[str, str]:
    """A `key`, `key: display name` or YAML one-key mapping entry → (key, name)."""
    if isinstance(item, dict):
        if len(item) != 1:
            raise ConfigError(f"{where}: entry {item!r} must be a name or one `key: display name`")
        ((key, name),) = item.items()
    elif isinstance(item, str) and ":" in item:
        key, name = item.split(":", 1)
    else:
        key, name = item, item
    key, name = str(key).strip(), str(name).strip()
    if not key or not name:
        raise ConfigError(f"{where}: entry {item!r} has an empty name")
    return key, name


def read_classnames(spec: Any) -> ClassNames | None:
    """`data.classnames` (a list, a `{key: name}` mapping, or a text / YAML file) → ClassNames."""
    if spec is None:
        return None
    if isinstance(spec, str):
        path = Path(spec)
        where = f"data.classnames ({path})"
        if path.suffix.lower() in (".yaml", ".yml"):
            from mmtune.config import read_yaml_mapping

            items: Any = list(read_yaml_mapping(path).items()) if path.is_file() else None
            if items is None:
                raise ConfigError(f"data.classnames: file not found: {path}")
            entries = [_entry({k: v}, where) for k, v in items]
        else:
            entries = [_entry(line, where) for line in read_lines(path, "data.classnames")]
    else:
        where = "data.classnames"
        items = [{k: v} for k, v in spec.items()] if isinstance(spec, dict) else list(spec)
        entries = [_entry(item, where) for item in items]
    if not entries:
        raise ConfigError(f"{where}: no class names")
    keys, names = [k for k, _ in entries], [n for _, n in entries]
    for what, values in (("class", keys), ("display name", names)):
        seen: set[str] = set()
        for v in values:
            if v in seen:
                raise ConfigError(f"{where}: {what} {v!r} is listed twice")
            seen.add(v)
    return ClassNames(keys, names, where)


def sort_classes(values) -> list[str]:
    """Distinct class values sorted: numerically when all are integers (0, 1, 2, …, 10), else as text."""
    distinct = set(values)
    if distinct and all(re.fullmatch(r"-?\d+", v) for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


# ------------------------------------------------------------------ labels from captions


def caption_matcher(pattern: str):
    """`data.label_pattern` ("a photo of a {}.") → caption → label or None (case and outer
    whitespace ignored)."""
    text = check_template(pattern, "data.label_pattern").strip()
    before, after = (r"\s+".join(map(re.escape, re.split(r"\s+", part))) for part in text.split("{}"))
    regex = re.compile(before + r"(.+?)" + after, re.IGNORECASE)

    def match(caption: str) -> str | None:
        m = regex.fullmatch(caption.strip())
        return m.group(1) if m else None

    return match


def labels_from_captions(
    splits: Sequence[list], pattern: str, keys: list[str] | None, source: str, name: str
) -> list[str]:
    """Label the records of `splits` by their first caption matching `pattern`; the classes (keys)
    are `keys` when given, else the distinct matched values sorted. Unmatched records stay
    unlabelled (counted in one warning); none matching is a DataError."""
    match = caption_matcher(pattern)
    records = [r for recs in splits for r in recs]
    if any(r.label is not None for r in records):
        raise DataError(f"{name}: data.label_pattern is for caption-only data; this data has labels")
    found = [(r, v) for r in records for v in [next((m for m in map(match, r.captions) if m), None)] if v]
    if not found:
        first = next((c for r in records for c in r.captions), "")
        raise DataError(f"{name}: no caption matches data.label_pattern {pattern!r} (first caption: {first!r})")
    if len(found) < len(records):
        n = len(records) - len(found)
        log.warning("data.label_pattern %r: %d of %d records match no caption (no label)", pattern, n, len(records))
    classes = keys if keys is not None else sort_classes(v for _, v in found)
    index = {c: i for i, c in enumerate(classes)}
    for rec, value in found:
        if value not in index:
            raise DataError(f"{name}: label {value!r} (from a caption) is not in {source}")
        rec.label = index[value]
    return classes


def relabel(records: list, old: list[str], names: ClassNames, name: str) -> None:
    """Records labelled by index into `old` → labelled by position in `names.keys` (in place)."""
    index = {k: i for i, k in enumerate(names.keys)}
    for c in old:
        if c not in index:
            raise DataError(f"{name}: class {c!r} is not in {names.source}")
    for r in records:
        if r.label is not None:
            r.label = index[old[r.label]]


# ------------------------------------------------------------------ what a run records


def prompt_record(classes: list[str], templates: list[str], templates_spec: Any, classnames_spec: Any) -> dict:
    """What a run records of its zero-shot head: the classes and templates it was built from, and
    the config values that named them (so a later command can tell an override from the record)."""
    source = {"templates": templates_spec, "classnames": classnames_spec}
    return {"classes": list(classes), "templates": list(templates), "source": source}


def _overridden(record: dict, key: str, value: Any) -> bool:
    source = record.get("source")
    return source is not None and json.dumps(source.get(key)) != json.dumps(value)


def head_prompts(templates_spec: Any, classnames_spec: Any, splits, record: dict) -> tuple[list[str] | None, list[str]]:
    """(classes, templates) of a zero-shot head. Where data was read (`splits`), from the data and
    the config; where none was (serving), the run's `record`, unless the config names other
    classes / templates than the run recorded (a command-line override)."""
    if splits is not None and splits.classes:
        classes = list(splits.classes)
    elif classnames_spec is not None and _overridden(record, "classnames", classnames_spec):
        classes = read_classnames(classnames_spec).names
    else:
        classes = record.get("classes")
    templates = None
    if splits is not None:
        templates = resolve_templates(templates_spec, splits.template_sets())
    elif _overridden(record, "templates", templates_spec) or not record.get("templates"):
        templates = resolve_templates(templates_spec, None)
    return classes, templates or list(record.get("templates") or SIMPLE)
