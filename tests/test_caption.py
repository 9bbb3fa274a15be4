"""Captioning through the CLI on tiny models: pairs CSV, COCO JSON, shapes; beam search; predict."""

import json
from pathlib import Path

from mmtune.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.name=tiny-clip",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.progress=false",
    "train.precision=fp32",
    "options.decoder_layers=1",
    "options.dim=32",
    "options.max_len=12",
]
KEYS = {"caption.bleu1", "caption.bleu4", "caption.rouge_l", "caption.cider"}


def _train(tmp_path, name, *extra):
    args = [
        "train",
        "-c",
        str(ROOT / "configs" / "caption-shapes.yaml"),
        f"output_dir={tmp_path}",
        f"name={name}",
        *TINY,
        *extra,
    ]
    assert main(args) == 0
    return tmp_path / name, json.loads((tmp_path / name / "metrics.json").read_text())


def test_pairs_csv_and_predict(tmp_path, pairs_folder, capsys):
    folder, rows = pairs_folder
    (folder / "pairs.csv").write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, c, _ in rows))
    run, m = _train(tmp_path, "csv", f"data.dataset={folder / 'pairs.csv'}", "data.val_fraction=0.25", "eval.split=val")
    assert m.keys() >= KEYS
    capsys.readouterr()
    img = str(folder / rows[0][0])
    assert main(["predict", "--checkpoint", str(run), "--image", img]) == 0
    assert main(["predict", "--checkpoint", str(run), "--image", img, "options.decode=beam", "options.beams=2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_coco_json_with_beam_search(tmp_path, pairs_folder):
    folder, rows = pairs_folder
    coco = {
        "images": [{"id": i, "file_name": n} for i, (n, _, _) in enumerate(rows)],
        "annotations": [{"image_id": i, "caption": c} for i, (_, c, _) in enumerate(rows)],
    }
    (folder / "caps.json").write_text(json.dumps(coco))
    _, m = _train(
        tmp_path,
        "coco",
        f"data.dataset={folder / 'caps.json'}",
        "data.val_fraction=0.25",
        "eval.split=val",
        "options.decode=beam",
        "options.beams=2",
    )
    assert m.keys() >= KEYS and all(0 <= m[k] <= 10 for k in KEYS)


def test_shapes_captions(tmp_path, monkeypatch):
    from mmtune.data.builtin import shapes

    monkeypatch.setenv("MMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(shapes.SIZES, "shapes-mini", (16, 4, 4))
    _, m = _train(tmp_path, "shapes", "data.dataset=shapes-mini")
    assert m.keys() >= KEYS
    # counted in images, not in the 20 question records each scene carries
    assert (m["data.train"], m["data.val"], m["data.test"]) == (16, 4, 4)


def test_beam_search_finds_the_best_sequence():
    """A decoder whose scores favour one sequence: beam search recovers it."""
    import torch

    from mmtune.models.fusion import TextDecoder, beam_search, greedy_decode

    torch.manual_seed(0)
    dec = TextDecoder([0, 100, 101, 102, 103, 7, 8, 9], memory_dim=4, dim=16, layers=1, heads=2, max_len=6)
    mem = torch.randn(2, 3, 4)
    g = greedy_decode(dec, mem)
    b1 = beam_search(dec, mem, beams=1, length_penalty=0.0)
    assert g == b1  # width-1 beam search is greedy search
    b4 = beam_search(dec, mem, beams=4, length_penalty=0.0)
    assert all(len(x) <= 5 for x in b4)
