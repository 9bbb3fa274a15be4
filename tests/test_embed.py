"""`mmtune embed`: Parquet rows equal the model's own embeddings; bad images counted; resume."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import mmtune.embed as E
from mmtune.data.images import load_image
from mmtune.retrieval import read_embeddings
from mmtune.runs import load_run
from tests.test_serve import make_images, make_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    run = make_run(root / "run")
    paths = make_images(root / "imgs", 10)
    (root / "imgs" / "broken.png").write_bytes(paths[0].read_bytes()[:50])
    (root / "imgs" / "page.jpg").write_bytes(b"<html>saved page</html>")
    (root / "imgs" / "zero.png").write_bytes(b"")
    model, proc = load_run(run)
    return root, run, paths, model, proc


def test_images_and_texts_equal_the_model_and_bad_ones_are_counted(setup, capsys):
    from mmtune.cli import main

    root, run, paths, model, proc = setup
    (root / "q.txt").write_text("a photo of the digit one\n\n   \nseven\n")
    out = root / "all.parquet"
    args = ["embed", "--checkpoint", str(run), "--images", str(root / "imgs"), "--no-progress"]
    assert main([*args, "--texts", str(root / "q.txt"), "-o", str(out)]) == 0
    assert "skipped 5" in capsys.readouterr().out
    emb = read_embeddings(out)
    assert emb.info["skipped"] == {"truncated": 1, "not_image": 1, "empty": 1, "empty_text": 2}
    img = read_embeddings(out, "image")
    assert img.meta["path"] == [str(p) for p in paths]
    assert img.meta["caption"][3] == (paths[3].with_suffix(".txt").read_text().strip())
    with torch.no_grad():
        want = model.encode_image(proc.images([load_image(p) for p in paths])).numpy()
        want_t = model.encode_text(**proc.tokenize(["a photo of the digit one", "seven"])).numpy()
    np.testing.assert_allclose(img.vectors, want, atol=1e-5)
    txt = read_embeddings(out, "text")
    assert txt.meta["caption"] == ["a photo of the digit one", "seven"]
    np.testing.assert_allclose(txt.vectors, want_t, atol=1e-5)
    schema = pq.read_schema(out)
    assert schema.field("vector").type.list_size == want.shape[1]


def test_pairs_file_source(setup):
    root, run, paths, model, proc = setup
    csv = root / "pairs.csv"
    csv.write_text("image,caption\n" + "".join(f"imgs/{p.name},cap {i}\n" for i, p in enumerate(paths[:4])))
    items = E.image_items(csv)
    assert [it.path for it in items] == [str(p) for p in paths[:4]]
    assert [it.caption for it in E.text_items(csv)] == [f"cap {i}" for i in range(4)]


def test_interrupted_run_resumes_without_redoing_saved_parts(setup, monkeypatch):
    root, run, paths, model, proc = setup
    items = E.image_items(root / "imgs")
    straight = root / "straight.parquet"
    E.embed_items(model, proc, items, straight, batch_size=2, progress=False, part_size=4)

    out = root / "resumed.parquet"
    real_write = E._write_part
    calls = []

    def crash_after_two(parts, n, table, meta):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while part 3 was computed
        calls.append(n)
        real_write(parts, n, table, meta)

    monkeypatch.setattr(E, "_write_part", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        E.embed_items(model, proc, items, out, batch_size=2, progress=False, part_size=4)
    assert not out.exists() and len(list(out.with_name(out.name + ".parts").glob("*.parquet"))) == 2
    monkeypatch.setattr(E, "_write_part", real_write)

    embedded = []
    real_chunk = E._embed_chunk

    def counting(model_, proc_, chunk, *a):
        embedded.extend(it.id for it in chunk)
        return real_chunk(model_, proc_, chunk, *a)

    monkeypatch.setattr(E, "_embed_chunk", counting)
    rep = E.embed_items(model, proc, items, out, batch_size=2, progress=False, part_size=4)
    assert rep.resumed_parts == 2
    assert embedded == [it.id for it in items[8:]]  # parts 0 and 1 were not recomputed
    a, b = read_embeddings(straight), read_embeddings(out)
    assert a.meta == b.meta and a.info["skipped"] == b.info["skipped"]
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert not out.with_name(out.name + ".parts").exists()


def test_parts_of_other_input_are_not_reused(setup):
    root, run, paths, model, proc = setup
    items = E.image_items(root / "imgs")
    out = root / "changed.parquet"
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (parts / "manifest.json").write_text('{"fingerprint": "something else"}')
    (parts / "part-00000.parquet").write_bytes(b"junk")
    rep = E.embed_items(model, proc, items, out, progress=False, part_size=4)
    assert rep.resumed_parts == 0 and rep.rows == len(paths)


def test_all_bad_is_a_clear_error(setup):
    from mmtune.errors import DataError

    root, run, paths, model, proc = setup
    items = [E.Item("image", "x", str(root / "imgs" / "zero.png"))]
    with pytest.raises(DataError, match="every item was skipped"):
        E.embed_items(model, proc, items, root / "none.parquet", progress=False)


def test_shard_folder_source_equals_the_files(setup, tmp_path):
    """Images read from tar shards (`mmtune data shard`) embed exactly as the same files do; a
    corrupt member is skipped and counted, not fatal."""
    from mmtune.cli import main
    from mmtune.data.formats import Record
    from mmtune.data.shards import write_shards

    root, run, paths, model, proc = setup
    records = [Record(str(p), [f"cap {i}"], None, p.name) for i, p in enumerate(paths[:5])]
    records.append(Record(str(root / "imgs" / "broken.png"), ["broken"], None, "broken"))
    write_shards(records, tmp_path / "shards", samples_per_shard=4)
    out = tmp_path / "s.parquet"
    args = ["embed", "--checkpoint", str(run), "--images", str(tmp_path / "shards")]
    assert main([*args, "-o", str(out), "--no-progress"]) == 0
    emb = read_embeddings(out, "image")
    assert emb.info["skipped"] == {"truncated": 1}
    assert len(emb.meta["path"]) == 5
    assert all(".tar#" in p for p in emb.meta["path"])
    assert emb.meta["caption"] == [f"cap {i}" for i in range(5)]
    with torch.no_grad():
        want = model.encode_image(proc.images([load_image(p) for p in paths[:5]])).numpy()
    np.testing.assert_allclose(emb.vectors, want, atol=1e-5)


def test_embed_takes_the_columns_it_asks_for_and_stores_absolute_paths(setup, tmp_path, monkeypatch, capsys):
    """An open_clip-style `filepath,title` CSV: the error names data.image_column, and then both the
    flags and that very `data.*` override work; paths stay valid from any other directory."""
    from mmtune.cli import main

    root, run, paths, model, proc = setup
    (root / "oc.csv").write_text(
        "filepath,title\n" + "".join(f"imgs/{p.name},cap {i}\n" for i, p in enumerate(paths[:3]))
    )
    monkeypatch.chdir(root)  # a relative source, as a user types it
    base = ["embed", "--checkpoint", str(run), "--images", "oc.csv", "--no-progress"]
    assert main([*base, "-o", str(tmp_path / "x.parquet")]) == 2
    assert "data.image_column" in capsys.readouterr().err
    assert (
        main([*base, "--image-column", "filepath", "--caption-column", "title", "-o", str(tmp_path / "a.parquet")]) == 0
    )
    args = [*base, "data.image_column=filepath", "data.caption_column=title", "-o", str(tmp_path / "b.parquet")]
    assert main(args) == 0
    a, b = read_embeddings(tmp_path / "a.parquet", "image"), read_embeddings(tmp_path / "b.parquet", "image")
    assert a.meta["path"] == b.meta["path"] == [str(p.resolve()) for p in paths[:3]]
    assert a.meta["caption"] == ["cap 0", "cap 1", "cap 2"]
    np.testing.assert_allclose(a.vectors, b.vectors, atol=0)
    assert main([*base, "train.lr=1", "-o", str(tmp_path / "c.parquet")]) == 2  # not an embed setting
