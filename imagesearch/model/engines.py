"""Inference engines: a batch of preprocessed inputs in, L2-normalised float32 vectors out.

- `torch`: the model itself, eager, channels_last, under `inference_mode`; on
  CUDA with fp16/bf16 autocast and batches padded to a few bucket sizes.
- `onnxruntime` (CPU): the model exported to ONNX once (`onnx_file`), cached
  in a folder under its fingerprint, then run by ONNX Runtime in float32.
- `int8` (optional, onnxruntime): the ONNX file statically quantised with
  calibration inputs (`quantize_int8`); its vectors are not float32-equal, so
  it is served under a fingerprint of its own.

Every float32 engine gives the same vectors as torch float32 within 1e-4
(tests/test_engines.py), so collections and fingerprints do not depend on the
engine. `resolve_engine` is the `auto` mapping (docs/embedder.md). A runtime
package that is not installed is one clear `FailedPrecondition` line.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from imagesearch import defaults, errors
from imagesearch.files import atomic_write
from imagesearch.model.backbones import EmbeddingNet
from imagesearch.model.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

ENGINES = defaults.ENGINES
# Largest max-abs difference an exported model may show against torch float32
# on the check batch before it is refused (the engines' contract is 1e-4).
EXPORT_TOLERANCE = 1e-4
ONNX_OPSET = 18
# Engines that need a package beyond the default install, and how to get it.
_PACKAGES = {"onnxruntime": ("onnxruntime", "pip install onnxruntime"),
             "onnxscript": ("onnxscript", "pip install onnxscript")}


class Engine(Protocol):
    name: str  # "torch", "onnxruntime"
    precision: str  # "fp32", "fp16" (torch on CUDA), "int8"

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """(N, 3, S, S) float32 CPU inputs -> (N, dim) float32 unit vectors."""


# ---------------------------------------------------------------- choices


def resolve_engine(engine: str, device_type: str) -> str:
    """`auto` -> onnxruntime on CPU (faster than torch eager there:
    bench/results/embedder.md), torch on CUDA (fp16 autocast). ONNX engines run on the CPU."""
    if engine not in ENGINES:
        raise errors.InvalidArgument(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "torch" if device_type == "cuda" else "onnxruntime"
    if engine != "torch" and device_type != "cpu":
        raise errors.InvalidArgument(
            f"--engine {engine} runs on the CPU; use --device cpu, or --engine torch on {device_type}")
    return engine


def engine_device(engine: str, requested_device: str) -> str:
    """The device an engine runs on when `--device auto`: ONNX engines on the CPU."""
    if requested_device == "auto" and engine == "onnxruntime":
        return "cpu"
    return requested_device


def require(package: str):
    """Import an engine's package, or one FailedPrecondition line saying how to install it."""
    module_name, install = _PACKAGES[package]
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise errors.FailedPrecondition(
            f"the {package} package is not installed ({exc}); install it with: {install}") from None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The torch engine's autocast dtype on a device type; None means plain float32:
    fp16 on CUDA (tensor cores, and 10 mantissa bits keep vectors closer to
    float32 than bf16's 7), float32 elsewhere."""
    return torch.float16 if device_type == "cuda" else None


def bucket_size(n: int, max_batch: int) -> int:
    """The batch size `n` items are padded to on CUDA: the next power of two,
    capped at `max_batch`, so cuDNN autotunes a handful of shapes at start-up
    (see `cuda_buckets`) instead of a new one for every batch size that arrives."""
    if n >= max_batch:
        return n
    return min(1 << (n - 1).bit_length(), max_batch)


def cuda_buckets(max_batch: int) -> list[int]:
    """Every size `bucket_size` can return for 1..max_batch."""
    return sorted({bucket_size(n, max_batch) for n in range(1, max_batch + 1)})


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/imagesearch, else ~/.cache/imagesearch."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / defaults.CACHE_DIR_NAME


# ---------------------------------------------------------------- torch


class TorchEngine:
    """The model in torch, eager. On CUDA: fp16 autocast, batches padded to
    bucket sizes (eval-mode BatchNorm: padding changes no other row), pinned
    host memory and cuDNN autotuning."""

    name = "torch"

    def __init__(self, model: EmbeddingNet, device: torch.device, max_batch: int | None = None):
        self.autocast = autocast_dtype(device.type)
        self.precision = "fp32" if self.autocast is None else "fp16"
        self.device = device
        self.bucket_cap = max_batch if device.type == "cuda" else None
        if self.bucket_cap:
            torch.backends.cudnn.benchmark = True
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self._pin = device.type == "cuda"

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        n = x.shape[0]
        if self.bucket_cap and n < bucket_size(n, self.bucket_cap):
            pad = x.new_zeros((bucket_size(n, self.bucket_cap) - n, *x.shape[1:]))
            x = torch.cat([x, pad])
        if self._pin and x.device.type == "cpu":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast,
                                                    enabled=self.autocast is not None):
            vectors = self.model.embed(x)  # float32 and L2-normalised (EmbeddingNet.embed)
        return vectors[:n].float().cpu().numpy()

    def warm_up_sizes(self) -> list[int]:
        return cuda_buckets(self.bucket_cap) if self.bucket_cap else [1]


