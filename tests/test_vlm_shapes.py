"""The `vlm-shapes` demo's parts: the scenes' word tokenizer and language model, a LLaVA composed
from an mmtune run's image tower, multi-turn scenes, caption turns and batched evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmtune.config import Config
from mmtune.data.builtin import shapes
from mmtune.errors import ConfigError
from mmtune.tasks import Context, get_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_shapes(tmp_path, monkeypatch):
    """`shapes` and `shapes-mini` cut to 12 / 4 / 4 scenes, cached under tmp_path."""
    monkeypatch.setenv("MMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(shapes.SIZES, "shapes", (12, 4, 4))
    monkeypatch.setitem(shapes.SIZES, "shapes-mini", (12, 4, 4))


def test_scene_tokenizer_covers_the_scenes_and_decodes_them_back(small_shapes):
    from mmtune.models.scene_lm import scene_conversations, word_tokenizer

    tok = word_tokenizer()
    for turns in scene_conversations("train")[:4]:
        for t in turns:
            ids = tok(t["content"], add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == t["content"]  # captions' commas and full stops included
    assert tok("a purple circle", add_special_tokens=False)["input_ids"][1] == tok.unk_token_id
    chat = tok.apply_chat_template(scene_conversations("train")[0][:2], tokenize=False)
    assert chat.startswith("USER: Describe the image.\nASSISTANT: a red ") and chat.endswith("</s>\n")


def test_scene_lm_learns_and_loads_in_plain_transformers(tmp_path, small_shapes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmtune.models.scene_lm import main

    main([str(tmp_path / "lm"), "--steps", "4", "--batch-size", "4", "--hidden", "32", "--layers", "1"])
    summary = json.loads((tmp_path / "lm" / "train.json").read_text())
    assert summary["steps"] == 4 and summary["loss"] < summary["first_loss"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert "<image>" in tok.get_vocab() and "ASSISTANT" in tok.chat_template
    assert lm.config.vocab_size == len(tok) and summary["params"] == sum(p.numel() for p in lm.parameters())


def _train(cfg_file: Path, out: Path, name: str, *more: str) -> Path:
    from mmtune.cli import main

    args = ["train", "-c", str(cfg_file), f"output_dir={out}", f"name={name}", "train.progress=false", *more]
    assert main(args) == 0
    return out / name


def _parts(tmp_path) -> tuple[Path, Path]:
    """The shipped vision config (2 steps) and a 2-step scene LM: what configs/vlm-shapes.yaml composes."""
    from mmtune.models.scene_lm import train_scene_lm

    vision = _train(
        ROOT / "configs" / "vlm-shapes-vision.yaml",
        tmp_path,
        "vision",
        "train.max_steps=2",
        "data.batch_size=8",
        "train.eval_every=0",
    )
    train_scene_lm(tmp_path / "lm", steps=2, batch_size=4, hidden=32, layers=1, heads=2, log=lambda _: None)
    return vision, tmp_path / "lm"


def test_llava_composed_from_an_mmtune_runs_image_tower(tmp_path, small_shapes):
    from mmtune.runs import load_run

    vision, lm = _parts(tmp_path)
    cfg = Config(task="vlm-sft", options={"vision": str(vision), "language": str(lm), "max_length": 320})
    task = get_task("vlm-sft")(Context(cfg))
    model = task.build()
    tower, processor = load_run(vision)
    want = tower.hf.vision_model.state_dict()
    got = model.model.vision_tower.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert task.processor.image_processor.crop_size == {"height": 72, "width": 72}
    assert list(task.processor.image_processor.image_mean) == list(processor.image_mean)
    # a scene becomes 36 image tokens (6×6 patches of 12 px), and the tokenizer is the scene LM's
    rec = shapes.shapes_splits("shapes")["train"][0]
    from mmtune.data.conversations import as_conversation

    enc = task.encoder.encode(as_conversation(rec))
    assert (enc["input_ids"] == task.processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 36
    tok = task.processor.tokenizer
    learnt = enc["input_ids"][enc["labels"] != -100].tolist()
    assert tok.decode(learnt[:-1]) == rec.answers[0] and learnt[-1] == tok.eos_token_id


def test_a_run_without_a_clip_image_tower_is_a_one_line_error(tmp_path, small_shapes):
    run = _train(
        ROOT / "configs" / "tiny" / "contrastive.yaml",
        tmp_path,
        "lit",
        "model.name=lit-minilm",
        "train.max_steps=1",
        "train.eval_every=0",
        "data.dataset=shapes-mini",
    )
    _, lm = _parts(tmp_path)
    cfg = Config(task="vlm-sft", options={"vision": str(run), "language": str(lm)})
    with pytest.raises(ConfigError, match="not a CLIP/SigLIP one") as err:
        get_task("vlm-sft")(Context(cfg)).build()
    assert "\n" not in str(err.value)


def _tiny(**options):
    cfg = Config(
        task="vlm-sft",
        model={"name": "tiny-llava"},
        data={"eval_batch_size": 4},
        options={"max_length": 512, **options},
    )
    task = get_task("vlm-sft")(Context(cfg))
    torch.manual_seed(0)
    return task, task.build()


def test_turns_per_image_and_describe_make_scene_conversations(small_shapes):
    from tests.test_vlm import learnt_runs

    records = shapes.shapes_splits("shapes")["train"][:40]  # two scenes, 20 questions each
    task, _ = _tiny(turns_per_image=8, describe=True)
    convs = task.conversations(records, train=True)
    # per scene: one caption conversation and ceil(20 / 8) = 3 question conversations
    assert len(convs) == 8
    assert sorted(len(c.messages) // 2 for c in convs) == [1, 1, 4, 4, 8, 8, 8, 8]
    tok = task.processor.tokenizer
    for scene in ("train-0", "train-1"):
        mine = [c for c in convs if c.id.startswith(scene + "-") or c.id == f"{scene}:caption"]
        asked = [r for r in records if r.image_id == scene]
        answers = sorted(m["content"] for c in mine if not c.id.endswith("caption") for m in c.messages[1::2])
        assert answers == sorted(r.answers[0] for r in asked)  # every question once
        caption = next(c for c in mine if c.id.endswith(":caption"))
        assert caption.messages[1]["content"] == asked[0].captions[0]
    for conv in convs:
        text = "".join(m["content"] for m in conv.messages)
        assert text.count("<image>") == 1 and len(conv.images) == 1
        enc = task.encoder.encode(conv)
        replies = [tok.decode(r, skip_special_tokens=True) for r in learnt_runs(enc["input_ids"], enc["labels"])]
        assert [r.replace(" ", "") for r in replies] == [m["content"].replace(" ", "") for m in conv.messages[1::2]]
    for conv in convs:  # no conversation asks a question twice
        questions = [m["content"].replace("<image>\n", "") for m in conv.messages[::2]]
        assert len(set(questions)) == len(questions)
    # evaluation keeps one question a conversation (and captions per scene)
    assert len(task.conversations(records, train=False)) == 40 + 2
    same = task.conversations(records, train=True)
    assert [c.id for c in same] == [c.id for c in convs]  # seeded


def test_curriculum_asks_only_its_question_types_first(small_shapes):
    """options.curriculum_types/epochs: in the early epochs every question turn of a scene's
    conversations is of the curriculum's types (each scene keeps as many conversations, so an
    epoch keeps its length), captions stay; from curriculum_epochs on, all types come back.
    Types that match no question are a one-line config error."""
    records = shapes.shapes_splits("shapes")["train"]
    task, _ = _tiny(turns_per_image=5, describe=True, curriculum_types=["nonrel"], curriculum_epochs=2)
    kind = {r.question: r.question_type for r in records} | {"Describe the image.": "caption"}

    def asked(ds) -> tuple[set, int]:
        types = {kind[m["content"].replace("<image>\n", "")] for c in ds.records for m in c.messages[:-1:2]}
        captions = sum(c.messages[0]["content"].endswith("Describe the image.") for c in ds.records)
        return {t.split(".")[0] for t in types} - {"caption"}, captions

    ds = task.dataset(records, train=True)
    full = len(task.conversations(records, train=True))
    assert len(ds) == full == 12 * (20 // 5 + 1)  # 4 question conversations + 1 caption a scene
    for epoch, want in ((0, {"nonrel"}), (1, {"nonrel"}), (2, {"nonrel", "rel"}), (0, {"nonrel"})):
        ds.set_epoch(epoch)
        types, captions = asked(ds)
        assert types == want and captions == 12 and len(ds) == full
    assert len(ds.lengths()) == full
    evaluation = task.dataset(records, train=False)  # the curriculum is a training matter
    assert not evaluation.early_epochs
    task, _ = _tiny(curriculum_types=["spatial"], curriculum_epochs=1)
    with pytest.raises(ConfigError, match=r"curriculum_types \['spatial'\] match no training question") as err:
        task.dataset(records, train=True)
    assert "\n" not in str(err.value)


def test_batched_evaluation_answers_as_one_at_a_time(small_shapes):
    records = shapes.shapes_splits("shapes")["test"][:10]
    task, model = _tiny(max_new_tokens=5, describe=True)
    with torch.no_grad():
        for p in model.parameters():  # a random model that says different things to different prompts
            p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    from mmtune.data.conversations import as_conversation

    convs = [as_conversation(r) for r in records]
    lengths = {len(task.encoder.encode(c, generation=True)["input_ids"]) for c in convs}
    assert len(lengths) > 1  # prompts of several lengths: left padding is exercised
    batched = task.replies(model, convs)
    single = [task.reply(model, c) for c in convs]
    assert batched == single and len(set(single)) > 1
    m = task.evaluate(model, records).metrics
    assert m["vqa.n"] == 10 and "caption.bleu4" in m  # one caption per scene of the questions


def _stage1(tmp_path, vision: Path, lm: Path) -> Path:
    """configs/vlm-shapes-stage1.yaml as shipped on its parts, two steps on the smallest scenes."""
    return _train(
        ROOT / "configs" / "vlm-shapes-stage1.yaml",
        tmp_path,
        "s1",
        f"options.vision={vision}",
        f"options.language={lm}",
        "data.dataset=shapes-mini",
        "data.batch_size=4",  # 12 training scenes: 12 captions
        "train.max_steps=2",
    )


def test_shipped_vlm_shapes_config_trains(tmp_path, small_shapes):
    """configs/vlm-shapes.yaml as shipped, from its stage-1 run (built above from the shipped
    recipes), on the smallest scenes for two steps: questions and captions are both scored."""
    vision, lm = _parts(tmp_path)
    one = _stage1(tmp_path, vision, lm)
    run = _train(
        ROOT / "configs" / "vlm-shapes.yaml",
        tmp_path,
        "v",
        f"model.name={one}",
        "data.dataset=shapes-mini",
        "train.max_steps=2",
    )
    m = json.loads((run / "metrics.json").read_text())
    assert m["train.steps"] == 2 and "vqa.rel.acc" in m and "caption.bleu4" in m
    assert m["model.trainable_params"] == m["model.total_params"]  # vision unfrozen: every part learns
    # make vlm-shapes' last step: the stages' seconds into the LLaVA's metrics.json
    for name, src in (("vlm-shapes-vision", vision), ("vlm-shapes-stage1", one), ("vlm-shapes", run)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.json").write_text((src / "metrics.json").read_text())
    (tmp_path / "runs" / "vlm-shapes-parts" / "lm").mkdir(parents=True)
    (tmp_path / "runs" / "vlm-shapes-parts" / "lm" / "train.json").write_text((lm / "train.json").read_text())
    import subprocess
    import sys

    script = ROOT / "bench" / "vlm_shapes.py"
    subprocess.run([sys.executable, str(script), "--runs", str(tmp_path / "runs")], check=True, capture_output=True)
    total = json.loads((tmp_path / "runs" / "vlm-shapes" / "metrics.json").read_text())
    parts = [total[f"parts.{k}.train_seconds"] for k in ("vision", "language", "stage1")]
    assert total["train.total_seconds"] == round(sum(parts) + m["train.seconds"], 1)


def test_describe_only_keeps_the_caption_conversations(small_shapes):
    records = shapes.shapes_splits("shapes")["train"][:40]  # two scenes
    task, model = _tiny(describe="only", max_new_tokens=3)
    convs = task.conversations(records, train=True)
    assert [c.id for c in convs] == ["train-0:caption", "train-1:caption"]
    assert task.conversations(records, train=False) == convs
    m = task.evaluate(model.eval(), records).metrics
    assert "caption.bleu4" in m and not any(k.startswith("vqa.") for k in m)


def test_shipped_two_stage_recipe_trains_the_projector_then_lora(tmp_path, small_shapes):
    """configs/vlm-shapes-stage1.yaml then -stage2.yaml as shipped (two steps each): stage 1 moves
    the projector alone; stage 2 starts from stage 1's weights and adds LoRA to the language model."""
    from mmtune.models.vlm import parts
    from mmtune.runs import load_run

    vision, lm = _parts(tmp_path)
    composed = get_task("vlm-sft")(
        Context(Config(task="vlm-sft", options={"vision": str(vision), "language": str(lm)}))
    )
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in composed.build().state_dict().items()}
    one = _stage1(tmp_path, vision, lm)
    m1 = json.loads((one / "metrics.json").read_text())
    assert "caption.bleu4" in m1 and not any(k.startswith("vqa.") for k in m1)
    stage1, _ = load_run(one)
    after = stage1.state_dict()
    kind = parts(stage1)
    moved = {kind.get(k, k) for k in after if not torch.equal(after[k], before[k])}
    assert moved == {"projector"}  # vision and language bit-identical
    two = _train(
        ROOT / "configs" / "vlm-shapes-stage2.yaml",
        tmp_path,
        "s2",
        f"model.name={one}",
        "data.dataset=shapes-mini",
        "train.max_steps=1",
        "options.freeze_projector=true",  # then every weight but LoRA's is stage 1's
    )
    m2 = json.loads((two / "metrics.json").read_text())
    assert "vqa.rel.acc" in m2 and m2["model.trainable_params"] < m2["model.total_params"]
    stage2, _ = load_run(two)
    assert any("lora_" in n for n, _ in stage2.named_parameters())  # LoRA on the language model
    got = {k.replace(".base_layer", ""): v for k, v in stage2.state_dict().items() if "lora_" not in k}
    assert got.keys() == after.keys() and all(torch.equal(got[k], after[k]) for k in after)
    assert any(not torch.equal(after[k], before[k]) for k in after)  # … not the composed start


