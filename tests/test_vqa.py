"""VQA through the CLI on tiny models: both heads, the baseline, both formats, dialog, errors."""

import json
from pathlib import Path

import pytest

from mmtune import api
from mmtune.cli import main
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.name=tiny-clip",
    "data.batch_size=8",
    "data.eval_batch_size=32",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.progress=false",
    "train.precision=fp32",
    "options.fusion_layers=1",
    "options.fusion_dim=32",
    "options.questions_per_image=2",
]


@pytest.fixture(autouse=True)
def _small_shapes(tmp_path_factory, monkeypatch):
    from mmtune.data.builtin import shapes

    monkeypatch.setenv("MMTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setitem(shapes.SIZES, "shapes-mini", (24, 6, 6))


def _train(tmp_path, name, *extra, config="vqa-shapes.yaml"):
    args = [
        "train",
        "-c",
        str(ROOT / "configs" / config),
        f"output_dir={tmp_path}",
        f"name={name}",
        "data.dataset=shapes-mini",
        *TINY,
        *extra,
    ]
    assert main(args) == 0
    return tmp_path / name, json.loads((tmp_path / name / "metrics.json").read_text())


def _accuracy_by_predict(run: Path) -> float:
    """The run's test accuracy recomputed question by question through `predict` (no batching,
    no packing of an image's questions), scored with the official formula."""
    from mmtune.runs import open_run
    from mmtune.vqa_metrics import vqa_metrics

    task, model = open_run(run)
    records = api.build_data(task.cfg).test
    outs = task.predict(model, task.predict_inputs(records))
    answers = [o["answer"] for o in outs]
    return vqa_metrics(
        answers, [r.answers for r in records], [r.question_type for r in records], [r.answer_type for r in records]
    )["acc"]


def test_classifier_train_eval_predict(tmp_path, capsys):
    run, metrics = _train(tmp_path, "clf")
    assert {"vqa.acc", "vqa.nonrel.acc", "vqa.rel.acc", "vqa.rel.closest.acc"} <= metrics.keys()
    assert metrics["vqa.acc"] == pytest.approx(_accuracy_by_predict(run), abs=1e-9)
    assert metrics["vqa.n"] == 6 * 20
    assert (run / "tables" / "vqa_types.json").is_file()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 0
    out = capsys.readouterr().out
    assert "vqa.rel.count.acc" in out and "vqa.nonrel.shape.acc" in out
    rows = [ln.split() for ln in out.splitlines() if ln.strip()]
    again = {k: float(v) for k, v, *_ in rows if k.startswith("vqa.")}
    assert again["vqa.acc"] == pytest.approx(metrics["vqa.acc"], abs=1e-4)  # reload = same model
    img = write_image(tmp_path / "x.png", size=(75, 75))
    assert (
        main(
            ["predict", "--checkpoint", str(run), "--image", img, "--question", "what is the shape of the red object?"]
        )
        == 0
    )
    from mmtune.data.builtin.shapes import ANSWERS

    assert capsys.readouterr().out.strip() in ANSWERS


def test_shapes_cells_preset_trains_and_reloads(tmp_path, capsys):
    """The preset configs/vqa-shapes.yaml ships: conv-stem cells and word embeddings as tokens;
    its image embedding is the mean of the cells, so it differs between images."""
    import torch

    from mmtune.runs import load_run

    run, metrics = _train(tmp_path, "cells", "model.name=shapes-cells")
    model, proc = load_run(run)
    assert model.backbone.vision.config.num_hidden_layers == 0
    with torch.no_grad():
        emb = model.encode_image(torch.randn(2, 3, 75, 75))
    assert not torch.allclose(emb[0], emb[1])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 0
    assert f"{metrics['vqa.acc']:.4f}" in capsys.readouterr().out


def test_generator_head(tmp_path, capsys):
    run, metrics = _train(tmp_path, "gen", "options.head=generator", "options.decoder_layers=1")
    assert metrics["vqa.acc"] == pytest.approx(_accuracy_by_predict(run), abs=1e-9)
    spec = json.loads((run / "model" / "mmtune_model.json").read_text())["fusion"]
    assert spec["heads_spec"]["answer"]["kind"] == "decoder"
    img = write_image(tmp_path / "x.png", size=(75, 75))
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--image", img, "--question", "how many?"]) == 0


def test_baseline_without_cross_attention(tmp_path):
    run, metrics = _train(tmp_path, "mlp", "options.fusion=concat")
    spec = json.loads((run / "model" / "mmtune_model.json").read_text())["fusion"]
    assert spec["fusion"] == "concat"
    assert metrics["vqa.acc"] == pytest.approx(_accuracy_by_predict(run), abs=1e-9)


def _vqa2_files(folder: Path, split: str, n_images=4, drop_answers=False, bad_image=False):
    questions, anns = [], []
    for i in range(n_images):
        write_image(folder / f"COCO_{split}2014_{i + 1:012d}.jpg", color=(30 * i, 100, 50))
        for j in range(2):
            qid = (i + 1) * 10 + j
            questions.append(
                {
                    "question_id": qid,
                    "image_id": 99 if bad_image and i == 0 else i + 1,
                    "question": f"what colour is thing {j}?",
                }
            )
            answers = [
                {"answer": a, "answer_id": k + 1} for k, a in enumerate(["red"] * 4 + ["Red."] * 3 + ["blue"] * 3)
            ]
            anns.append(
                {
                    "question_id": qid,
                    "image_id": i + 1,
                    "question_type": "what color",
                    "answer_type": "other",
                    "answers": [] if drop_answers and qid == 11 else answers,
                }
            )
    q = folder / f"v2_OpenEnded_mscoco_{split}2014_questions.json"
    q.write_text(json.dumps({"questions": questions}))
    (folder / f"v2_mscoco_{split}2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    return q


def test_vqa_v2_format(tmp_path):
    train, val = _vqa2_files(tmp_path, "train"), _vqa2_files(tmp_path, "val")
    args = [
        "train",
        "-c",
        str(ROOT / "configs" / "vqa-shapes.yaml"),
        f"output_dir={tmp_path}",
        "name=v2",
        f"data.dataset={train}",
        f"data.val={val}",
        f"data.test={val}",
        *TINY,
        "options.curriculum_epochs=0",
    ]  # the shapes config's curriculum names shapes' types
    args[args.index("data.batch_size=8")] = "data.batch_size=2"
    assert main(args) == 0
    m = json.loads((tmp_path / "v2" / "metrics.json").read_text())
    assert m["vqa.n"] == 8 and "vqa.what color.acc" in m and "vqa.answer_type.other.acc" in m


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("drop_answers", "question 11: no answers"),
        ("bad_image", "question 10: unknown image id 99"),
    ],
)
def test_malformed_vqa_json_names_the_record(tmp_path, capsys, kind, message):
    q = _vqa2_files(tmp_path, "train", **{kind: True})
    assert main(["train", f"output_dir={tmp_path}", "task=vqa", f"data.dataset={q}", *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def _dialog_jsonl(folder: Path) -> Path:
    rows = []
    for i in range(8):
        img = Path(write_image(folder / f"d{i}.png", color=(200, 20 * i, 20))).name
        rows.append({"image": img, "question": "is it red?", "answers": ["yes"] * 3 + ["no"]})
        rows.append(
            {
                "image": img,
                "question": "and the shade?",
                "answers": "dark",
                "history": [{"question": "is it red?", "answer": "yes"}],
            }
        )
    path = folder / "dialog.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_dialog_history_reaches_the_question_encoder(tmp_path, capsys):
    from mmtune.data.vqa_formats import read_vqa
    from mmtune.models.load import preset
    from mmtune.tasks.vqa import encode_questions

    path = _dialog_jsonl(tmp_path)
    recs = read_vqa(path).records
    assert recs[1].history == ["is it red? yes"] and recs[0].history == []
    _, proc, _ = preset("tiny-clip")
    enc = encode_questions(proc, recs[:2])
    text = proc.tokenizer.decode(enc["input_ids"][1], skip_special_tokens=False)
    assert text.startswith("[CLS] and the shade? [SEP] is it red? yes [SEP]")
    for head in ("classifier", "generator"):
        args = [
            "train",
            "-c",
            str(ROOT / "configs" / "vqa-shapes.yaml"),
            f"output_dir={tmp_path}",
            f"name={head}",
            f"data.dataset={path}",
            "data.val_fraction=0.25",
            *TINY,
            f"options.head={head}",
            "options.decoder_layers=1",
            "data.batch_size=2",
            "options.curriculum_epochs=0",
        ]
        assert main(args) == 0
    img = str(tmp_path / "d0.png")
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "generator"),
                "--image",
                img,
                "--question",
                "and the shade?",
                "--history",
                "is it red? yes",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.slow
def test_pretrain_then_finetune(tmp_path, capsys):
    args = [
        "train",
        "-c",
        str(ROOT / "configs" / "pretrain-fusion-shapes.yaml"),
        f"output_dir={tmp_path}",
        "name=pre",
        "data.dataset=shapes-mini",
        *TINY[:6],
        "options.fusion_layers=1",
        "options.fusion_dim=32",
    ]
    assert main(args) == 0
    run = tmp_path / "pre"
    m = json.loads((run / "metrics.json").read_text())
    assert {"pretrain.itm_acc", "pretrain.mlm_acc", "pretrain.itc"} <= m.keys()
    spec = json.loads((run / "model" / "mmtune_model.json").read_text())["fusion"]
    assert set(spec["heads_spec"]) == {"itm", "mlm"} and spec["spatial"] is True  # the config's
    bad = [
        "train",
        "-c",
        str(ROOT / "configs" / "vqa-shapes.yaml"),
        f"output_dir={tmp_path}",
        "name=bad",
        "data.dataset=shapes-mini",
        *TINY,
        f"model.name={run}",
        "options.spatial=false",
    ]
    assert main(bad) == 2  # fine-tuning must keep the pre-trained encoder's kind
    assert "options.spatial=False does not match the loaded fusion model" in capsys.readouterr().err
    ft, m2 = _train(tmp_path, "ft", f"model.name={run}")
    spec = json.loads((ft / "model" / "mmtune_model.json").read_text())["fusion"]
    assert set(spec["heads_spec"]) == {"itm", "mlm", "vqa"}
    assert m2["vqa.acc"] == pytest.approx(_accuracy_by_predict(ft), abs=1e-9)


def test_repeated_questions_run_through_the_text_tower_once():
    import torch

    from mmtune.models.fusion import shapes_fusion_preset, text_tokens, unique_rows

    ids = torch.tensor([[101, 7, 102, 0], [101, 8, 9, 102], [101, 7, 102, 0], [101, 7, 102, 5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
    rows, inverse = unique_rows(ids, mask)
    assert sorted(rows.tolist()) == [0, 1, 3]  # row 2 repeats row 0; row 3 differs in padding ids
    assert torch.equal(ids[rows][inverse], ids) and torch.equal(mask[rows][inverse], mask)
    model, _, _ = shapes_fusion_preset(dim=32, vision_layers=1, text_layers=1)
    calls = []
    model.tower("text").register_forward_hook(lambda m, args, kw, out: calls.append(kw), with_kwargs=True)
    out = text_tokens(model, ids, mask)
    assert calls[0]["input_ids"].shape[0] == 3
    ref = model.tower("text")(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_curriculum_draws_only_its_question_types_for_its_epochs():
    from mmtune.data.vqa_formats import QARecord
    from mmtune.tasks.vqa import QuestionsDataset

    recs = [
        QARecord(image=f"i{i}.png", question=f"q{i}{t}", answers=["a"], image_id=f"i{i}", question_type=t)
        for i in range(3)
        for t in ("nonrel.shape", "rel.count")
    ]
    recs.append(QARecord(image="j.png", question="q", answers=["a"], image_id="j", question_type="rel.closest"))
    ds = QuestionsDataset(recs, None, seed=0, curriculum=(["nonrel"], 2))
    for epoch, expected in [(0, {"nonrel.shape"}), (1, {"nonrel.shape"}), (2, {"nonrel.shape", "rel.count"})]:
        ds.set_epoch(epoch)
        drawn = {q.question_type for g in range(3) for q in ds.questions(g)}
        assert drawn == expected, epoch
    assert [q.question_type for q in ds.questions(3)] == ["rel.closest"]  # none match: keeps all


def test_curriculum_types_that_match_no_question_are_refused(tmp_path, capsys):
    args = [
        "train",
        "-c",
        str(ROOT / "configs" / "vqa-shapes.yaml"),
        f"output_dir={tmp_path}",
        "name=cur",
        "data.dataset=shapes-mini",
        *TINY,
        "options.curriculum_epochs=1",
        "options.curriculum_types=[nonrelational]",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "curriculum_types ['nonrelational'] match no training question" in err
    assert "nonrel.shape" in err


def test_shapes_cells_text_tokens_start_out_saying_their_word():
    from mmtune.models.fusion import shapes_cells_preset, shapes_fusion_preset

    emb = shapes_cells_preset()[0].tower("text").embeddings
    assert emb.token_type_embeddings.weight.abs().max() == 0  # constant for every token: silent
    word, pos = emb.word_embeddings.weight.std(), emb.position_embeddings.weight.std()
    assert 0.4 < pos / word < 0.6
    plain = shapes_fusion_preset(vision_layers=0, text_layers=0)[0].tower("text").embeddings
    assert plain.token_type_embeddings.weight.abs().max() > 0  # the default is BERT's own init


def test_grid_positions_follow_the_cells_row_major():
    import torch

    from mmtune.models.fusion import grid_positions

    pos = grid_positions(26)  # [CLS] + 5×5 cells, as the conv stem flattens them
    assert pos[0].tolist() == [0.0, 0.0]
    assert pos[1].tolist() == [-1.0, -1.0] and pos[5].tolist() == [1.0, -1.0]  # x along a row
    assert pos[6].tolist() == [-1.0, -0.5] and pos[25].tolist() == [1.0, 1.0]
    assert torch.equal(grid_positions(4), torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="square grid of image tokens, got 11"):
        grid_positions(11)


def test_spatial_cross_attention_looks_near_far_or_elsewhere():
    """With content-blind queries, the spatial weights alone steer a head: a strongly negative
    distance weight → the cell where the previous block looked, a positive one → the cells
    furthest from it, a negative attention weight → anywhere but where it looked. The block
    returns where each head looked and its attention."""
    import torch

    from mmtune.models.fusion import SpatialBlock, grid_positions

    torch.manual_seed(0)
    blk = SpatialBlock(16, 2)
    torch.nn.init.zeros_(blk.q.weight)
    torch.nn.init.zeros_(blk.q.bias)
    pos = grid_positions(26)
    x, mem = torch.randn(1, 3, 16), torch.randn(1, 26, 16)
    cells = [7, 1, 25]  # both heads of the previous block looked at tokens 7, 1 and 25
    att = torch.zeros(1, 2, 3, 26)
    att[0, :, [0, 1, 2], cells] = 1.0
    before = (pos[cells].expand(1, 2, 3, 2), att)
    with torch.no_grad():
        _, (seen, _) = blk(x, None, mem, where=(pos, None))
        torch.testing.assert_close(seen, pos.mean(0).expand(1, 2, 3, 2))  # no bias: uniform
        blk.near.copy_(torch.tensor([[-5.0, 0.0], [0.0, 5.0]]))
        _, (seen, now) = blk(x, None, mem, where=(pos, before))
    torch.testing.assert_close(seen[0, 0], pos[cells], atol=1e-3, rtol=0)  # near
    assert now[0, 0, [0, 1, 2], cells].min() > 0.99
    far = seen[0, 1]
    assert far[0].tolist() == pytest.approx([1.0, 1.0], abs=1e-3)  # (-0.5, -0.5) → (1, 1)
    assert far[1].tolist() == pytest.approx([1.0, 1.0], abs=1e-3)  # (-1, -1) → (1, 1)
    assert far[2].tolist() == pytest.approx([-1.0, -1.0], abs=1e-3)  # (1, 1) → (-1, -1)
    with torch.no_grad():
        blk.near.zero_()
        blk.avoid.copy_(torch.tensor([[-5.0, 0.0], [0.0, 0.0]]))
        _, (_, now) = blk(x, None, mem, where=(pos, before))
    assert now[0, 0, [0, 1, 2], cells].max() < 1e-3  # elsewhere
    torch.testing.assert_close(now[0, 1], torch.full((3, 26), 1 / 26))  # untouched head


def test_spatial_fusion_trains_and_reloads(tmp_path, capsys):
    """options.spatial: the packed (one image, many questions) and the indexed cross-attention
    agree, and a run reloads with its spatial encoder (same accuracy from `mmtune eval`)."""
    import torch

    from mmtune.models.fusion import FusionEncoder

    torch.manual_seed(0)
    enc = FusionEncoder(8, 12, 16, 2, 2, spatial=True)
    for blk in enc.blocks:
        torch.nn.init.normal_(blk.near)
    text, img = torch.randn(6, 5, 8), torch.randn(2, 26, 12)
    index, perm = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 3, 1, 4, 2, 5])
    packed = enc(text, torch.ones(6, 5), img, index)
    indexed = enc(text[perm], torch.ones(6, 5), img, index[perm])
    torch.testing.assert_close(packed[perm], indexed, atol=1e-5, rtol=1e-5)

    run, metrics = _train(tmp_path, "spatial", "model.name=shapes-cells", "options.spatial=true")
    spec = json.loads((run / "model" / "mmtune_model.json").read_text())["fusion"]
    assert spec["spatial"] is True
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 0
    assert f"{metrics['vqa.acc']:.4f}" in capsys.readouterr().out
