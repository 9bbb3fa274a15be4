"""Embedding stores (Parquet) and FAISS indexes: exact inner product, IVF, IVF-PQ, HNSW.

An index folder holds `index.faiss`, `meta.parquet` (id, modality, path, caption per row, in
the index's row order) and `index.json` (kind, parameters, dimension, count, the checkpoint whose
embeddings these are). Vectors are L2-normalised, so inner product = cosine similarity.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmtune.errors import ConfigError, DataError, UserError

log = logging.getLogger("mmtune.retrieval")

INDEX_FILE, META_FILE, INFO_FILE = "index.faiss", "meta.parquet", "index.json"
META_COLUMNS = ("id", "modality", "path", "caption")


class IndexConfig(BaseModel):
    """How to build an index; every field can be set in YAML or as `key=value` overrides."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["flat", "ivf", "ivfpq", "hnsw", "auto"] = Field(
        "flat",
        description="`flat`: exact inner product; `ivf`: inverted lists (exact vectors); "
        "`ivfpq`: inverted lists of product-quantised codes (small memory); `hnsw`: graph; "
        "`auto`: flat below `auto_min_rows`, ivfpq when flat vectors exceed `max_memory_gb`, else ivf.",
    )
    nlist: int | None = Field(
        None, gt=0, description="IVF lists; None: about 2·sqrt(N), capped so lists hold ≥ 39 rows."
    )
    nprobe: int = Field(16, gt=0, description="IVF lists visited per query (recall vs speed).")
    pq_m: int = Field(64, gt=0, description="PQ sub-quantisers (must divide the dimension).")
    pq_bits: int = Field(8, gt=0, le=16, description="Bits per PQ code.")
    hnsw_m: int = Field(32, gt=0, description="HNSW neighbours per node.")
    ef_construction: int = Field(80, gt=0, description="HNSW build-time search depth.")
    ef_search: int = Field(128, gt=0, description="HNSW query-time search depth.")
    train_size: int = Field(100_000, gt=0, description="Vectors sampled to train IVF centroids / PQ codebooks.")
    auto_min_rows: int = Field(50_000, gt=0, description="`auto`: below this, exact search.")
    max_memory_gb: float = Field(8.0, gt=0, description="`auto`: above this, use ivfpq.")
    seed: int = Field(0, description="Seed of the training sample.")


def load_section(path: str | Path | None, overrides: dict[str, Any], model: type[BaseModel]):
    """Validate a flat YAML mapping (optional) + overrides against `model`; ConfigError on mistakes."""
    from mmtune.config import read_yaml_mapping

    tree = read_yaml_mapping(path) if path is not None else {}
    tree.update(overrides)
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        if first["type"] == "extra_forbidden":
            return _raise(f"unknown key '{loc}' (keys: {', '.join(model.model_fields)})")
        return _raise(f"key '{loc}': {first['msg']} (got {first.get('input')!r})")


def _raise(msg: str):
    raise ConfigError(msg)


# ---------------------------------------------------------------- embedding files


@dataclass
class Embeddings:
    """Rows of an embedding file: metadata columns + vectors (N, D) float32, with file metadata."""

    meta: dict[str, list]
    vectors: np.ndarray
    info: dict

    def __len__(self) -> int:
        return len(self.vectors)