def test_a_run_of_another_task_as_model_name_is_a_one_line_error(tmp_path, small_shapes):
    vision, _ = _parts(tmp_path)
    cfg = Config(task="vlm-sft", model={"name": str(vision)})
    with pytest.raises(ConfigError, match="contrastive run, not a vlm-sft one") as err:
        get_task("vlm-sft")(Context(cfg)).build()
    assert "\n" not in str(err.value)


def test_relation_diagnosis_reads_gap_majority_and_runner_up():
    """bench/vlm_shapes_relations.py: on a hand-made scene, the gap between the two nearest (or
    furthest) objects, the shape most of the other five have, and whether the runner-up differs."""
    import numpy as np
    from bench.vlm_shapes_relations import distance_row

    centres = np.array([[10, 10], [20, 10], [10, 24], [60, 60], [40, 10], [10, 50]])
    shapes_ = np.array([0, 1, 0, 0, 0, 1])  # object 0 (red) a circle; the others: 3 circles, 2 squares
    closest = distance_row(3, 0, centres, shapes_)  # nearest: 1 at 10 px (square), then 2 at 14 (circle)
    assert closest == {"gap": 4.0, "majority": "circle", "runner_up_differs": True}
    furthest = distance_row(4, 0, centres, shapes_)  # furthest: 3 at 70.7 px (circle), then 5 at 40 (square)
    assert furthest["gap"] == pytest.approx(np.hypot(50, 50) - 40.0) and furthest["runner_up_differs"]
    assert shapes.answer(3, 0, centres, shapes_) == "square" and shapes.answer(4, 0, centres, shapes_) == "circle"


