"""Linear probe (CLIP's protocol): L2-regularised multinomial logistic regression on frozen,
cached image features, the regularisation strength chosen on the validation split."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# Inverse regularisation strengths C (scikit-learn's convention), log-spaced; features are unit
# vectors, so a good C is large (weights of norm ~10–100 reach confident logits).
C_GRID = tuple(float(c) for c in 10.0 ** np.arange(-2.0, 5.01, 0.5))


def _objective(x, y, w, b, c: float) -> torch.Tensor:
    # scikit-learn's C·Σ CE + ½‖W‖², divided by N: the same minimiser, better conditioned.
    return F.cross_entropy(x @ w.T + b, y) + (w * w).sum() / (2.0 * c * len(y))


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    c: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (C, D) and bias (C,) minimising Σ CE + ‖W‖²/(2c) over features x (N, D), y (N,).

    Full-batch L-BFGS in float64; the bias is not penalised (as in scikit-learn). `init` warm
    starts from a neighbouring C of a sweep.
    """
    x, y = x.double(), y.long()
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64)
    b = torch.zeros(n_classes, dtype=torch.float64)
    if init is not None:
        w, b = init[0].double().clone(), init[1].double().clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-8,
        tolerance_change=1e-12,
    )

    def closure():
        opt.zero_grad()
        loss = _objective(x, y, w, b, c)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float()


@dataclass
class ProbeResult:
    """The chosen C, its weights (C_cls, D) and bias, and validation accuracy for every C tried."""

    c: float
    weight: torch.Tensor
    bias: torch.Tensor
    val_top1: dict[float, float] = field(default_factory=dict)


def sweep(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    n_classes: int,
    grid: tuple[float, ...] = C_GRID,
) -> ProbeResult:
    """Fit on train for every C of `grid`; keep the best validation top-1 (ties: lower val loss).

    Fits run from the strongest regularisation to the weakest, each warm-started from the last.
    """
    best, best_key, accs, init = None, None, {}, None
    for c in sorted(grid):
        w, b = fit_logistic(train_x, train_y, n_classes, c, init)
        init = (w, b)
        logits = val_x.float() @ w.T + b
        acc = float((logits.argmax(1) == val_y).float().mean())
        loss = float(F.cross_entropy(logits, val_y.long()))
        accs[c] = acc
        key = (acc, -loss)
        if best_key is None or key > best_key:
            best, best_key = ProbeResult(c, w, b), key
    best.val_top1 = accs
    return best
