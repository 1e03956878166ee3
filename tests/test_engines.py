"""Inference engines (imagesearch.model.engines): the ONNX export, its cache,
the `auto` mapping, clear errors for missing runtimes, and the contract that
every float32 engine's vectors equal torch float32 within 1e-4 on real photos;
then the service reporting its engine and refusing a missing one in one line."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from embedder_service.embedder import Embedder
from imagesearch import errors
from imagesearch.model import engines
from imagesearch.model.backbones import BACKBONES, FusedNet, build_model, fingerprint
from imagesearch.model.checkpoint import LoadedModel
from testkit import ROOT, ServiceProcess
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc

TOLERANCE = 1e-4  # the engines' contract: max abs difference to torch float32
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")


def real_photos(clothing: int = 10) -> list[bytes]:
    """scikit-image sample photos as JPEG, plus clothing-small gallery photos when present."""
    out = []
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    from tests.conftest import CLOTHING

    gallery = CLOTHING / "retrieval" / "gallery"
    if gallery.is_dir():
        out += [p.read_bytes() for p in sorted(gallery.glob("*.jpg"))[:clothing]]
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def torch_embedder(reference):
    return Embedder(reference.loaded, device="cpu", engine="torch")


@pytest.fixture(scope="module")
def photos():
    return real_photos()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["onnxruntime"])
def test_every_fp32_engine_gives_torch_fp32_vectors_on_real_photos(engine, reference, torch_embedder, photos,
                                                                   cache_dir):
    embedder = Embedder(reference.loaded, device="cpu", engine=engine, cache_dir=cache_dir)
    assert (embedder.info.engine, embedder.info.precision) == (engine, "fp32")
    # The same fingerprint as torch's: a collection built with one engine serves with another.
    assert embedder.info.fingerprint == torch_embedder.info.fingerprint
    want = torch_embedder.embed_images(photos)
    for batch in (photos, photos[:1], photos[3:8]):  # batch sizes the export never saw
        got = embedder.embed_images(batch)
        start = photos.index(batch[0])
        assert got.dtype == np.float32 and got.shape == (len(batch), 1280)
        assert np.abs(got - want[start:start + len(batch)]).max() <= TOLERANCE
    assert np.allclose(np.linalg.norm(embedder.embed_images(photos), axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_a_fused_model_exports_to_onnxruntime_within_tolerance(photos, cache_dir):
    """Both parts in one exported graph: the pooled features beside the neck's embedding."""
    tuned = build_model("efficientnet_lite0", "imagenet", 0, neck_dim=16)
    loaded = LoadedModel(FusedNet(tuned.eval(), 0.4), BACKBONES["efficientnet_lite0"].preprocess,
                         "efficientnet_lite0", "test", [], {})
    want = Embedder(loaded, device="cpu", engine="torch").embed_images(photos)
    embedder = Embedder(loaded, device="cpu", engine="onnxruntime", cache_dir=cache_dir)
    got = embedder.embed_images(photos)
    assert got.shape == (len(photos), 1280 + 16) and embedder.info.dim == 1296
    assert np.abs(got - want).max() <= TOLERANCE
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_the_export_is_cached_by_fingerprint_and_a_corrupt_file_is_refused(reference, cache_dir, tmp_path):
    loaded = reference.loaded
    fp = fingerprint(loaded.model, loaded.spec, loaded.backbone)
    path = engines.onnx_file(loaded.model, loaded.spec, fp, cache_dir)
    assert path == cache_dir / "onnx" / f"{fp}.onnx" and path.stat().st_size > 1_000_000
    mtime = path.stat().st_mtime_ns
    assert engines.onnx_file(loaded.model, loaded.spec, fp, cache_dir) == path
    assert path.stat().st_mtime_ns == mtime  # served from the cache, not exported again
    assert not list((cache_dir / "onnx").glob(".*.tmp"))  # no temporary file left behind

    broken = tmp_path / "onnx" / f"{fp}.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(errors.FailedPrecondition, match="onnxruntime cannot load"):
        Embedder(loaded, device="cpu", engine="onnxruntime", cache_dir=tmp_path)


