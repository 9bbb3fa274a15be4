"""vlm-sft: conversation files, assistant-only labels, freezing, one step learns, LLaVA from parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtune.config import Config
from mmtune.data.conversations import ConversationRecord, as_conversation, read_conversations
from mmtune.data.vqa_formats import QARecord
from mmtune.errors import ConfigError, DataError
from mmtune.tasks import Context, get_task

ROOT = Path(__file__).resolve().parents[1]

IMG = np.zeros((32, 32, 3), dtype=np.uint8)
REPLIES = ["a red circle", "it is on the left", "two squares"]


def _task(**options):
    cfg = Config(task="vlm-sft", model={"name": "tiny-llava"}, options={"max_length": 256, **options})
    task = get_task("vlm-sft")(Context(cfg))
    torch.manual_seed(0)
    return task, task.build()


def _dialog() -> ConversationRecord:
    turns = [{"role": "system", "content": "you answer briefly"}]
    for q, a in zip(["<image>\nwhat is it", "where is it", "what else"], REPLIES, strict=True):
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return ConversationRecord(image=IMG, id="d1", messages=turns, images=[IMG])


def learnt_runs(ids, labels) -> list[list[int]]:
    """The contiguous runs of learnt (label != -100) tokens."""
    out, cur = [], []
    for t, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            out, cur = out + [cur], []
    return out + [cur] if cur else out


def test_llava_and_messages_files_read_alike(tmp_path):
    llava = [
        {
            "id": "a",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "A cat."},
                {"from": "human", "value": "Colour?"},
                {"from": "gpt", "value": "Black."},
            ],
        }
    ]
    (tmp_path / "l.json").write_text(json.dumps(llava))
    msgs = {
        "id": "a",
        "images": ["x.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat?"}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "Black."},
        ],
    }
    (tmp_path / "m.jsonl").write_text("\n" + json.dumps(msgs) + "\n")
    a, b = (
        read_conversations(tmp_path / "l.json").records[0],
        read_conversations(tmp_path / "m.jsonl").records[0],
    )
    assert a.messages == b.messages and a.images == b.images == [str(tmp_path / "x.png")]
    assert [m["role"] for m in a.messages] == ["user", "assistant", "user", "assistant"]


def test_malformed_records_name_their_line(tmp_path):
    good = {
        "image": "x.png",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
    }
    bad = {"image": "x.png", "conversations": [{"from": "robot", "value": "hi"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2"):
        read_conversations(tmp_path / "c.jsonl")
    two = {
        "images": ["x.png", "y.png"],
        "messages": [{"role": "user", "content": "<image> a"}, {"role": "assistant", "content": "b"}],
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(two) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: 1 <image> placeholders for 2 images"):
        read_conversations(tmp_path / "d.jsonl")


def test_vqa_and_caption_records_become_conversations():
    qa = as_conversation(QARecord(image=IMG, id="q", question="how many", answers=["2", "two", "2"]))
    assert [m["content"] for m in qa.messages] == ["<image>\nhow many", "2"]
    cap = as_conversation(QARecord(image=IMG, id="c", captions=["a blue square"]))
    assert [m["content"] for m in cap.messages] == ["<image>\nDescribe the image.", "a blue square"]


def test_llava_labels_are_exactly_the_assistant_replies_turn_by_turn():
    task, _ = _task()
    enc = task.encoder.encode(_dialog())
    tok = task.processor.tokenizer
    runs = learnt_runs(enc["input_ids"], enc["labels"])
    assert [tok.decode(r, skip_special_tokens=True).strip() for r in runs] == REPLIES
    assert all(r[-1] == tok.eos_token_id for r in runs)  # each reply learns to stop
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (enc["input_ids"] == image_id).sum() == 16  # (32 / 8)² patches, [CLS] dropped
    task_all, _ = _task(train_on_prompt=True)
    full = task_all.encoder.encode(_dialog())
    want = torch.where(full["input_ids"] == image_id, -100, full["input_ids"])
    assert torch.equal(full["labels"], want)


def test_cutting_an_image_is_an_error_naming_the_sample():
    task, _ = _task(max_length=8)
    with pytest.raises(DataError, match="sample d1: options.max_length=8 would cut its image tokens"):
        task.encoder.encode(_dialog())


def test_frozen_parts_stay_bit_identical_and_one_step_lowers_the_loss():
    from mmtune.models.vlm import parts

    task, model = _task(freeze_vision=True, freeze_projector=True)
    batch = task.collate([task.encoder.encode(_dialog())] * 2)
    group = parts(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trained, lr=0.5)
    losses = []
    for _ in range(2):
        loss = task.loss(model, batch)["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0]
    for n, p in model.named_parameters():
        same = torch.equal(p, before[n])
        assert same == (group[n] in ("vision", "projector")), n
    scales = _task(lr_vision=0.0, lr_projector=10.0)[0].lr_scales(model)
    assert {scales[n] for n in group if group[n] == "projector"} == {10.0}


def test_lora_trains_only_adapters_in_the_language_model():
    _, model = _task(lora_r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("language_model" in n and "lora_" in n for n in trainable)


def test_llava_composed_from_parts_keeps_their_weights_and_loads_in_plain_transformers(tmp_path):
    from transformers import (
        AutoModelForImageTextToText,
        BertTokenizerFast,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from mmtune.models.load import minilm_dir

    torch.manual_seed(1)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    vision.save_pretrained(tmp_path / "v")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "v"
    )
    tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
    tok.eos_token = tok.sep_token
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    lm.save_pretrained(tmp_path / "l")
    tok.save_pretrained(tmp_path / "l")
    task, model = _task(vision=str(tmp_path / "v"), language=str(tmp_path / "l"))
    assert torch.equal(
        model.model.vision_tower.embeddings.patch_embedding.weight, vision.embeddings.patch_embedding.weight
    )
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) + 1 and torch.equal(emb[: len(tok)], lm.get_input_embeddings().weight)
    batch = task.collate([task.encoder.encode(_dialog())])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval().save_pretrained(tmp_path / "hf")
    task.processor.save_pretrained(tmp_path / "hf")
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, plain(**inputs).logits, atol=1e-5)
    # options.vision_feature_layer: the projector reads the tower's last layer instead of LLaVA's -2
    parts = {"vision": str(tmp_path / "v"), "language": str(tmp_path / "l")}
    _, last = _task(vision_feature_layer=-1, **parts)
    assert last.config.vision_feature_layer == -1 and model.config.vision_feature_layer == -2
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        hidden = vision(pixels, output_hidden_states=True).hidden_states
        for m, layer in ((model, -2), (last, -1)):
            want = m.model.multi_modal_projector(hidden[layer][:, 1:])
            assert torch.allclose(m.model.get_image_features(pixels).pooler_output[0], want[0], atol=1e-5)
    for bad in (0, 3, -3):  # a 2-layer tower: layer 1, 2, -1 or -2 (0 and -3: its patch embeddings)
        with pytest.raises(ConfigError, match="options.vision_feature_layer"):
            _task(vision_feature_layer=bad, **parts)


def test_mmtune_train_reads_a_llava_conversations_file(tmp_path, caplog):
    """`data.dataset=FILE.json` of LLaVA records trains vlm-sft through the CLI; with no score to
    compute on free-form dialog, best is chosen by the validation loss, said in one line."""
    from mmtune.cli import main
    from tests.conftest import write_image

    rows = []
    for i in range(8):
        write_image(tmp_path / f"s{i}.png", size=(32, 32), color=(200, 30, 30) if i % 2 else (30, 30, 200))
        colour = "red" if i % 2 else "blue"
        turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour}]
        rows.append({"id": f"s{i}", "image": f"s{i}.png", "conversations": turns})
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    args = [
        "train",
        "-c",
        str(ROOT / "configs" / "tiny" / "vlm-sft.yaml"),
        f"output_dir={tmp_path}",
        "name=chat",
        f"data.dataset={tmp_path / 'chat.json'}",
        "data.val_fraction=0.25",
        "train.max_steps=2",
        "train.eval_every=1",
    ]
    with caplog.at_level("WARNING", logger="mmtune"):
        assert main(args) == 0
    assert sum("cannot be computed" in r.getMessage() for r in caplog.records) == 1
    m = json.loads((tmp_path / "chat" / "metrics.json").read_text())
    assert m["data.train"] == 6 and m["data.val"] == 2
    assert (tmp_path / "chat" / "checkpoints" / "best" / "COMPLETE").is_file()


def test_group_by_length_trains_and_a_task_without_lengths_refuses(tmp_path, capsys, tiny_cfg):
    """`data.group_by_length=true` trains vlm-sft (conversations of 1 and of 10 turns batched with
    their like); a task whose samples have no lengths says so in one line, before any step."""
    from mmtune import api
    from mmtune.cli import main
    from mmtune.data.builtin import shapes
    from mmtune.errors import ConfigError
    from tests.conftest import one_line_error

    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMTUNE_CACHE", str(cache))
        mp.setitem(shapes.SIZES, "shapes-mini", (8, 2, 2))
        args = ["train", "-c", str(ROOT / "configs" / "tiny" / "vlm-sft.yaml"), f"output_dir={tmp_path}", "name=g"]
        args += ["data.dataset=shapes-mini", "data.group_by_length=true", "data.batch_size=2", "train.max_steps=3"]
        args += ["options.turns_per_image=10", "options.describe=true", "train.eval_every=0", "train.progress=false"]
        assert main(args) == 0
    assert json.loads((tmp_path / "g" / "metrics.json").read_text())["train.steps"] == 3
    capsys.readouterr()
    with pytest.raises(ConfigError, match="data.group_by_length: the contrastive task's training samples have no"):
        api.train(tiny_cfg(**{"data.group_by_length": True, "name": "c"}))
    assert (
        main(
            [
                "train",
                "-c",
                str(ROOT / "configs" / "tiny" / "contrastive.yaml"),
                f"output_dir={tmp_path}",
                "name=c2",
                "data.group_by_length=true",
            ]
        )
        != 0
    )
    one_line_error(capsys, "data.group_by_length")
    assert not (tmp_path / "c2").exists()


def test_qlora_without_cuda_is_a_one_line_error(tmp_path, capsys):
    """options.load_in_4bit on a machine without CUDA: one line, before any data or weights."""
    from mmtune.cli import main
    from tests.conftest import one_line_error

    cfg = str(ROOT / "configs" / "tiny" / "vlm-sft.yaml")
    args = ["train", "-c", cfg, f"output_dir={tmp_path}", "name=q", "options.load_in_4bit=true", "options.lora_r=4"]
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(args) != 0
    one_line_error(capsys, "options.load_in_4bit", "CUDA")
    assert not (tmp_path / "q").exists()
