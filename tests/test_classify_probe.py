"""The linear probe against scikit-learn's LogisticRegression on the same cached features."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from mmtune.models.linear_probe import _objective, fit_logistic, sweep


def _features(n=600, d=24, c=5, seed=0):
    """Unit-norm features of c overlapping Gaussian classes (like normalised image embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d))
    y = rng.integers(0, c, n)
    x = centres[y] + rng.normal(scale=1.6, size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _sklearn(x, y, c):
    return LogisticRegression(C=c, max_iter=10_000, tol=1e-10).fit(x.numpy(), y.numpy())


def test_fit_matches_sklearn_for_every_strength():
    x, y = _features()
    xt, yt = _features(seed=1)
    for c in (0.1, 3.0, 100.0):
        w, b = fit_logistic(x[:400], y[:400], 5, c)
        ref = _sklearn(x[:400], y[:400], c)
        # the same convex objective: ours reaches sklearn's minimum (the objective is flat near
        # it for weak regularisation, so probabilities agree only to ~1e-2)
        theirs = (torch.tensor(ref.coef_).double(), torch.tensor(ref.intercept_).double())
        xd = x[:400].double()
        assert _objective(xd, y[:400], w.double(), b.double(), c) <= _objective(xd, y[:400], *theirs, c) + 1e-6
        ours = torch.softmax(xt @ w.T + b, 1).numpy()
        np.testing.assert_allclose(ours, ref.predict_proba(xt.numpy()), atol=1e-2)
        acc = float((ours.argmax(1) == yt.numpy()).mean())
        assert abs(acc - ref.score(xt.numpy(), yt.numpy())) <= 0.005


def test_sweep_picks_the_strength_sklearn_validation_picks():
    x, y = _features(n=900)
    grid = (0.01, 0.1, 1.0, 10.0, 100.0)
    res = sweep(x[:500], y[:500], x[500:700], y[500:700], 5, grid)
    val = {c: _sklearn(x[:500], y[:500], c).score(x[500:700].numpy(), y[500:700].numpy()) for c in grid}
    assert val[res.c] == max(val.values())
    for c in grid:
        assert abs(res.val_top1[c] - val[c]) <= 0.005