@pytest.mark.slow
def test_a_cached_file_of_another_model_is_caught_by_the_equality_check(reference, cache_dir, tmp_path):
    """A cache entry whose vectors are not the model's (e.g. written by a broken
    exporter) is refused before serving, not served silently."""
    loaded = reference.loaded
    fp = fingerprint(loaded.model, loaded.spec, loaded.backbone)
    good = engines.onnx_file(loaded.model, loaded.spec, fp, cache_dir)
    wrong = tmp_path / "onnx" / f"{fp}.onnx"
    wrong.parent.mkdir()
    wrong.write_bytes(good.read_bytes())
    original = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    try:
        with torch.no_grad():
            loaded.model.body.conv_stem.weight.mul_(1.5)  # the model now differs from the cached file
        with pytest.raises(errors.FailedPrecondition, match="differ from torch float32"):
            engines.build_engine("onnxruntime", loaded.model, loaded.spec, fp, device=torch.device("cpu"),
                                 cache_dir=tmp_path)
    finally:
        loaded.model.load_state_dict(original)


@pytest.mark.slow
def test_onnxruntime_takes_its_thread_count_and_never_spins(reference, cache_dir):
    loaded = reference.loaded
    fp = fingerprint(loaded.model, loaded.spec, loaded.backbone)
    path = engines.onnx_file(loaded.model, loaded.spec, fp, cache_dir)
    for threads in (1, 2):
        options = engines.OnnxRuntimeEngine(path, threads=threads).session.get_session_options()
        assert options.intra_op_num_threads == threads
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # Through the Embedder, with vectors still torch float32's.
    embedder = Embedder(loaded, device="cpu", engine="onnxruntime", cache_dir=cache_dir, engine_threads=1)
    options = embedder.engine.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    torch_embedder = Embedder(loaded, device="cpu", engine="torch")
    photos = real_photos(clothing=0)[:2]
    assert np.abs(embedder.embed_images(photos) - torch_embedder.embed_images(photos)).max() <= TOLERANCE


def test_auto_is_onnxruntime_on_cpu_and_torch_on_cuda():
    assert engines.resolve_engine("auto", "cpu") == "onnxruntime"
    assert engines.resolve_engine("auto", "cuda") == "torch"
    assert engines.resolve_engine("onnxruntime", "cpu") == "onnxruntime"
    assert engines.resolve_engine("torch", "cuda") == "torch"
    with pytest.raises(errors.InvalidArgument, match="runs on the CPU"):
        engines.resolve_engine("onnxruntime", "cuda")
    with pytest.raises(errors.InvalidArgument, match="unknown engine"):
        engines.resolve_engine("tensorflow", "cpu")
    assert engines.engine_device("onnxruntime", "auto") == "cpu"
    assert engines.engine_device("auto", "auto") == "auto"


def test_a_missing_engine_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(errors.FailedPrecondition) as info:
        engines.require("onnxruntime")
    message = str(info.value)
    assert "onnxruntime package is not installed" in message and "pip install" in message
    assert "\n" not in message


def test_default_cache_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert engines.default_cache_dir() == tmp_path / "imagesearch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert engines.default_cache_dir().parts[-2:] == (".cache", "imagesearch")


# ---------------------------------------------------------------- through the service


