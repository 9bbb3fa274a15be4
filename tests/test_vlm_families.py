"""vlm-sft on several image-text-to-text families, each a tiny random model written as a plain
transformers folder (tests/vlm_families.py) and read back through `from_pretrained`: LLaVA (image
patches), Idefics3 (image splitting into crops + the whole image), PaliGemma (a prefix LM whose
prefix is marked by token type ids), Gemma 3 (pooled soft tokens marked by token type ids) and
Qwen2-VL and Qwen2.5-VL (dynamic resolution: every image's patches in one flat tensor with its
grid, M-RoPE)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmtune.config import Config
from mmtune.data.conversations import ConversationRecord
from mmtune.tasks import Context, get_task
from tests import vlm_families
from tests.test_vlm import learnt_runs

FAMILIES = list(vlm_families.FAMILIES)
REPLIES = ["a red circle", "it is on the left", "two squares"]
# (token, count) per image: LLaVA (32/8)² patches; Idefics3 (2×2 crops + the whole) × 4; PaliGemma
# (32/8)²; Gemma 3 (32/8)² patches pooled 2×2; Qwen2-VL: both images resized to 32 px, (32/8)²
# patches merged 2×2
IMAGE_TOKENS = {
    "llava": ("<image>", 16),
    "idefics3": ("<image>", 20),
    "paligemma": ("<image>", 16),
    "gemma3": ("<image_soft_token>", 4),
    "qwen2_vl": ("<|image_pad|>", 4),
    "qwen2_5_vl": ("<|image_pad|>", 4),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: vlm_families.build(f, root / f) for f in FAMILIES}


def image(seed: int, size=(32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def dialog(seed: int = 0, replies=REPLIES) -> ConversationRecord:
    """System + three user/assistant exchanges; images in the first and the third user turns."""
    a, b = image(seed), image(seed + 1, (40, 24))
    turns = [{"role": "system", "content": "you answer briefly"}]
    for q, r in zip(["<image>\nwhat is it", "where is it", "<image>\nwhat else"], replies, strict=True):
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return ConversationRecord(image=a, id=f"d{seed}", messages=turns, images=[a, b])


def make_task(folder, **options):
    cfg = Config(task="vlm-sft", model={"name": str(folder)}, options={"max_length": 512, **options})
    task = get_task("vlm-sft")(Context(cfg))
    torch.manual_seed(0)
    return task, task.build()


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_exactly_the_assistant_replies_turn_by_turn(folders, family):
    task, _ = make_task(folders[family])
    tok = task.processor.tokenizer
    enc = task.encoder.encode(dialog())
    runs = learnt_runs(enc["input_ids"], enc["labels"])
    assert [tok.decode(r, skip_special_tokens=True).strip() for r in runs] == REPLIES
    assert all(r[-1] == tok.eos_token_id for r in runs)  # each reply learns to stop
    token, count = IMAGE_TOKENS[family]
    image_id = tok.convert_tokens_to_ids(token)
    assert int((enc["input_ids"] == image_id).sum()) == 2 * count
    if family == "paligemma":  # prefix (bidirectional) up to the first reply, causal after it
        first = enc["labels"].ne(-100).nonzero()[0, 0]
        assert enc["token_type_ids"][:first].eq(0).all() and enc["token_type_ids"][first:].eq(1).all()
    full = make_task(folders[family], train_on_prompt=True)[0].encoder.encode(dialog())
    assert torch.equal(full["labels"], full["input_ids"].masked_fill(full["input_ids"] == image_id, -100))
    if family == "gemma3":  # token type 1: exactly the image's soft tokens
        assert torch.equal(enc["token_type_ids"].bool(), enc["input_ids"] == image_id)
    if family == "idefics3":  # crops of both images in one sample: (1, 2 × 5 crops, 3, 16, 16)
        assert enc["pixel_values"].shape == (1, 10, 3, 16, 16)
    if family.startswith("qwen"):  # both images' 16 patches of 2 × 3 × 8 × 8 values, one (t, h, w) grid each
        assert enc["pixel_values"].shape == (32, 384) and enc["image_grid_thw"].tolist() == [[1, 4, 4]] * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_lowers_the_loss_and_frozen_parts_stay_bit_identical(folders, family):
    from mmtune.models.vlm import parts

    task, model = make_task(folders[family], freeze_vision=True, freeze_projector=True)
    other = dialog(5, ["blue", "at the top", "one triangle"])
    batch = task.collate([task.encoder.encode(dialog()), task.encoder.encode(other)])
    group = parts(model)
    assert {"vision", "projector", "language"} <= set(group.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = task.loss(model, batch)["loss"]
    opt.zero_grad()
    first.backward()
    opt.step()
    assert task.loss(model, batch)["loss"].item() < first.item()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (group[n] != "language"), n


def greedy(task, model, rec, n: int = 6) -> list[int]:
    from mmtune.tasks.vlm_sft import collate_encoded

    pad = task.processor.tokenizer.pad_token_id
    batch = inputs(collate_encoded([task.encoder.encode(rec, generation=True)], pad))
    with torch.no_grad():  # every token, the end of sequence and what follows it included
        out = model.eval().generate(**batch, max_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=pad)
    return out[0, batch["input_ids"].shape[1] :].tolist()


def nudge(model, seed: int = 3) -> None:
    """Move every weight a little (and LoRA's B off zero) so nothing equals its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_generates_the_same_tokens(folders, family, tmp_path):
    """Through the task's save/load and the engine's weights file, and through plain
    `save_pretrained` / `AutoModelForImageTextToText.from_pretrained`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    from mmtune.checkpoint import state_dict_for_save

    task, model = make_task(folders[family])
    nudge(model)
    rec = dialog(2)
    want = greedy(task, model, rec)
    assert len(want) == 6
    task.save(model, tmp_path / "spec")
    save_file(state_dict_for_save(model), str(tmp_path / "w.safetensors"))  # as the engine writes it
    again = get_task("vlm-sft")(task.ctx)
    reloaded = again.load(tmp_path / "spec")
    again.load_weights(reloaded, tmp_path / "w.safetensors")
    assert greedy(again, reloaded, rec) == want
    model.save_pretrained(tmp_path / "hf")
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    assert greedy(task, plain, rec) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_lora_generates_as_the_unmerged_model(folders, family):
    from mmtune.export import plain_copy

    task, model = make_task(folders[family], lora_r=4)
    nudge(model)
    rec = dialog(4)
    batch = inputs(task.collate([task.encoder.encode(rec, generation=True)]))
    merged, n = plain_copy(model)
    assert n > 0 and not any("lora_" in name for name, _ in merged.named_parameters())
    base = copy.deepcopy(model)
    for name, p in base.named_parameters():
        if "lora_B" in name:
            p.data.zero_()
    with torch.no_grad():
        got, want, without = (m.eval()(**batch).logits for m in (merged, model.eval(), base.eval()))
    assert (want - without).abs().max() > 1e-3  # the adapters do change the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert greedy(task, merged, rec) == greedy(task, model, rec)


@pytest.mark.parametrize("family", FAMILIES)
def test_length_grouping_knows_each_conversations_length(folders, family):
    """`data.group_by_length` orders by `lengths()`: the encoded lengths, without encoding each."""
    from mmtune.tasks.vlm_sft import ConversationDataset

    task, _ = make_task(folders[family])
    short = [{"role": "user", "content": "<image>\nwhat"}, {"role": "assistant", "content": "a dot"}]
    convs = [dialog(0), dialog(5, ["yes", "no", "a long answer with many more words in it"])]
    convs.append(ConversationRecord(image=image(9), id="s", messages=short, images=[image(9)]))
    ds = ConversationDataset(convs, task.encoder)
    exact = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert len(set(exact)) == 3
    if family == "idefics3":  # image tokens depend on each image's crops: a proxy, in the same order
        assert sorted(range(3), key=ds.lengths().__getitem__) == sorted(range(3), key=exact.__getitem__)
    else:
        assert ds.lengths() == exact


def test_qwen2_vl_processor_saves_the_full_layout_and_reads_back(folders, tmp_path):
    """Without torchvision Qwen2-VL's processor is built for images alone; saved, its folder still
    names `Qwen2VLProcessor` with a `video_processor` entry (what `AutoProcessor` reads where
    torchvision is installed), and `load_vlm_processor` reads it back to the same ids and pixels."""
    import json

    from mmtune.models.vlm import has_torchvision, load_vlm_processor

    task, _ = make_task(folders["qwen2_vl"])
    task.processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor"
    assert saved["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert saved["video_processor"]["merge_size"] == saved["image_processor"]["merge_size"] == 2
    again = load_vlm_processor(tmp_path)
    assert has_torchvision() or type(again).__name__ == "ImageOnlyQwen2VLProcessor"
    want = task.encoder.encode(dialog())
    got = get_task("vlm-sft")(task.ctx)
    got.processor = again
    got = got.encoder.encode(dialog())
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
