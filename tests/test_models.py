"""The one model definition: backbones, weight loading from every source, the
embedding, the fingerprint and clear errors for files that are not weights."""

from __future__ import annotations

import pytest
import torch

from imagesearch import errors
from imagesearch.model.backbones import (
    BACKBONES,
    EmbeddingNet,
    FusedNet,
    build_model,
    fingerprint,
    load_by_key_order,
)
from imagesearch.model.checkpoint import load_checkpoint, load_model, read_checkpoint, save_checkpoint, update_meta

torch.set_num_threads(1)


def test_b4_loads_a_local_torchvision_weights_file(tmp_path):
    """B4's ImageNet weights cannot be downloaded here; a torchvision-format
    file (as torchvision's download would save it) must load whole."""
    from torchvision.models import efficientnet_b4

    torch.manual_seed(0)
    tv = efficientnet_b4(weights=None).eval()
    path = tmp_path / "efficientnet_b4_rwightman-23ab8bcd.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("efficientnet_b4", str(path)).eval()
    assert model.dim == 1792
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model(x), tv(x), atol=1e-5)  # body and ImageNet head both loaded
        pooled = torch.flatten(tv.avgpool(tv.features(x)), 1)
        assert torch.allclose(model.embed(x), torch.nn.functional.normalize(pooled, dim=1), atol=1e-6)


def test_lite0_imagenet_weights_classify_a_real_photo():
    from PIL import Image
    from skimage import data

    from imagesearch.model.preprocessing import eval_transform

    loaded = load_model(backbone="efficientnet_lite0", weights="imagenet")
    model = loaded.model.eval()
    x = eval_transform(loaded.spec)(Image.fromarray(data.chelsea()))[None]
    with torch.inference_mode():
        top5 = model(x).topk(5).indices[0].tolist()
        emb = model.embed(x)
    assert set(top5) & {281, 282, 283, 284, 285, 287}, top5  # ImageNet cat classes: real weights
    assert emb.shape == (1, 1280) and torch.allclose(emb.norm(dim=1), torch.ones(1))


def test_key_order_loading_checks_shapes():
    model = EmbeddingNet("efficientnet_lite0")
    state = model.state_dict()
    renamed = {f"x{i}": v for i, v in enumerate(state.values())}
    load_by_key_order(model, renamed, source="ok")
    shuffled = dict(renamed)
    first = next(iter(shuffled))
    shuffled[first] = torch.zeros(3)
    with pytest.raises(errors.InvalidArgument, match="shape"):
        load_by_key_order(model, shuffled, source="bad")
    with pytest.raises(errors.InvalidArgument, match="tensors"):
        load_by_key_order(model, dict(list(renamed.items())[:-2]), source="short")


def test_weights_of_another_backbone_are_refused(tmp_path):
    path = tmp_path / "lite2.pt"
    torch.save(EmbeddingNet("efficientnet_lite2").state_dict(), path)
    with pytest.raises(errors.InvalidArgument):
        build_model("efficientnet_lite0", str(path))


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"not a checkpoint at all"])
def test_junk_files_get_a_clear_error(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(errors.InvalidArgument, match="cannot read checkpoint"):
        read_checkpoint(path)
    with pytest.raises(errors.InvalidArgument, match="cannot read weights file"):
        build_model("efficientnet_lite0", str(path))


def test_a_pickled_whole_model_is_refused_without_running_its_code(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(errors.InvalidArgument, match="state_dict"):
        read_checkpoint(path)


def test_missing_weights_file_and_unknown_backbone():
    with pytest.raises(errors.InvalidArgument, match="no such file"):
        build_model("efficientnet_lite0", "/nonexistent/weights.pt")
    with pytest.raises(errors.InvalidArgument, match="unknown backbone"):
        build_model("resnet50", "none")


def test_checkpoint_round_trip_and_fingerprint(tmp_path):
    model = build_model("efficientnet_lite0", "none", num_classes=3)
    spec = BACKBONES["efficientnet_lite0"].preprocess
    meta = {"backbone": "efficientnet_lite0", "class_names": ["a", "b", "c"], "preprocess": spec.to_dict(),
            "embedding_dim": 1280, "epoch": 1, "metrics": {}, "model": model.options()}
    path = save_checkpoint(tmp_path / "best.pt", model, meta)
    assert torch.load(path, weights_only=True)["meta"]["class_names"] == ["a", "b", "c"]
    loaded = load_checkpoint(path)
    assert loaded.class_names == ["a", "b", "c"] and loaded.spec == spec
    assert fingerprint(loaded.model, loaded.spec, "efficientnet_lite0") == fingerprint(model, spec, "efficientnet_lite0")
    other_spec = type(spec)(spec.input_size + 32, spec.mean, spec.std, spec.interpolation)
    assert fingerprint(model, other_spec, "efficientnet_lite0") != fingerprint(model, spec, "efficientnet_lite0")
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert fingerprint(model, spec, "efficientnet_lite0") != fingerprint(loaded.model, spec, "efficientnet_lite0")


def test_a_fused_checkpoint_serves_one_unit_vector_and_its_fingerprint_says_how(tmp_path):
    """meta "fusion" {weight w}: [sqrt(w) a, sqrt(1-w) b] (a the pooled features, b the
    neck's embedding), whose cosine is w cos_a + (1-w) cos_b; weight 0 is the plain model
    under today's fingerprint; the weight and either part's weights change the fingerprint."""
    lite0 = "efficientnet_lite0"
    tuned = build_model(lite0, "none", 0, neck_dim=8).eval()
    spec = BACKBONES[lite0].preprocess
    meta = {"backbone": lite0, "class_names": ["a", "b"], "preprocess": spec.to_dict(), "embedding_dim": 8,
            "epoch": 1, "metrics": {}, "model": tuned.options()}
    path = save_checkpoint(tmp_path / "best.pt", tuned, meta)

    def load(weight, source="pooled"):
        return load_checkpoint(update_meta(path, {"fusion": {"weight": weight, "source": source}})).model.eval()

    plain = fingerprint(tuned, spec, lite0)
    zero = load(0.0)
    assert type(zero) is EmbeddingNet and fingerprint(zero, spec, lite0) == plain
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    prints = {}
    for weight in (0.5, 0.3, 1.0):
        model = load(weight)
        assert isinstance(model, FusedNet) and model.dim == 1280 + 8
        with torch.no_grad():
            v = model.embed(x)
            a, b = model.parts(x)
            assert torch.allclose(a, torch.nn.functional.normalize(model.tuned.body(x), dim=1), atol=1e-6)
            assert torch.allclose(b, zero.embed(x), atol=1e-6)
        assert v.shape == (3, 1288) and torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-6)
        assert torch.allclose(v @ v.T, weight * (a @ a.T) + (1 - weight) * (b @ b.T), atol=1e-6)
        prints[weight] = fingerprint(model, spec, lite0)
    assert len(set(prints.values()) | {plain}) == 4
    for part in ("body", "neck"):  # either part's weights
        model = load(0.5)
        assert fingerprint(model, spec, lite0) == prints[0.5]
        with torch.no_grad():
            next(getattr(model.tuned, part).parameters()).add_(1e-3)
        assert fingerprint(model, spec, lite0) != prints[0.5]
    with pytest.raises(errors.InvalidArgument, match="only 'pooled'"):
        load(0.5, "imagenet")
    for weight, model in ((1.5, tuned), (-0.1, tuned), (0.5, build_model(lite0, "none", 0))):
        with pytest.raises(errors.InvalidArgument, match="fusion weight"):
            FusedNet(model, weight)