def test_engine_flags_and_their_environment_variables(monkeypatch, tmp_path):
    from embedder_service import __main__ as cli

    args = cli.parse_args([])
    assert (args.engine, args.engine_cache, args.int8_calibration) == ("auto", None, None)
    monkeypatch.setenv("IMAGESEARCH_EMBEDDER_ENGINE", "onnxruntime")
    monkeypatch.setenv("IMAGESEARCH_EMBEDDER_ENGINE_CACHE", str(tmp_path))
    args = cli.parse_args([])
    assert (args.engine, args.engine_cache) == ("onnxruntime", str(tmp_path))
    assert cli.parse_args(["--engine", "torch"]).engine == "torch"  # a flag beats the environment
    monkeypatch.setenv("IMAGESEARCH_EMBEDDER_ENGINE", "openvino")
    with pytest.raises(SystemExit):
        cli.parse_args([])
    monkeypatch.delenv("IMAGESEARCH_EMBEDDER_ENGINE")
    with pytest.raises(SystemExit):
        cli.parse_args(["--int8-calibration", str(tmp_path / "missing")])


@pytest.mark.slow
def test_the_service_reports_its_engine_and_serves_the_same_vectors(cache_dir, reference, photos):
    engine = "onnxruntime"
    with ServiceProcess("embedder_service", "--engine", engine, "--engine-cache", str(cache_dir),
                        "--max-batch", "4", "--engine-threads", "1",
                        "--decode-workers", "3") as proc, proc.channel() as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        info = stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=30)
        assert (info.engine, info.precision, info.decode, info.device) == (engine, "fp32", "draft", "cpu")
        got = np.array(stub.Embed(embedder_pb2.EmbedRequest(image=photos[0]), timeout=60).vector, np.float32)
        # The thread plan as asked for; torch's one thread from the tests' IMAGESEARCH_TORCH_THREADS=1,
        # the window from the plan (two batches with an ONNX engine on CPU).
        assert "max batch 4, engine threads 1, torch threads 1, decode workers 3, stream window 8" in proc.output
    assert np.abs(got - reference(photos[0])).max() <= TOLERANCE


def test_a_missing_engine_package_stops_the_service_with_one_line(tmp_path):
    """A stand-in `onnxruntime` package that fails to import, first on the path:
    the service must end with exit 2 and one line, no traceback."""
    fake = tmp_path / "site" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no onnxruntime here (test stand-in)')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'site'}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "embedder_service", "--host", "127.0.0.1", "--port", "0",
                           "--engine", "onnxruntime", "--engine-cache", str(tmp_path / "cache")],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    errors_ = [line for line in out.splitlines() if "cannot serve" in line]
    assert len(errors_) == 1 and "onnxruntime package is not installed" in errors_[0] and "pip install" in errors_[0]


@pytest.mark.slow
def test_int8_is_calibrated_on_a_folder_cached_and_served_under_its_own_fingerprint(reference, torch_embedder,
                                                                                   photos, cache_dir, tmp_path):
    folder = tmp_path / "calibration" / "sub"
    folder.mkdir(parents=True)
    for i, data in enumerate(photos):
        (folder / f"{i:02d}.jpg").write_bytes(data)
    int8 = Embedder(reference.loaded, device="cpu", engine="onnxruntime", cache_dir=cache_dir,
                    int8_calibration=folder.parent)
    assert (int8.info.engine, int8.info.precision) == ("onnxruntime", "int8")
    assert int8.info.fingerprint != torch_embedder.info.fingerprint  # its vectors are not fp32's
    [cached] = (cache_dir / "int8").glob("*.onnx")
    assert cached.name == f"{int8.info.fingerprint}.onnx"
    got, want = int8.embed_images(photos), torch_embedder.embed_images(photos)
    cosine = (got * want).sum(1)
    assert cosine.min() > 0.9 and np.abs(got - want).max() > TOLERANCE  # close, and really quantised
    mtime = cached.stat().st_mtime_ns
    again = Embedder(reference.loaded, device="cpu", engine="onnxruntime", cache_dir=cache_dir,
                     int8_calibration=folder.parent)
    assert again.info.fingerprint == int8.info.fingerprint and cached.stat().st_mtime_ns == mtime
    with pytest.raises(errors.InvalidArgument, match="onnxruntime"):
        Embedder(reference.loaded, device="cpu", engine="torch", int8_calibration=folder.parent)