# ---------------------------------------------------------------- ONNX export


class _Embed(nn.Module):
    """What is exported: input batch -> normalised embedding (EmbeddingNet.embed or FusedNet.embed)."""

    def __init__(self, model: EmbeddingNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def export_onnx(model: EmbeddingNet, spec: PreprocessSpec, path: str | os.PathLike) -> Path:
    """Export `model.embed` to ONNX at `path` (atomically), batch dimension
    dynamic, and check it against torch float32 on a random batch.

    The exporter is torch's dynamo one (`torch.onnx.export(dynamo=True)`, which
    needs onnxscript): TorchScript's (`dynamo=False`) is deprecated in torch
    2.x, and on Lite0 here its graph ran 25% slower in onnxruntime (timm's
    "same" padding stays dynamic in it). Exporting takes ~10 s; it runs once
    per model fingerprint."""
    require("onnxscript")
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    wrapper = _Embed(model).eval()
    size = spec.input_size
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    started = time.monotonic()
    for chatty in ("onnxscript", "onnx_ir", "torch.onnx"):  # hundreds of INFO lines per export
        logging.getLogger(chatty).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        program = torch.onnx.export(wrapper, (probe,), dynamo=True, input_names=["input"],
                                    output_names=["embedding"], dynamic_shapes={"x": {0: batch}},
                                    opset_version=ONNX_OPSET, verbose=False, optimize=True)
    data = program.model_proto.SerializeToString()
    wrapper.eval()  # the exporter restores the wrapper's mode: keep the model in eval
    path = atomic_write(path, lambda f: f.write(data))
    log.info("exported %s to ONNX in %.1fs: %s", model.backbone, time.monotonic() - started, path)
    return path


def onnx_file(model: EmbeddingNet, spec: PreprocessSpec, fingerprint: str, cache_dir: str | os.PathLike) -> Path:
    """The cached ONNX export of this model, made on first use:
    `<cache_dir>/onnx/<fingerprint>.onnx`."""
    path = Path(cache_dir) / "onnx" / f"{fingerprint}.onnx"
    if path.is_file():
        log.info("ONNX model from the cache: %s", path)
        return path
    try:
        return export_onnx(model, spec, path)
    except OSError as exc:
        raise errors.FailedPrecondition(f"cannot write the ONNX model to the cache folder {cache_dir}: {exc}") from None


def check_equal(engine: "Engine", reference: Callable[[torch.Tensor], np.ndarray], spec: PreprocessSpec,
                tolerance: float = EXPORT_TOLERANCE) -> float:
    """Max abs difference between `engine` and `reference` on a fixed random
    batch; raises FailedPrecondition over `tolerance` (a broken export or cache file)."""
    size = spec.input_size
    probe = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    diff = float(np.abs(engine(probe) - reference(probe)).max())
    if not diff <= tolerance:
        raise errors.FailedPrecondition(
            f"the {engine.name} engine's vectors differ from torch float32 by {diff:.2e} "
            f"(over {tolerance:g}); delete the cache folder's file for this model and restart, or use --engine torch")
    return diff


# ---------------------------------------------------------------- runtimes


def _threads() -> int:
    return max(1, torch.get_num_threads())


class OnnxRuntimeEngine:
    """An ONNX file in ONNX Runtime's CPU provider: `threads` intra-op threads
    (None: torch's thread count), one inter-op thread, operators in sequence,
    every graph optimisation. The intra-op threads sleep between operators
    and runs instead of busy-waiting as ONNX Runtime does by default: spinning
    shaves the wake-up off each of Lite0's ~100 operators, but a spinning
    thread holds a core that the decode threads need (the service measured
    0.95x torch's with spinning, 1.75x without: bench/results/embedder.md)."""

    name = "onnxruntime"

    def __init__(self, path: Path, precision: str = "fp32", threads: int | None = None):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or _threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # corrupt cache file, unsupported opset...
            raise errors.FailedPrecondition(f"onnxruntime cannot load {path}: {type(exc).__name__}: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.precision = precision
        self.path = path
        self.threads = options.intra_op_num_threads

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        # A contiguous float32 CPU tensor's numpy view shares its memory: no copy.
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return self.session.run(None, {self.input_name: array})[0]


# ---------------------------------------------------------------- int8


def int8_fingerprint(fingerprint: str, calibration_id: str) -> str:
    """An int8 model's vectors are not float32's: a fingerprint of its own,
    derived from the float model's and the calibration set's."""
    return hashlib.sha256(f"{fingerprint}|int8-static-qdq|{calibration_id}".encode()).hexdigest()


def calibration_id(files: Iterable[Path]) -> str:
    """sha256 over the calibration files' bytes, in name order."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        h.update(path.name.encode() + b"|")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def quantize_int8(float_path: Path, out_path: Path, batches: Iterable[np.ndarray]) -> Path:
    """Static int8 quantisation of an ONNX file with onnxruntime (QDQ,
    per-channel weights, MinMax calibration on `batches` of inputs)."""
    require("onnxruntime")
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {"input": batch}

    started = time.monotonic()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    prepared = out_path.with_name(f".{out_path.name}.{os.getpid()}.pre.onnx")
    try:
        q.quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        q.quantize_static(str(prepared), str(tmp), Reader(), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
    log.info("quantised %s to int8 in %.1fs: %s", float_path.name, time.monotonic() - started, out_path)
    return out_path


# ---------------------------------------------------------------- building


def build_engine(name: str, model: EmbeddingNet, spec: PreprocessSpec, fingerprint: str, *,
                 device: torch.device, max_batch: int | None = None,
                 cache_dir: str | os.PathLike | None = None, int8_path: Path | None = None,
                 threads: int | None = None) -> Engine:
    """The engine `name` (already resolved: not "auto") serving `model`.
    ONNX engines export on first use into `cache_dir` and are checked against
    torch float32 before they serve (a stale or corrupt cache file is refused);
    `int8_path` (onnxruntime only) serves that quantised file instead.
    `threads` (intra-op threads; None: torch's count) is the ONNX runtimes'."""
    if name == "torch":
        return TorchEngine(model, device, max_batch)
    require(name)  # a missing runtime is one line before the seconds of an export
    model = model.eval()
    path = onnx_file(model, spec, fingerprint, cache_dir or default_cache_dir())
    engine: Engine = OnnxRuntimeEngine(path, threads=threads)
    reference = TorchEngine(model, torch.device("cpu"))
    diff = check_equal(engine, reference, spec)
    log.info("%s engine equals torch fp32 within %.1e on the check batch", name, diff)
    if int8_path is not None:
        engine = OnnxRuntimeEngine(int8_path, precision="int8", threads=threads)
    return engine
