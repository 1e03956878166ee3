"""Data for the ranker's index-kind benchmark: realistic, clustered vectors.

Pure random unit vectors are ANN's worst case (no structure to exploit), so
recall on them says little about recall on photos. Here the centres are the
Lite0 ImageNet embeddings of every clothing-small photo (train, val and
retrieval), and each vector is a random centre plus Gaussian noise of norm
0.5, normalised; seed 0. Queries are drawn the same way from their own
stream. The centres are computed once and cached in bench/results/.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from imagesearch.defaults import IMAGE_EXTENSIONS

ROOT = Path(__file__).resolve().parents[1]
CLOTHING = Path(os.environ.get("IMAGESEARCH_CLOTHING_DIR") or next(
    (p / "shared" / "data" / "clothing-small" for p in ROOT.parents if (p / "shared" / "data" / "clothing-small").is_dir()),
    ROOT.parent / "shared" / "data" / "clothing-small"))
CACHE = ROOT / "bench" / "results" / "clothing_lite0_centres.npy"
NOISE_NORM = 0.5


def clothing_centres(data_dir: Path = CLOTHING, cache: Path = CACHE, batch: int = 32) -> np.ndarray:
    """(photos, 1280) float32 unit Lite0 ImageNet embeddings of every photo under `data_dir`."""
    if cache.is_file():
        return np.load(cache)
    import torch

    from imagesearch.model.checkpoint import load_model
    from imagesearch.model.preprocessing import load_tensor

    files = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"no photos under {data_dir}: the benchmark's centres need clothing-small")
    loaded = load_model()
    loaded.model.eval()
    out, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(files), batch):
            x = torch.stack([load_tensor(f.read_bytes(), loaded.spec) for f in files[start:start + batch]])
            out.append(loaded.model.embed(x).numpy())
    centres = np.concatenate(out).astype(np.float32)
    print(f"embedded {len(files)} photos in {time.perf_counter() - t0:.0f}s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, centres)
    return centres


def clustered_chunks(centres: np.ndarray, n: int, seed: int, chunk: int = 65536) -> Iterator[np.ndarray]:
    """`n` float32 unit rows, `chunk` at a time: centre + noise of norm 0.5, normalised.
    The same (centres, n, seed, chunk) always give the same rows."""
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        rows = centres[rng.integers(0, centres.shape[0], m)].astype(np.float64)
        noise = rng.standard_normal((m, dim))
        noise *= NOISE_NORM / np.linalg.norm(noise, axis=1, keepdims=True)
        rows += noise
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        yield rows.astype(np.float32)


def clustered(centres: np.ndarray, n: int, seed: int) -> np.ndarray:
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    start = 0
    for block in clustered_chunks(centres, n, seed):
        out[start:start + block.shape[0]] = block
        start += block.shape[0]
    return out


if __name__ == "__main__":
    c = clothing_centres()
    print(c.shape, c.dtype)
