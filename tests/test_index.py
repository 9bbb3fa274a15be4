"""FAISS indexes against a numpy brute-force reference; the index folder; `mmtune search`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmtune.errors import ConfigError, DataError
from mmtune.retrieval import (
    Embeddings,
    IndexConfig,
    VectorIndex,
    build_index,
    load_section,
    read_embeddings,
    resolve_kind,
    save_index,
)
from tests.test_serve import ROOT, make_images, make_run


def clustered(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """Unit vectors around random unit centres (topic-like structure of real embeddings)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(centres, size=n)] + rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data():
    x = clustered(6000, 32, 60, seed=0)
    rng = np.random.default_rng(1)  # queries: perturbed database vectors, so neighbours are real
    q = x[rng.choice(len(x), 50, replace=False)] + rng.standard_normal((50, 32)).astype(np.float32) * 0.05
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q, exact_topk(x, q, 10)


def test_flat_is_exact(data):
    x, q, truth = data
    scores, rows = build_index(x, IndexConfig()).search(q, 10)
    np.testing.assert_array_equal(rows, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, truth, 1), atol=1e-5)


def test_ivf_visiting_every_list_is_exact_and_few_lists_still_recall(data):
    x, q, truth = data
    cfg = IndexConfig(kind="ivf", nlist=40, nprobe=40, train_size=2000)
    assert recall(build_index(x, cfg).search(q, 10)[1], truth) == 1.0
    cfg.nprobe = 4
    assert recall(build_index(x, cfg).search(q, 10)[1], truth) >= 0.9


@pytest.mark.parametrize(
    ("kind", "extra", "floor"),
    [
        ("hnsw", {"hnsw_m": 16, "ef_search": 64}, 0.9),
        ("ivfpq", {"nlist": 40, "nprobe": 10, "pq_m": 8, "pq_bits": 8, "train_size": 3000}, 0.5),
    ],
)
def test_approximate_kinds_recall(data, kind, extra, floor):
    x, q, truth = data
    assert recall(build_index(x, IndexConfig(kind=kind, **extra)).search(q, 10)[1], truth) >= floor


def test_auto_kind_and_config_errors():
    cfg = IndexConfig(kind="auto", auto_min_rows=100, max_memory_gb=0.001)
    assert resolve_kind(cfg, 50, 8) == "flat"
    assert resolve_kind(cfg, 200, 8) == "ivf"
    assert resolve_kind(cfg, 200_000, 8) == "ivfpq"
    with pytest.raises(ConfigError, match="unknown key 'nprobes'"):
        load_section(None, {"nprobes": 3}, IndexConfig)
    with pytest.raises(ConfigError, match="must divide"):
        build_index(
            np.eye(10, 10, dtype=np.float32).repeat(50, 0),
            IndexConfig(kind="ivfpq", nlist=2, pq_m=3),
        )


def test_shipped_config_builds_and_reloads(tmp_path, data):
    x, q, truth = data
    cfg = load_section(ROOT / "configs" / "index-ivf.yaml", {"train_size": 3000}, IndexConfig)
    assert cfg.kind == "ivf"
    meta = {
        "id": [str(i) for i in range(len(x))],
        "modality": ["image"] * len(x),
        "path": [f"/p/{i}.png" for i in range(len(x))],
        "caption": [None] * len(x),
    }
    emb = Embeddings(meta, x, {"checkpoint": "/some/run"})
    save_index(tmp_path / "idx", build_index(x, cfg), emb, cfg)
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["kind"] == "ivf" and info["count"] == len(x) and info["checkpoint"] == "/some/run"
    ix = VectorIndex.load(tmp_path / "idx", nprobe=10_000)  # every list: exact again
    hits = ix.search(q[:3], 5)
    assert [h["row"] for h in hits[0]] == list(truth[0][:5])
    assert hits[0][0]["path"] == f"/p/{truth[0][0]}.png" and hits[0][0]["rank"] == 1
    with pytest.raises(DataError, match="not an index folder"):
        VectorIndex.load(tmp_path)


def test_cli_build_and_search(tmp_path, capsys):
    from mmtune.cli import main

    run = make_run(tmp_path / "run")
    paths = make_images(tmp_path / "imgs", 8)
    emb, idx = tmp_path / "e.parquet", tmp_path / "idx"
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(run),
                "--images",
                str(tmp_path / "imgs"),
                "-o",
                str(emb),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["index", "build", str(emb), "-o", str(idx), "kind=hnsw", "hnsw_m=8"]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), "--image", str(paths[5]), "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"] == str(paths[5]) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert main(["search", str(idx), "a photo of the digit four", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "1"
    # the user's mistakes: one line, exit code 2
    assert main(["search", str(idx), "   "]) == 2
    assert main(["search", str(tmp_path), "x"]) == 2
    assert main(["index", "build", str(emb), "-o", str(idx), "kind=nope"]) == 2
    assert main(["index", "build", str(tmp_path / "missing.parquet"), "-o", str(idx)]) == 2
    assert "error" in capsys.readouterr().err
    assert len(read_embeddings(emb)) == 8
