"""Text-to-image: quantiser, discriminator loss, prior, sampler, re-ranker, checker, and the three
shipped configs plus `mmtune generate` through the CLI on tiny models."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmtune.cli import main
from mmtune.data.builtin import shapes_gen
from mmtune.data.builtin.shapes_check import check, find_objects
from mmtune.generation import rerank
from mmtune.models.prior import Prior, sample
from mmtune.models.vq import VectorQuantizer, VQModel, hinge_d_loss, vq_losses

ROOT = Path(__file__).resolve().parents[1]
VQ_SPEC = {"image_size": 32, "downsample": 4, "channels": 8, "code_dim": 8, "codes": 16, "disc_channels": 8}


def _prior(**kw) -> Prior:
    torch.manual_seed(0)
    spec = {"text_vocab": 10, "text_len": 5, "codes": 7, "tokens": 6, "dim": 32, "layers": 2, "heads": 4} | kw
    return Prior(spec).eval()


def test_quantiser_straight_through_and_commitment():
    torch.manual_seed(0)
    vq = VectorQuantizer(codes=8, dim=4, normalize=False).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    q, idx, commit = vq(z)
    nearest = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), vq.embed).argmin(1)
    assert torch.equal(idx.flatten(), nearest)
    assert torch.allclose(q, vq.lookup(idx))  # the forward value is the code
    assert torch.allclose(commit, F.mse_loss(z, vq.lookup(idx)))
    (q * torch.arange(q.numel()).view_as(q)).sum().backward()
    assert torch.equal(z.grad, torch.arange(q.numel()).view_as(q).float())  # straight through
    z.grad = None
    vq(z)[2].backward()  # commitment pulls z towards its (fixed) code
    assert torch.allclose(z.grad, 2 * (z - vq.lookup(idx)).detach() / z.numel())


def test_quantiser_ema_and_dead_code_restart():
    torch.manual_seed(0)
    vq = VectorQuantizer(codes=8, dim=4, decay=0.5, restart_every=3, normalize=False).train()
    z = torch.randn(4, 4, 4, 4)
    vq(z)  # first batch: codes start on encoder outputs
    vq.embed[:3] = 100.0  # three codes far from every feature: never chosen
    vq.embed_avg[:3] = 100.0 * vq.cluster_size[:3, None]
    vq.window.zero_()
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    vq(z)
    assert int(vq.restarts) == 0  # updates 2 of a 3-update window: no check yet
    vq(z)  # update 3: codes 0-2 went unused all window long
    assert int(vq.restarts) >= 3
    for k in range(3):  # each dead code now sits on one of the batch's vectors
        assert (flat - vq.embed[k]).abs().sum(1).min() < 1e-5
    assert (vq.window == 0).all()  # a new window starts
    # EMA: the code that takes every vector of a constant batch converges onto it
    const = torch.full((2, 4, 2, 2), 0.7)
    for _ in range(30):
        vq(const)
    code = vq(const)[1][0, 0, 0]
    assert torch.allclose(vq.embed[code], torch.full((4,), 0.7), atol=1e-3)
    unit = VectorQuantizer(codes=8, dim=4).eval()  # normalize=True: unit-norm features
    assert torch.allclose(unit(z)[0].norm(dim=1), torch.ones(4, 4, 4), atol=1e-5)


def test_discriminator_hinge_loss_and_gradient_separation():
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)) == 0
    assert hinge_d_loss(torch.full((4,), -1.0), torch.full((4,), 1.0)) == pytest.approx(4.0)
    torch.manual_seed(0)
    m = VQModel(VQ_SPEC).eval()  # eval: no codebook update, the same reconstruction twice
    x = torch.rand(4, 3, 32, 32) * 2 - 1

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    g_full = grads(vq_losses(m, x, adv_weight=1.0, adv_start=0, commit_weight=0.25, perceptual_weight=0.0)["loss"])
    rec, _, _ = m.reconstruct(x)
    d_only = grads(hinge_d_loss(m.discriminator(x)[0], m.discriminator(rec.detach())[0]))
    for name, g in d_only.items():  # the discriminator learns from its own loss only
        assert torch.allclose(g_full[name], g, atol=1e-6), name
    g_no_adv = grads(vq_losses(m, x, adv_weight=0.0, adv_start=0, commit_weight=0.25, perceptual_weight=0.0)["loss"])
    assert not torch.allclose(g_full["decoder.0.weight"], g_no_adv["decoder.0.weight"])
    # before adv_start the generator feels no adversarial term
    g_early = grads(vq_losses(m, x, adv_weight=1.0, adv_start=10**6, commit_weight=0.25, perceptual_weight=0.0)["loss"])
    assert torch.allclose(g_early["decoder.0.weight"], g_no_adv["decoder.0.weight"], atol=1e-6)


@pytest.mark.parametrize("rope2d", [False, True])
def test_prior_loss_only_on_image_tokens_and_causal(rope2d):
    p = _prior(rope2d=rope2d)
    text, codes = torch.randint(10, (3, 5)), torch.randint(7, (3, 6))
    logits = p(text, codes)
    assert logits.shape == (3, 6, 7)  # one prediction per image token, none for the caption
    assert torch.allclose(p.loss(text, codes), F.cross_entropy(logits.flatten(0, 1), codes.flatten()))
    later = codes.clone()
    later[:, 3] = (later[:, 3] + 1) % 7
    assert torch.allclose(p(text, later)[:, :4], logits[:, :4], atol=1e-6)  # no peeking ahead
    other = (text + 1) % 10
    assert not torch.allclose(p(other, codes)[:, 0], logits[:, 0])  # conditioned on the caption
    first, caches = p.start(text)  # the key/value cache gives the teacher-forced logits
    steps = [first] + [p.step(codes[:, t], t, caches) for t in range(5)]
    assert torch.allclose(torch.stack(steps, 1), logits, atol=1e-5)


def test_rope2d_attention_sees_offsets_and_caption_lookup_sees_position():
    from mmtune.models.prior import rope_angles, rotate

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rows, cols = torch.tensor([1.0, 3.0, 4.0, 6.0]), torch.tensor([2.0, 0.0, 5.0, 3.0])
    # (1, 2) → (4, 5) is the same offset (+3, +3) as (3, 0) → (6, 3)
    ang = rope_angles(rows, cols, 16)

    def score(i, j):
        return float(rotate(q, ang[i : i + 1]) @ rotate(k, ang[j : j + 1]).transpose(-1, -2))

    assert score(0, 2) == pytest.approx(score(1, 3), abs=1e-5)
    assert score(0, 2) != pytest.approx(score(0, 3), abs=1e-3)
    # a caption token is not turned (angle 0), so what an image token reads from the caption
    # depends on where that image token is
    zero = torch.zeros(1, 8)
    assert float(rotate(q, ang[:1]) @ rotate(k, zero).transpose(-1, -2)) != pytest.approx(
        float(rotate(q, ang[1:2]) @ rotate(k, zero).transpose(-1, -2)), abs=1e-3
    )
    p = _prior(rope2d=True, tokens=16)
    assert p.pos.shape[1] == p.text_len  # image slots carry no absolute embedding


def test_sampler_guidance_and_top_k():
    p = _prior()
    text = torch.randint(1, 10, (2, 5))
    null = torch.zeros((1, 5), dtype=torch.long)
    greedy = sample(p, text, null, guidance=2.5, top_k=1)
    # recompute: each token is the argmax of uncond + 2.5 · (cond − uncond), teacher-forced
    cond, uncond = p(text, greedy), p(null.expand(2, -1), greedy)
    assert torch.equal(greedy, (uncond + 2.5 * (cond - uncond)).argmax(-1))
    assert not torch.equal(greedy, p(text, greedy).argmax(-1)) or not torch.equal(
        greedy, sample(p, text, null, guidance=0.0, top_k=1)
    )  # guidance changes what is drawn
    g = torch.Generator().manual_seed(0)
    drawn = sample(p, text.repeat(8, 1), null, guidance=2.0, temperature=1.5, top_k=2, generator=g)
    c, u = p(text.repeat(8, 1), drawn), p(null.expand(16, -1), drawn)
    top2 = (u + 2.0 * (c - u)).topk(2, -1).indices
    assert (drawn[..., None] == top2).any(-1).all()  # only the two likeliest codes are drawn
    a = sample(p, text, null, 3.0, top_k=4, generator=torch.Generator().manual_seed(1))
    b = sample(p, text, null, 3.0, top_k=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_rerank_order():
    assert rerank(np.array([0.1, 0.9, 0.5, 0.9]), 3) == [1, 3, 2]
    assert rerank(np.array([0.3]), 5) == [0]


def test_checker_recognises_rendered_scenes():
    images, scenes = shapes_gen.generate(400, seed=123, allow_held_out=True)
    hits = [ok for img, objs in zip(images, scenes, strict=True) for ok in check(img, objs)]
    assert np.mean(hits) >= 0.99
    img = shapes_gen.render([shapes_gen.Obj("red", "circle", "top left")])
    assert check(img, "a red circle at the top left") == [True]
    for wrong in ("a red square at the top left", "a blue circle at the top left", "a red circle at the bottom right"):
        assert check(img, wrong) == [False], wrong
    assert check(np.full((32, 32, 3), 255, np.uint8), "a gray square at the top right") == [False]
    assert find_objects(np.full((32, 32, 3), 255, np.uint8)) == []


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    out = ndimage.gaussian_filter(img.astype(np.float32), (sigma, sigma, 0))
    return out.round().clip(0, 255).astype(np.uint8)


def test_checker_recognises_smoothed_scenes_and_rejects_smears():
    """A decoder draws soft edges: at radius 5 a disk's 1-pixel tips go, and what is left fills
    its bounding box like a square. The shape test matches whole shapes, so blurred scenes (as a
    tokenizer reconstructs them) are still read right; a blob like neither shape is no object."""
    images, scenes = shapes_gen.generate(200, seed=7, allow_held_out=True)
    for sigma in (0.5, 0.7):  # (at 0.8 the edges of red, green and blue fade past the palette)
        hits = [ok for img, objs in zip(images, scenes, strict=True) for ok in check(_blur(img, sigma), objs)]
        assert np.mean(hits) >= 0.99, sigma
    disk = shapes_gen.render([shapes_gen.Obj("blue", "circle", "bottom right")])
    tips = np.argwhere((disk != 255).any(-1))
    for y, x in tips:  # the four 1-pixel tips: the rows/columns with one coloured pixel
        if (disk[y] != 255).any(-1).sum() == 1 or (disk[:, x] != 255).any(-1).sum() == 1:
            disk[y, x] = 255
    assert check(disk, "a blue circle at the bottom right") == [True]
    assert check(disk, "a blue square at the bottom right") == [False]
    square = shapes_gen.render([shapes_gen.Obj("gray", "square", "top right")])
    ys, xs = np.nonzero((square != 255).any(-1))
    for y, x in [
        (ys.min(), xs.min()),
        (ys.min(), xs.max()),
        (ys.max(), xs.min()),
        (ys.max(), xs.max()),
    ]:
        square[y, x] = 255  # corners rounded by a pixel: still a square
    assert check(square, "a gray square at the top right") == [True]
    smear = np.full((32, 32, 3), 255, np.uint8)
    smear[2:5, 2:30] = (255, 0, 0)  # 84 red pixels in a 3×28 bar: neither shape
    assert find_objects(smear) == []


def test_heldout_prompts_never_in_training_captions():
    splits = shapes_gen.shapes_gen_splits("shapes-gen-mini", 0)
    held = set(shapes_gen.HELD_OUT)
    for r in splits["train"] + splits["val"]:
        objs = shapes_gen.parse_caption(r.captions[0])
        assert objs and not any((o.colour, o.shape, o.quadrant) in held for o in objs)
    for prompt in shapes_gen.heldout_prompts():
        assert any((o.colour, o.shape, o.quadrant) in held for o in shapes_gen.parse_caption(prompt))
    # the seen twin set: the same layout, every combination one that training captions show
    train_objs = {o for r in splits["train"] for o in shapes_gen.parse_caption(r.captions[0])}
    seen = shapes_gen.seen_prompts()
    assert len(seen) == len(shapes_gen.heldout_prompts()) == len(set(seen))
    for prompt, held_prompt in zip(seen, shapes_gen.heldout_prompts(), strict=True):
        objs = shapes_gen.parse_caption(prompt)
        assert len(objs) == len(shapes_gen.parse_caption(held_prompt))
        assert not any((o.colour, o.shape, o.quadrant) in held for o in objs)
        assert all(o in train_objs for o in objs), prompt  # even in the 400 mini scenes
    again = shapes_gen.shapes_gen_splits("shapes-gen-mini", 0)
    assert np.array_equal(again["train"][5].image, splits["train"][5].image)


TINY = [
    "data.dataset=shapes-gen-mini",
    "data.batch_size=8",
    "data.eval_batch_size=64",
    "train.max_steps=3",
    "train.warmup_steps=1",
    "train.progress=false",
    "train.log_every=1",
]


def _train(tmp_path, config, *extra):
    name = config.removesuffix(".yaml")
    args = ["train", "-c", str(ROOT / "configs" / config), f"output_dir={tmp_path}", f"name={name}", *TINY, *extra]
    assert main(args) == 0
    return tmp_path / name, json.loads((tmp_path / name / "metrics.json").read_text())


@pytest.mark.slow
def test_shipped_configs_and_generate(tmp_path, capsys):
    vq_run, m = _train(
        tmp_path,
        "vq-shapes.yaml",
        "options.channels=8",
        "options.codes=32",
        "options.adv_start=1",
        "options.perceptual_weight=0.1",
    )
    assert m["vq.psnr"] > 0 and 0 < m["vq.codebook_usage"] <= 1
    assert (vq_run / "plots" / "vq_reconstructions.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(vq_run)]) == 0  # reloads the same model
    again = {ln.split()[0]: ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert float(again["vq.psnr"]) == pytest.approx(m["vq.psnr"], abs=1e-3)
    from mmtune.models import count_parameters
    from mmtune.runs import load_run

    vq_model, _ = load_run(vq_run)  # the figures describe the VQ model, not the config's backbone
    assert (m["model.trainable_params"], m["model.total_params"]) == count_parameters(vq_model)
    rr_run, _ = _train(tmp_path, "rerank-shapes.yaml", "model.name=tiny-clip")
    t2i, m = _train(
        tmp_path,
        "text2image-shapes.yaml",
        f"options.vq_run={vq_run}",
        f"options.reranker={rr_run}",
        "options.dim=32",
        "options.layers=1",
        "options.candidates=2",
        "options.nll_samples=16",
    )
    for k in ("gen.checker_acc", "gen.checker_acc_no_rerank"):
        assert 0.0 <= m[k] <= 1.0
    assert m["gen.prompts"] == len(shapes_gen.heldout_prompts()) and m["prior.nll"] > 0
    assert (t2i / "plots" / "samples_prompts.png").is_file()
    assert 'alt="samples_prompts"' in (t2i / "report.html").read_text()  # the sample grid
    capsys.readouterr()
    out = tmp_path / "grid.png"
    args = [
        "generate",
        "--checkpoint",
        str(t2i),
        "a red circle at the top left",
        "a blue square at the bottom right",
        "-n",
        "3",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    scores = [float(s) for s in re.findall(r"score (-?[0-9.]+)", printed)]
    assert len(scores) == 6
    assert scores[:3] == sorted(scores[:3], reverse=True)  # best first
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (2 + 3 * 66, 2 + 2 * 66)
    assert main(args[:-2] + ["--out", str(out), "--reranker", "none", "--keep", "1"]) == 0
    with Image.open(out) as im:
        assert im.size == (2 + 66, 2 + 2 * 66)
    assert main(["generate", "--checkpoint", str(rr_run), "x", "--out", str(out)]) == 2
    assert (
        main(
            [
                "train",
                "-c",
                str(ROOT / "configs" / "text2image-shapes.yaml"),
                f"output_dir={tmp_path}",
                "name=bad",
                "options.vq_run=",
                *TINY,
            ]
        )
        == 2
    )


def test_twins_are_one_edit_away_and_never_held_out():
    from dataclasses import astuple

    rng = np.random.default_rng(0)
    held, Obj = set(shapes_gen.HELD_OUT), shapes_gen.Obj
    pair = [Obj("blue", "circle", "top right"), Obj("green", "square", "bottom left")]
    seen_swap = False
    for _ in range(200):
        for scene in (pair, [Obj("green", "circle", "top right")]):
            t = shapes_gen.twin(scene, rng)
            assert t is not None and len(t) == len(scene) and t != scene
            assert not any((o.colour, o.shape, o.quadrant) in held for o in t)
            assert len({o.colour for o in t}) == len(t) == len({o.quadrant for o in t})
            # the same words in another binding, or exactly one attribute of one object changed
            swapped = sorted(w for o in t for w in astuple(o)) == sorted(w for o in scene for w in astuple(o))
            changed = sum(
                a != b for o, p in zip(t, scene, strict=True) for a, b in zip(astuple(o), astuple(p), strict=True)
            )
            assert swapped or changed == 1, (scene, t)
            seen_swap |= swapped and len(scene) == 2
    assert seen_swap
    # "a red square at the top left": its shape edit would be the held-out red circle there
    for _ in range(50):
        t = shapes_gen.twin([Obj("red", "square", "top left")], rng)
        assert t != [Obj("red", "circle", "top left")]
    rec = shapes_gen.shapes_gen_splits("shapes-gen-mini", 0)["train"][3]
    tw = shapes_gen.twin_record(rec, np.random.default_rng(1))
    assert check(tw.image, tw.captions[0]) == [True] * len(shapes_gen.parse_caption(tw.captions[0]))
    assert tw.captions[0] != rec.captions[0]


def test_contrastive_twins_join_their_pairs_in_the_batch(tmp_path):
    from mmtune.config import load_config
    from mmtune.errors import ConfigError

    run, m = _train(tmp_path, "rerank-shapes.yaml", "model.name=tiny-clip", "options.twins=true")
    assert m["train.steps"] == 3 and "retrieval.t2i.R@1" in m
    # 3 steps of 8 pairs, each with its twin: 48 samples
    assert m["train.samples_per_s"] * m["train.seconds"] == pytest.approx(48, rel=0.02)
    from mmtune.tasks import Context, get_task

    for bad in ({"data.dataset": "digits"}, {"task": "caption"}):
        cfg = load_config(ROOT / "configs" / "rerank-shapes.yaml", {"options.twins": True, **bad})
        with pytest.raises(ConfigError, match="options.twins"):  # the task refuses its own option
            get_task(cfg.task)(Context(cfg))
