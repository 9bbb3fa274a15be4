"""The README's LAION-style workflow, run as the README prints it, through the CLI on tiny data:
convert an open_clip checkpoint → shard data → fine-tune on the shards → export back to open_clip →
before/after benchmark table with the difference column.

The commands are read from README.md's code block (so the README stays runnable); the open_clip
checkpoint it converts is a random-weight build of open_clip's shipped ViT-B-32 config, cut small
(`tests/openclip_ref.py`). Training gets a few steps and a small batch appended for CPU time.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from mmtune.cli import main
from tests.openclip_ref import save_open_clip, shipped_config

FAST = ["data.batch_size=32", "train.max_steps=4", "train.progress=false"]


def _workflow() -> list[str]:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"LAION-style workflow end to end.*?```\n(.*?)```", readme, re.S)
    assert block, "README lost its LAION-style workflow block"
    return block.group(1).splitlines()


def _run(lines: list[str], cwd: Path) -> list[list[str]]:
    """Run each `mmtune …` line through the CLI, write each `cat > FILE <<'EOF'` here-document."""
    ran, it = [], iter(lines)
    for line in it:
        if heredoc := re.match(r"cat > (\S+) <<'EOF'$", line):
            body = []
            for more in it:
                if more == "EOF":
                    break
                body.append(more)
            (cwd / heredoc.group(1)).write_text("\n".join(body) + "\n")
            continue
        args = shlex.split(line, comments=True)
        if not args:
            continue
        assert args[0] == "mmtune", line
        args = args[1:] + (FAST if args[1] == "train" else [])
        assert main(args) == 0, line
        ran.append(args)
    return ran


def test_readme_workflow_converts_shards_fine_tunes_exports_and_tables(tmp_path, monkeypatch, capsys):
    """Before this test, no test trained the folder `mmtune convert open-clip` writes, nor ran the
    README's workflow (its earlier block named files no command made) as one chain."""
    monkeypatch.chdir(tmp_path)
    cfg = shipped_config("ViT-B-32", max_layers=1, width=32, heads=4, context_length=24)
    cfg["vision_cfg"].update(width=64, head_width=32, image_size=32, patch_size=8)
    cfg["embed_dim"] = 32
    save_open_clip(cfg, tmp_path / "ViT-B-32-laion")

    ran = _run(_workflow(), tmp_path)
    assert [a[0] for a in ran] == ["convert", "data", "data", "train", "export", "data", "eval"]
    printed = capsys.readouterr().out

    assert "1258 samples, 1258 good, 0 bad" in printed  # the check saw every shard of the pattern
    metrics = json.loads((tmp_path / "runs/ft/metrics.json").read_text())
    assert metrics["train.steps"] == 4 and metrics["data.shards.skipped"] == 0
    assert (tmp_path / "ft-b32/open_clip_config.json").is_file()
    table = json.loads((tmp_path / "tables/table.json").read_text())
    assert table["baseline"] == "before" and table["models"] == ["before", "after"]
    rows = {(r["benchmark"], r["metric"]): r for r in table["rows"]}
    for key in [("digits", "acc1"), ("digits-retrieval", "image_retrieval_recall@5")]:
        row = rows[key]
        assert row["diff"]["after"] == pytest.approx(row["values"]["after"] - row["values"]["before"])
    assert (tmp_path / "tables/table.md").read_text().strip() in printed
