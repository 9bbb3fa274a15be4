"""Models: one vocabulary, composed towers, save → reload identity, freezing, the text cache."""

import math

import pytest
import torch
from torch import nn

from mmtune.checkpoint import save_checkpoint
from mmtune.config import ModelConfig
from mmtune.errors import CheckpointError, ConfigError
from mmtune.models import (
    DualEncoder,
    build_from_spec,
    count_parameters,
    freeze_tower,
    load_model,
    load_weights,
    save_spec,
)


def test_dual_encoder_from_two_linear_layers():
    torch.manual_seed(0)
    m = DualEncoder(nn.Linear(12, 6), nn.Embedding(50, 5), 6, 5, 4, "none", "mean")
    img = m.encode_image(torch.randn(3, 12))
    txt = m.encode_text(torch.randint(0, 50, (3, 7)), torch.ones(3, 7, dtype=torch.long))
    assert img.shape == txt.shape == (3, 4)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3))
    # mean pooling honours the mask: padding tokens do not change the embedding
    ids = torch.tensor([[1, 2, 3, 0, 0]])
    short = m.encode_text(ids[:, :3], torch.ones(1, 3, dtype=torch.long))
    padded = m.encode_text(ids, torch.tensor([[1, 1, 1, 0, 0]]))
    assert torch.allclose(short, padded, atol=1e-6)


def test_logit_scale_starts_at_clip_value_and_is_clamped():
    m = DualEncoder(nn.Linear(4, 4), nn.Embedding(9, 4), 4, 4, 4, "none", "mean")
    assert math.isclose(float(m.scale().detach()), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert float(m.scale().detach()) == 100.0


@pytest.mark.parametrize("name", ["tiny-clip", "lit-minilm", "shapes-fusion", "shapes-cells"])
def test_save_reload_gives_identical_embeddings(tmp_path, name):
    model, proc = load_model(ModelConfig(name=name))
    model.eval()
    save_spec(model, proc, tmp_path / "model")
    save_checkpoint(tmp_path / "ckpt", model)
    again, proc2, _ = build_from_spec(tmp_path / "model")
    load_weights(again, tmp_path / "ckpt" / "model.safetensors")
    again.eval()
    px = torch.randn(2, 3, proc.image_size, proc.image_size)
    tok = proc2.tokenize(["a photo of the number three.", "seven"])
    # equal up to the attention kernel (a preset may pick eager; a reload takes the default)
    torch.testing.assert_close(model.encode_image(px), again.encode_image(px), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.encode_text(**tok), again.encode_text(**tok), rtol=0, atol=1e-6)
    assert again.text_locked == model.text_locked


def test_lit_minilm_locks_text_and_caches_features():
    model, proc = load_model(ModelConfig(name="lit-minilm"))
    trainable, total = count_parameters(model)
    text_params = sum(p.numel() for p in model.tower("text").parameters())
    assert model.text_locked and trainable == total - text_params
    calls = []
    model.tower("text").register_forward_hook(lambda *a: calls.append(1))
    tok = proc.tokenize(["a seven", "a two", "a seven"])
    first = model.encode_text(**tok)
    second = model.encode_text(**tok)
    assert len(calls) == 1  # the second call came from the cache
    assert torch.equal(first, second)
    # cached features equal a direct computation of the tower
    model.lock_text(False)
    model.eval()
    assert torch.allclose(model.encode_text(**tok), first, atol=1e-5)


def test_freezing_top_k_blocks_and_patterns():
    model, _ = load_model(ModelConfig(name="tiny-clip", lock_image=True, unfreeze_top_k=1))
    layers = model.tower("vision").encoder.layers
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    with pytest.raises(ConfigError, match="has 2 blocks"):
        freeze_tower(model, "vision", 3)
    with pytest.raises(ConfigError, match="matches no parameter"):
        load_model(ModelConfig(name="tiny-clip", freeze=["nothing.like.this*"]))
    m2, _ = load_model(ModelConfig(name="tiny-clip", freeze=["hf.text_model.*"]))
    assert not any(p.requires_grad for p in m2.tower("text").parameters())


def test_transformers_checkpoint_folder_loads_and_non_dual_is_refused(tmp_path):
    model, proc = load_model(ModelConfig(name="tiny-clip"))
    model.hf.save_pretrained(tmp_path / "clip")
    proc.tokenizer.save_pretrained(tmp_path / "clip")
    again, _ = load_model(ModelConfig(name=str(tmp_path / "clip")))
    px = torch.randn(1, 3, 16, 16)
    model.eval(), again.eval()
    assert torch.allclose(model.encode_image(px), again.encode_image(px), atol=1e-6)
    model.hf.vision_model.save_pretrained(tmp_path / "vision_only")
    with pytest.raises(CheckpointError, match="not a dual encoder"):
        load_model(ModelConfig(name=str(tmp_path / "vision_only")))


def test_checkpoint_folder_without_tokenizer_files_is_refused(tmp_path):
    model, _ = load_model(ModelConfig(name="tiny-clip"))
    model.hf.save_pretrained(tmp_path / "clip")  # config + weights, no tokenizer
    with pytest.raises(CheckpointError) as e:
        load_model(ModelConfig(name=str(tmp_path / "clip")))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'clip'}: no tokenizer files") and "vocab.json" in msg
    assert "\n" not in msg


def test_pickled_weights_that_run_code_are_refused(tmp_path):
    """S1: a transformers folder whose only weights are a pytorch_model.bin pickle that would
    create a file → refused with our error (safetensors only); the file is never created."""
    model, _ = load_model(ModelConfig(name="tiny-clip"))
    model.hf.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    marker = tmp_path / "ran.txt"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"vision_model.embeddings.patch_embedding.weight": Evil()}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ModelConfig(name=str(tmp_path / "m")))
    assert not marker.exists()


def test_remote_code_checkpoint_refused_without_opt_in(tmp_path):
    """S3: a folder with auto_map + modeling_*.py is refused unless trust_remote_code is set;
    its code never runs."""
    model, _ = load_model(ModelConfig(name="tiny-clip"))
    model.hf.save_pretrained(tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json").read_text()
    marker = tmp_path / "ran.txt"
    (tmp_path / "m" / "config.json").write_text(
        cfg.replace('"model_type"', '"auto_map": {"AutoModel": "modeling_x.Evil"}, "model_type"')
    )
    (tmp_path / "m" / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        load_model(ModelConfig(name=str(tmp_path / "m")))
    assert not marker.exists()


def test_composed_towers_train_with_siglip_and_reload(tmp_path):
    """A dual encoder composed from a ViT folder and a BERT folder, trained with SigLIP's loss."""
    from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

    from mmtune import api
    from mmtune.config import load_config
    from mmtune.models.load import minilm_dir
    from mmtune.runs import load_run

    vit = ViTModel(
        ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
        ),
        add_pooling_layer=False,
    )
    vit.save_pretrained(tmp_path / "vit")
    bert = BertModel(
        BertConfig(vocab_size=30522, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    bert.save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "bert")
    cfg = load_config(
        None,
        {
            "model.vision": str(tmp_path / "vit"),
            "model.text": str(tmp_path / "bert"),
            "model.embed_dim": 8,
            "options.loss": "siglip",
            "train.max_steps": 2,
            "data.batch_size": 16,
            "train.progress": False,
            "output_dir": str(tmp_path),
            "name": "c",
        },
    )
    metrics = api.train(cfg)
    assert 0.0 <= metrics["zeroshot.top1"] <= 1.0
    model, proc = load_run(tmp_path / "c")
    assert model.logit_bias is not None and model.vision_proj.out_features == 8
