"""`mmtune export RUN --format hf` of vlm-sft runs: LoRA merged, one folder that plain transformers
loads (`AutoModelForImageTextToText` + `AutoProcessor`) with the training chat template, and that
generates the run's tokens greedily for the same prompt. The reference side uses only transformers:
the processor's own chat template and call, then `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmtune.cli import main
from mmtune.data.conversations import ConversationRecord
from mmtune.data.images import load_image
from tests import vlm_families
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[1]


def conversations(folder: Path) -> Path:
    rows = []
    for i in range(6):
        colour = "red" if i % 2 else "blue"
        write_image(folder / f"s{i}.png", size=(32, 32), color=(200, 30, 30) if i % 2 else (30, 30, 200))
        turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour}]
        rows.append({"id": f"s{i}", "image": f"s{i}.png", "conversations": turns})
    (folder / "chat.json").write_text(json.dumps(rows))
    return folder / "chat.json"


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2_vl"])
def test_export_hf_merges_lora_and_generates_the_runs_tokens(tmp_path, family):
    """(Qwen2-VL's processor needs torchvision for its video half: without it the folder's processor
    is read by mmtune's `load_vlm_processor`, images only; the model by plain transformers.)"""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmtune.models.vlm import has_torchvision, load_vlm_processor
    from mmtune.runs import open_run
    from mmtune.tasks.vlm_sft import collate_encoded

    base = vlm_families.build(family, tmp_path / "base")
    data = conversations(tmp_path)
    args = ["train", "-c", str(ROOT / "configs" / "tiny" / "vlm-sft.yaml"), f"output_dir={tmp_path}", "name=run"]
    args += [f"model.name={base}", f"data.dataset={data}", "data.val_fraction=0.34", "train.max_steps=3"]
    args += ["train.lr=0.01", "train.eval_every=0", "options.lora_r=4"]
    assert main(args) == 0
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "-o", str(out)]) == 0
    assert "adapter layers merged" in (out / "README.md").read_text()

    task, model = open_run(tmp_path / "run")  # the in-run model, adapters unmerged
    image = load_image(tmp_path / "s1.png")
    rec = ConversationRecord(
        image=str(tmp_path / "s1.png"),
        id="q",
        messages=[{"role": "user", "content": "<image>\nWhat colour is it?"}],
        images=[str(tmp_path / "s1.png")],
    )
    enc = collate_encoded([task.encoder.encode(rec, generation=True)], task.processor.tokenizer.pad_token_id)
    enc.pop("labels")
    with torch.no_grad():
        want = model.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=task.processor.tokenizer.pad_token_id
        )
    want = want[0, enc["input_ids"].shape[1] :].tolist()

    plain_processor = has_torchvision() or family != "qwen2_vl"
    processor = AutoProcessor.from_pretrained(out) if plain_processor else load_vlm_processor(out)
    plain = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    assert processor.chat_template == task.processor.chat_template
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour is it?"}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], enc["input_ids"])  # the same prompt as in training
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        got = plain.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        logits = plain(**inputs).logits, model(**enc).logits
    assert got[0, n:].tolist() == want and want  # (it may stop early: the end token is greedy too)
    torch.testing.assert_close(*logits, atol=1e-5, rtol=1e-4)
