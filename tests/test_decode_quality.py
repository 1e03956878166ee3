"""Draft decode keeps retrieval quality: the small-scale version of
`python -m bench.decode_quality` (which runs the whole clothing-small
retrieval split). Ten queries and forty gallery photos upscaled to 4000x3000
and saved as JPEG q90; P@10 with draft decode within one hit in a hundred of
P@10 with full decode, and every vector nearly the same. Skips without clothing-small."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from clients import metrics
from embedder_service.embedder import Embedder

QUERIES, GALLERY, K = 10, 40, 10


def _big_jpeg(path) -> bytes:
    with Image.open(path) as img:
        big = img.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.slow
def test_draft_decode_keeps_precision_at_10_on_12_megapixel_photos(clothing_dir, reference):
    retrieval = clothing_dir / "retrieval"
    truth = metrics.load_ground_truth(retrieval / "ground_truth.json")
    queries = sorted((retrieval / "query").glob("*.jpg"))[:QUERIES]
    gallery = sorted((retrieval / "gallery").glob("*.jpg"))[:GALLERY]
    names = [g.name for g in gallery]
    truth = {q.name: [n for n in truth[q.name] if n in set(names)] for q in queries}
    data = {p: _big_jpeg(p) for p in queries + gallery}

    loaded = reference.loaded
    results, vectors = {}, {}
    for mode in ("full", "draft"):
        spec = dataclasses.replace(loaded.spec, decode=mode)
        embedder = Embedder(dataclasses.replace(loaded, spec=spec), device="cpu", engine="torch")
        q = embedder.embed_images([data[p] for p in queries])
        g = embedder.embed_images([data[p] for p in gallery])
        vectors[mode] = np.concatenate([q, g])
        ranked = [[names[j] for j in np.argsort(-row, kind="stable")[:K]] for row in q @ g.T]
        results[mode] = metrics.evaluate(dict(zip([p.name for p in queries], ranked)), truth, k=K)
    cosine = (vectors["full"] * vectors["draft"]).sum(1)
    assert cosine.min() >= 0.98  # the same photos to the model
    assert np.abs(vectors["full"] - vectors["draft"]).max() > 1e-4  # and draft really decoded other pixels
    assert abs(results["draft"].precision - results["full"].precision) <= 0.01 + 1e-9
    assert results["full"].precision >= 0.3  # the retrieval itself works on these photos