def read_embeddings(path: str | Path, modality: str | None = None) -> Embeddings:
    """Read a Parquet file written by `mmtune embed`; optionally keep one modality."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"embeddings file not found: {path}")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"{path}: not a Parquet embeddings file ({e.__class__.__name__})") from None
    missing = [c for c in (*META_COLUMNS, "vector") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: columns {missing} missing (write it with `mmtune embed`)")
    raw = (table.schema.metadata or {}).get(b"mmtune", b"{}")
    info = json.loads(raw)
    if modality is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["modality"], modality))
    vec = table["vector"].combine_chunks()
    dim = vec.type.list_size
    flat = vec.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    vectors = flat.reshape(len(table), dim)  # (N, D)
    meta = {c: table[c].to_pylist() for c in META_COLUMNS}
    return Embeddings(meta, np.ascontiguousarray(vectors), info)


# ---------------------------------------------------------------- building


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    try:
        import faiss
    except ImportError:
        raise UserError("indexes need faiss: pip install 'mmtune[index]'") from None
    n = os.environ.get("MMTUNE_THREADS")
    if n:
        faiss.omp_set_num_threads(int(n))
    return faiss


def resolve_kind(cfg: IndexConfig, n: int, dim: int) -> str:
    """The concrete index kind for `auto` (others unchanged)."""
    if cfg.kind != "auto":
        return cfg.kind
    if n < cfg.auto_min_rows:
        return "flat"
    return "ivfpq" if n * dim * 4 / 2**30 > cfg.max_memory_gb else "ivf"


def default_nlist(n: int) -> int:
    """About 2·sqrt(N) lists, at least 1, with ≥ 39 training rows per list (faiss' guidance)."""
    return max(1, min(int(2 * math.sqrt(n)), n // 39))


def _sample(vectors: np.ndarray, size: int, seed: int) -> np.ndarray:
    if len(vectors) <= size:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return vectors[rows]


def build_index(vectors: np.ndarray, cfg: IndexConfig):
    """A FAISS inner-product index over `vectors` (N, D) float32; IVF/PQ trained on a sample."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n == 0:
        raise DataError("no vectors to index")
    kind = resolve_kind(cfg, n, dim)
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, ip)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:
        nlist = cfg.nlist or default_nlist(n)
        if nlist > n:
            raise ConfigError(f"nlist={nlist} is more than the {n} vectors to index")
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
        else:
            if dim % cfg.pq_m:
                raise ConfigError(f"pq_m={cfg.pq_m} must divide the dimension {dim}")
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, cfg.pq_bits, ip)
        index.cp.spherical = True  # centroids on the sphere, like the vectors
        index.train(_sample(vectors, cfg.train_size, cfg.seed))
        index.nprobe = min(cfg.nprobe, nlist)
    index.add(vectors)
    return index


def set_search_params(index, cfg: IndexConfig) -> None:
    """Apply query-time parameters (nprobe, efSearch) to a built or loaded index."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index) if not isinstance(index, faiss.IndexFlat) else None
    if ivf is not None:
        ivf.nprobe = min(cfg.nprobe, ivf.nlist)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = cfg.ef_search


def save_index(folder: str | Path, index, emb: Embeddings, cfg: IndexConfig) -> Path:
    """Write index, metadata and info into `folder` (files replaced atomically one by one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    faiss = _faiss()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = resolve_kind(cfg, len(emb), emb.vectors.shape[1])
    info = {
        "kind": kind,
        "config": cfg.model_dump(),
        "dim": int(emb.vectors.shape[1]),
        "count": len(emb),
        "checkpoint": emb.info.get("checkpoint"),
        "embeddings": emb.info,
    }
    tmp = folder / f".{INDEX_FILE}.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, folder / INDEX_FILE)
    tmp = folder / f".{META_FILE}.tmp"
    pq.write_table(pa.table({c: emb.meta[c] for c in META_COLUMNS}), tmp)
    os.replace(tmp, folder / META_FILE)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------- searching


class VectorIndex:
    """A loaded index folder: `search(queries (Q, D), k)` → per query a list of result dicts."""

    def __init__(self, index, meta: dict[str, list], info: dict, folder: Path | None = None):
        self.index, self.meta, self.info, self.folder = index, meta, info, folder

    @classmethod
    def load(cls, folder: str | Path, nprobe: int | None = None, ef_search: int | None = None):
        import pyarrow.parquet as pq

        faiss = _faiss()
        folder = Path(folder)
        for name in (INDEX_FILE, META_FILE, INFO_FILE):
            if not (folder / name).is_file():
                raise DataError(f"{folder}: not an index folder ({name} missing)")
        try:
            info = json.loads((folder / INFO_FILE).read_text())
            index = faiss.read_index(str(folder / INDEX_FILE))
        except (json.JSONDecodeError, RuntimeError) as e:
            raise DataError(f"{folder}: damaged index ({str(e).splitlines()[0]})") from None
        table = pq.read_table(folder / META_FILE)
        meta = {c: table[c].to_pylist() for c in META_COLUMNS}
        if len(meta["id"]) != index.ntotal:
            raise DataError(f"{folder}: {index.ntotal} vectors but {len(meta['id'])} metadata rows")
        cfg = IndexConfig(**info.get("config", {}))
        if nprobe is not None:
            cfg.nprobe = nprobe
        if ef_search is not None:
            cfg.ef_search = ef_search
        set_search_params(index, cfg)
        return cls(index, meta, info, folder)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search_raw(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), rows (Q, k)); rows are -1 where fewer than k results exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        return self.index.search(q, min(k, len(self)))

    def search(self, queries: np.ndarray, k: int) -> list[list[dict]]:
        """Top-k rows per query, best first: {rank, row, score, id, modality, path, caption}."""
        scores, rows = self.search_raw(queries, k)
        out = []
        for srow, rrow in zip(scores, rows, strict=True):
            hits = []
            for s, r in zip(srow, rrow, strict=True):
                if r < 0:
                    continue
                hit = {"rank": len(hits) + 1, "row": int(r), "score": float(s)}
                hit.update({c: self.meta[c][r] for c in META_COLUMNS})
                hits.append(hit)
            out.append(hits)
        return out
