"""`mmtune interpolate`: θ(α) = (1−α)·θ_A + α·θ_B written as a run that loads like any other."""

from __future__ import annotations

import pytest
import torch

from mmtune.checkpoint import save_checkpoint
from mmtune.cli import main
from mmtune.errors import CheckpointError
from mmtune.interpolate import interpolate_state
from mmtune.models import save_spec
from mmtune.models.load import preset
from mmtune.runs import load_run


def _run(folder, seed, model=None):
    torch.manual_seed(seed)
    model, proc, _ = preset("tiny-clip") if model is None else (model, preset("tiny-clip")[1], None)
    save_spec(model, proc, folder / "model")
    save_checkpoint(folder / "checkpoints" / "last", model)
    return model


def test_interpolated_run_holds_the_weighted_mean(tmp_path):
    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1)
    out = tmp_path / "mix"
    assert main(["interpolate", str(tmp_path / "a"), str(tmp_path / "b"), "--alpha", "0.25", "-o", str(out)]) == 0
    mixed, _ = load_run(out)
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in mixed.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.75 * sa[k] + 0.25 * sb[k], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(v, sa[k])
    key = "hf.text_projection.weight"  # the blend is neither endpoint
    assert not torch.equal(mixed.state_dict()[key], sa[key])
    assert not torch.equal(mixed.state_dict()[key], sb[key])


def test_several_alphas_and_exact_endpoints(tmp_path):
    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1)
    out = tmp_path / "mix"
    assert main(["interpolate", str(tmp_path / "a"), str(tmp_path / "b"), "--alpha", "0", "1", "-o", str(out)]) == 0
    for alpha, ref in ((0, a), (1, b)):
        model, _ = load_run(out / f"alpha-{alpha}")
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref.state_dict()[k]), (alpha, k)


def test_different_architectures_are_refused(tmp_path, capsys):
    from mmtune.models.lora import add_lora

    _run(tmp_path / "a", 0)
    model, _, _ = preset("tiny-clip")
    add_lora(model, model.tower("vision"))
    _run(tmp_path / "b", 1, model)
    code = main(
        ["interpolate", str(tmp_path / "a"), str(tmp_path / "b"), "--alpha", "0.5", "-o", str(tmp_path / "mix")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "different architectures" in err and "\n" not in err


def test_bad_alpha_and_shapes():
    a = {"w": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="shape"):
        interpolate_state(a, {"w": torch.zeros(3, 2)}, 0.5)
    with pytest.raises(CheckpointError, match="not floating point"):
        interpolate_state({"n": torch.tensor(1)}, {"n": torch.tensor(2)}, 0.5)
    assert main(["interpolate", "x", "y", "--alpha", "1.5", "-o", "z"]) == 2
