"""Standard WebDataset shards (img2dataset, CLIP_benchmark): patterns, counts, bad members, training.

The img2dataset layout written here (`write_img2dataset`), as its `output_format="webdataset"`
writes it: a folder of `00000.tar`, `00001.tar`, … and beside each `00000_stats.json`
({"count", "successes", "failed_to_download", …}; `successes` = samples in the tar). A sample is
three members sharing a 9-digit key (shard number · 4-digit position): `000000003.jpg` (JPEG
bytes), `000000003.txt` (the caption, no newline) and `000000003.json` ({"url", "key", "status",
"caption", "width", "height", …}). No mmtune `index.json`.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmtune import api
from mmtune.cli import main
from mmtune.data.builtin.digits import digits_splits
from mmtune.data.shards import check_shards
from mmtune.data.wds import COUNTS_FILE, expand_braces, resolve


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((pixels * 16).clip(0, 255).astype(np.uint8)).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


def write_img2dataset(folder, records, per_shard: int, stats: bool = True) -> list[int]:
    """Write records as img2dataset does (layout in the module docstring); samples per shard."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = []
    for shard, start in enumerate(range(0, len(records), per_shard)):
        part = records[start : start + per_shard]
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for pos, rec in enumerate(part):
                key = f"{shard:05d}{pos:04d}"
                meta = {
                    "url": f"http://example.com/{rec.id}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "caption": rec.captions[0],
                    "width": 8,
                    "height": 8,
                }
                _add(tar, f"{key}.jpg", _jpeg(rec.image))
                _add(tar, f"{key}.txt", rec.captions[0].encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        if stats:
            s = {
                "count": len(part),
                "successes": len(part),
                "failed_to_download": 0,
                "failed_to_resize": 0,
                "start_time": 0.0,
                "end_time": 1.0,
            }
            (folder / f"{shard:05d}_stats.json").write_text(json.dumps(s))
        counts.append(len(part))
    return counts


@pytest.fixture(scope="module")
def i2d(tmp_path_factory):
    folder = tmp_path_factory.mktemp("i2d") / "shards"
    records = digits_splits(0)["train"][:240]
    return folder, write_img2dataset(folder, records, 50)


def test_brace_patterns_expand_like_bash():
    assert expand_braces("s/{00000..00003}.tar") == [f"s/0000{i}.tar" for i in range(4)]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_counts_come_from_stats_or_one_cached_pass(tmp_path, i2d, monkeypatch):
    folder, counts = i2d
    shards, classes = resolve(f"{folder}/{{00000..00004}}.tar")
    assert [s.samples for s in shards] == counts == [50, 50, 50, 50, 40] and classes is None
    bare = tmp_path / "bare"  # no stats files: counted from the tar headers, then cached
    write_img2dataset(bare, digits_splits(0)["train"][:30], 7, stats=False)
    assert [s.samples for s in resolve(bare)[0]] == [7, 7, 7, 7, 2]
    assert (bare / COUNTS_FILE).is_file()

    def no_counting(path):
        raise AssertionError(f"counted {path} again")

    monkeypatch.setattr("mmtune.data.wds.count_samples", no_counting)
    assert [s.samples for s in resolve(bare)[0]] == [7, 7, 7, 7, 2]


def test_bad_members_are_counted_by_reason_never_raised(tmp_path, capsys):
    """D10: each bad member has its reason; a cut-off tar serves what precedes the cut."""
    folder = tmp_path / "bad"
    folder.mkdir()
    good = _jpeg(np.full((8, 8), 5))
    with tarfile.open(folder / "00000.tar", "w") as tar:
        _add(tar, "a.jpg", good), _add(tar, "a.txt", b"fine")
        _add(tar, "b.txt", b"no image")  # missing image member
        _add(tar, "c.jpg", good[:40]), _add(tar, "c.txt", b"truncated jpeg")
        _add(tar, "d.webp", b"<html>"), _add(tar, "d.cls", b"3")
        _add(tar, "e.png", good), _add(tar, "e.cls", b"seven")
        _add(tar, "f.jpg", good), _add(tar, "f.json", b"{not json")
        _add(tar, "g.jpg", good)  # no text at all
    total, bad = check_shards(folder / "00000.tar")
    assert total == 7
    assert dict(bad) == {"missing": 1, "truncated": 1, "not_image": 1, "bad_cls": 1, "bad_json": 1, "missing_text": 1}
    with tarfile.open(folder / "whole.tar", "w") as tar:
        for key in "xyz":
            _add(tar, f"{key}.jpg", good + bytes(3000)), _add(tar, f"{key}.txt", b"a caption")
    whole = (folder / "whole.tar").read_bytes()
    (folder / "whole.tar").unlink()
    (folder / "00001.tar").write_bytes(whole[:8000])  # a download cut inside the second image
    total, bad = check_shards(folder)
    assert total == 8 and bad["unreadable_shard"] == 1 and bad["truncated"] == 1
    assert main(["data", "check", str(folder)]) == 1
    out = capsys.readouterr()
    assert "bad_cls" in out.out and "Traceback" not in out.err


@pytest.mark.parametrize("command", ["train", "check"])
def test_a_pattern_matching_nothing_is_one_line(tmp_path, command, capsys):
    pattern = f"{tmp_path}/nothing-{{00000..00009}}.tar"
    args = (
        ["data", "check", pattern]
        if command == "check"
        else [
            "train",
            "model.name=tiny-clip",
            f"data.shards={pattern}",
            f"output_dir={tmp_path}",
            "train.max_steps=1",
            "train.progress=false",
        ]
    )
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mmtune: error: shard pattern {pattern} matches no file"


def test_training_from_img2dataset_shards_resumes_exactly(tiny_cfg, i2d):
    folder, _ = i2d
    common = {
        "data.shards": f"{folder}/{{00000..00004}}.tar",
        "data.num_workers": 2,
        "data.augment": True,
        "data.batch_size": 16,
        "train.max_steps": 6,
        "train.deterministic": True,
    }
    straight = tiny_cfg(name="straight", **common)
    api.train(straight)
    part = tiny_cfg(name="parts", **common, **{"train.stop_after_steps": 4})
    api.train(part)
    api.train(tiny_cfg(name="parts", **common), resume="auto")
    a, b = (load_file(str(r / "checkpoints/last/model.safetensors")) for r in (straight.run_dir, part.run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = tiny_cfg(name="other", **{**common, "seed": 1})  # the data really drives training
    api.train(other)
    c = load_file(str(other.run_dir / "checkpoints/last/model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_cli_shard_writes_img2dataset_layout(tmp_path, pairs_folder, capsys):
    folder, rows = pairs_folder
    table = folder / "pairs.csv"
    table.write_text("image,caption,label\n" + "".join(f"{n},{c},{lab}\n" for n, c, lab in rows))
    out = tmp_path / "out"
    args = ["data", "shard", str(table), "-o", str(out), "--samples-per-shard", "5"]
    assert main([*args, "data.label_column=label"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    stats = [json.loads((out / f"0000{i}_stats.json").read_text())["successes"] for i in range(3)]
    assert stats == [5, 5, 2]
    with tarfile.open(out / "00000.tar") as tar:  # any tar reader, grouped by key by hand
        names = tar.getnames()
        assert {n.split(".", 1)[1] for n in names} >= {"txt", "json", "cls"}
        assert len({n.split(".", 1)[0] for n in names}) == 5
    (out / "index.json").unlink()  # standard readers need no index
    assert [s.samples for s in resolve(f"{out}/{{00000..00002}}.tar")[0]] == [5, 5, 2]


def test_data_benchmark_writes_clip_benchmarks_layout(tmp_path, capsys):
    """Read back with tarfile and Pillow alone, as CLIP_benchmark's `wds/` loader would."""
    import math

    out = tmp_path / "bench"
    args = ["data", "benchmark", "digits", "-o", str(out), "--samples-per-shard", "100"]
    assert main(args) == 0
    assert "10 classes" in capsys.readouterr().out
    from mmtune.data.builtin.digits import CLASSES, EVAL_TEMPLATES

    test = digits_splits(0)["test"]
    n = int((out / "test" / "nshards.txt").read_text())
    assert n == math.ceil(len(test) / 100)
    assert (out / "classnames.txt").read_text().splitlines() == CLASSES
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == [t.replace("{}", "{c}") for t in EVAL_TEMPLATES]
    samples = {}
    for i in range(n):
        with tarfile.open(out / "test" / f"{i}.tar") as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert list(samples) == [f"s{i:07d}" for i in range(len(test))]
    for rec, sample in zip(test, samples.values(), strict=True):
        assert int(sample["cls"]) == rec.label
        pixels = np.asarray(Image.open(io.BytesIO(sample["webp"])).convert("L"))
        assert np.array_equal(pixels, rec.image)  # lossless
    total, bad = check_shards(out / "test")  # mmtune reads it too: counted, classes found
    assert total == len(test) and not bad
    assert resolve(out / "test")[1] == CLASSES


def test_img2dataset_shards_split_by_rank_and_worker(i2d):
    """Ranks read disjoint shards; 0 and 2 loader workers give the same batches; a resumed
    stream continues at its batch."""
    from torch.utils.data import DataLoader

    from mmtune.data.images import ImageTransform
    from mmtune.data.shards import ShardStream

    def collate(items):
        return torch.tensor([it["index"] for it in items if it is not None])

    def batches(rank, world, start, workers):
        s = ShardStream(
            f"{i2d[0]}/{{00000..00004}}.tar", ImageTransform(8), collate, 10, seed=5, buffer=32, rank=rank, world=world
        )
        return list(DataLoader(s.position(1, start, 8), batch_size=None, num_workers=workers))

    r0, r1 = batches(0, 2, 0, 0), batches(1, 2, 0, 2)
    assert len(r0) == len(r1) == 8
    assert not set(torch.cat(r0).tolist()) & set(torch.cat(r1).tolist())
    again = batches(0, 2, 0, 2)
    assert all(torch.equal(a, b) for a, b in zip(r0, again, strict=True))
    rest = batches(0, 2, 3, 2)
    assert all(torch.equal(a, b) for a, b in zip(r0[3:], rest, strict=True))


def test_embed_reads_img2dataset_shards_by_pattern(tmp_path, i2d):
    """`mmtune embed --images PATTERN`: each image embeds as the same JPEG bytes do decoded by
    Pillow, with img2dataset's caption (`KEY.txt`)."""
    from mmtune.retrieval import read_embeddings
    from mmtune.runs import load_run
    from tests.test_serve import make_run

    run = make_run(tmp_path / "run")
    out = tmp_path / "e.parquet"
    pattern = f"{i2d[0]}/{{00000..00004}}.tar"
    args = ["embed", "--checkpoint", str(run), "--images", pattern, "-o", str(out)]
    assert main([*args, "--no-progress"]) == 0
    emb = read_embeddings(out, "image")
    assert len(emb.meta["path"]) == 240
    records = digits_splits(0)["train"][:240]
    assert emb.meta["caption"][:3] == [r.captions[0] for r in records[:3]]
    with tarfile.open(i2d[0] / "00000.tar") as tar:
        images = [Image.open(io.BytesIO(tar.extractfile(f"00000{i:04d}.jpg").read())) for i in range(4)]
    model, proc = load_run(run)
    with torch.no_grad():
        want = model.encode_image(proc.images(images)).numpy()
    np.testing.assert_allclose(emb.vectors[:4], want, atol=1e-5)


def _resume_cfgs(tiny_cfg, shards, **extra):
    common = {"data.shards": shards, "data.batch_size": 16, "train.max_steps": 4, **extra}
    return tiny_cfg(name="resumed", **common, **{"train.stop_after_steps": 2}), tiny_cfg(name="resumed", **common)


def test_resuming_on_another_shard_set_is_refused_naming_it(tiny_cfg, i2d, tmp_path):
    """The shard list (names and sizes in reading order) is part of the resume fingerprint. Before,
    a checkpoint streamed from 5 shards resumed silently on 4 of them (or on a rewritten shard),
    skipping or repeating samples."""
    from mmtune.errors import CheckpointError

    folder, _ = i2d
    first, rest = _resume_cfgs(tiny_cfg, f"{folder}/{{00000..00004}}.tar")
    api.train(first)
    fewer = _resume_cfgs(tiny_cfg, f"{folder}/{{00000..00003}}.tar")[1]
    with pytest.raises(CheckpointError, match=r"another shard set \(5 shards then, 4 now; 00004.tar is gone\)"):
        api.train(fewer, resume="auto")
    copy = tmp_path / "copy"  # the same names, one shard rewritten with fewer samples
    copy.mkdir()
    for i in range(5):
        (copy / f"{i:05d}.tar").write_bytes((folder / f"{i:05d}.tar").read_bytes())
    write_img2dataset(copy, digits_splits(0)["train"][:30], 30)  # rewrites 00000.tar only
    moved = _resume_cfgs(tiny_cfg, str(copy))[1]
    with pytest.raises(CheckpointError, match=r"00000.tar was \d+ bytes, now \d+"):
        api.train(moved, resume="auto")
    assert (
        main(
            [
                "train",
                "model.name=tiny-clip",
                f"output_dir={rest.output_dir}",
                "name=resumed",
                f"data.shards={copy}",
                "data.batch_size=16",
                "train.max_steps=4",
                "train.progress=false",
                "--resume",
                "auto",
            ]
        )
        == 2
    )  # one line through the CLI
    metrics = api.train(rest, resume="auto")  # the same set resumes
    assert metrics["train.steps"] == 4


def _corrupt_shards(folder, records, bad_keys):
    """Two shards of 24 samples (img2dataset's members: KEY.jpg + KEY.txt + KEY.cls); the samples
    in `bad_keys` get a JPEG cut after 40 bytes, or a `.cls` that is not a number."""
    folder.mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for pos, rec in enumerate(records[shard * 24 : (shard + 1) * 24]):
                key = f"{shard:05d}{pos:04d}"
                jpeg = _jpeg(rec.image)
                _add(tar, f"{key}.jpg", jpeg[:40] if bad_keys.get(key) == "truncated" else jpeg)
                _add(tar, f"{key}.txt", rec.captions[0].encode())
                _add(tar, f"{key}.cls", b"seven" if bad_keys.get(key) == "bad_cls" else str(rec.label).encode())


def test_streamed_bad_samples_reach_metrics_json(tiny_cfg, tmp_path):
    """Bad samples met while streaming are counted by reason in metrics.json, loader workers and a
    resume included. Before, ShardStream counted them in its own (per-worker) counter, which
    nothing read: metrics.json said data.skipped 0."""
    folder = tmp_path / "bad-shards"
    bad = {"000000003": "truncated", "000010005": "truncated", "000010020": "bad_cls"}
    _corrupt_shards(folder, digits_splits(0)["train"][:48], bad)
    _, expected = check_shards(folder)  # one pass, decoded here
    assert dict(expected) == {"truncated": 2, "bad_cls": 1}
    # 48 samples, batches of 16, 3 steps: exactly one pass over the stream
    common = {"data.shards": str(folder), "data.batch_size": 16, "train.max_steps": 3, "data.num_workers": 2}
    straight = api.train(tiny_cfg(name="straight", **common))
    api.train(tiny_cfg(name="parts", **common, **{"train.stop_after_steps": 1}))
    resumed = api.train(tiny_cfg(name="parts", **common), resume="auto")
    for metrics in (straight, resumed):
        assert metrics["data.shards.skipped"] == 3
        assert metrics["data.shards.skipped.truncated"] == 2 and metrics["data.shards.skipped.bad_cls"] == 1
    written = json.loads((tiny_cfg(name="parts").run_dir / "metrics.json").read_text())
    assert written["data.shards.skipped.truncated"] == 2