def test_a_conversation_never_asks_a_question_twice(small_shapes):
    """pack_distinct: first fit into at most N conversations of at most T turns; a repeat goes to
    the next conversation that has room and lacks it, and is left out where none does."""
    from mmtune.data.vqa_formats import QARecord
    from mmtune.tasks.vlm_sft import pack_distinct

    recs = [QARecord(image=None, id=str(k), question=q, answers=["x"]) for k, q in enumerate("abacaa")]
    packed = pack_distinct(recs, conversations=2, turns=3)
    assert [[r.id for r in c] for c in packed] == [["0", "1", "3"], ["2"]]  # 4 and 5: a third and fourth "a"
    assert [[r.id for r in c] for c in pack_distinct(recs[:4], 4, 1)] == [["0"], ["1"], ["2"], ["3"]]
    # the built-in scenes draw 10 of 18 (kind, colour) questions of each family with replacement:
    # on the full train split ~1 in 10 question turns repeated an earlier one of its conversation
    # (1 in 5 in a curriculum epoch); now none does, and every distinct question is still asked
    records = shapes.shapes_splits("shapes")["train"]
    scenes = {r.image_id for r in records}
    assert sum(20 - len({r.question for r in records if r.image_id == s}) for s in scenes) > 0  # repeats exist
    task, _ = _tiny(turns_per_image=10)
    for types in ((), ("nonrel",)):
        convs = task.conversations(records, train=True, types=types)
        assert len(convs) == 2 * len(scenes)
        for scene in scenes:
            mine = [c for c in convs if c.id.startswith(scene + "-")]
            asked = [m["content"].replace("<image>\n", "") for c in mine for m in c.messages[::2]]
            for c in mine:
                qs = [m["content"] for m in c.messages[::2]]
                assert len(set(qs)) == len(qs)
            kinds = types or ("",)
            want = {r.question for r in records if r.image_id == scene and r.question_type.startswith(kinds)}
            assert set(asked) == want
