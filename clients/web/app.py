"""`imagesearch web`: search by picture in a browser.

A small ASGI app (Starlette, served by uvicorn) over the typed client library,
and one static page (static/: HTML, CSS, a script; nothing from another host).
The API the page uses, for scripts too (docs/clients.md#the-web-page):

    POST /api/search       multipart `image` (or `gallery_name`: "more like this"), with
                           `collection`, `top_k`, `min_score`, `filter` (KEY=VALUE, repeat
                           it), `query_expansion` (N[:ALPHA]), `rerank` (k-reciprocal),
                           as form fields or in the query string
    GET  /api/collections  the ranker's collections, with attribute keys and values to filter on
    GET  /thumbs/NAME      a JPEG thumbnail of a file under --gallery, with an ETag
    GET  /healthz          200 when both services serve, else 503

The clients are synchronous gRPC: every call runs in the thread pool, so an
open request never holds the event loop. `_error` is the one place that turns
errors into HTTP statuses (400 bad input, 401 no web token, 404 unknown
collection or file, 413 too large, 503 a service down)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import logging
import socket
import threading
from pathlib import Path
from urllib.parse import urlencode

import grpc
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, MutableHeaders, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clients.channels import Security
from clients.embedder import EmbedderClient
from clients.errors import ClientError, ServiceUnavailable, UsageError
from clients.files import FILE_KEYS, file_inside, thumbnail_jpeg
from clients.options import RERANK_CHOICES, above, match_json, parse_pairs, rerank_options
from clients.ranker import RankerClient
from clients.types import CollectionStats
from imagesearch.defaults import MAX_TOP_K, is_image_path

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
THUMB_PX = 240
THUMB_CACHE = 512                   # thumbnails kept in memory (LRU)
FORM_OVERHEAD = 64 * 1024           # multipart framing and the small fields beside the image
ATTRIBUTE_SAMPLE = 5000             # items read per collection to offer attribute values
MAX_VALUES = 200                    # values offered per attribute key
TOKEN_COOKIE = "imagesearch_web_token"
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
          grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404,
          grpc.StatusCode.RESOURCE_EXHAUSTED: 413, grpc.StatusCode.UNAVAILABLE: 503,
          grpc.StatusCode.DEADLINE_EXCEEDED: 503}


@dataclasses.dataclass(frozen=True)
class WebConfig:
    embedder: str
    ranker: str
    gallery: Path | None = None      # thumbnails and "more like this" come from files under it
    security: Security = Security()  # for the services (TLS, their token)
    web_token: str | None = None     # required of the page's visitors when set
    timeout: float = 30.0


class WebError(Exception):
    """An answer other than 200, with what to do about it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _too_large(size: str, limit: int) -> WebError:
    return WebError(413, f"the image is {size}, over the embedder's limit of {limit:,} bytes: "
                         "send a smaller one (resize it, or save it as JPEG)")


async def _error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, WebError):
        status = exc.status
    elif isinstance(exc, ServiceUnavailable):
        status = 503
    else:
        # A usage error of ours (a bad parameter) has no code; a service refusing our
        # token, or failing, is the server's trouble (502), not the visitor's.
        status = STATUS.get(exc.code, 400 if exc.code is None and isinstance(exc, UsageError) else 502)
    return JSONResponse({"error": str(exc), "status": status}, status_code=status)


class Backend:
    """The two clients and what the app caches: the embedder's size limit,
    each collection's attribute values, thumbnails."""

    def __init__(self, config: WebConfig):
        self.config = config
        self.embedder = EmbedderClient(config.embedder, security=config.security, timeout=config.timeout)
        self.ranker = RankerClient(config.ranker, security=config.security, timeout=config.timeout)
        self._info_lock = threading.Lock()
        self._models: dict[str, EmbedderClient] = {}  # fingerprint -> a client of the model that has it
        self._attributes: dict[str, tuple[tuple, dict[str, list[str]]]] = {}
        self._thumbs: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._thumbs_lock = threading.Lock()

    def close(self) -> None:
        for client in (self.embedder, self.ranker, *self._models.values()):
            client.close()

    def model_for(self, collection: str) -> tuple[EmbedderClient, str]:
        """(a client of the served model whose fingerprint `collection` holds
        (an alias: its target's now), the collection's own name): a search that
        names it answers from that collection even if the alias switches meanwhile.
        The default model when none matches: the search then names the mismatch."""
        found = self.ranker.collection(collection)
        if found is None:
            return self.embedder, collection  # the search says it does not exist
        with self._info_lock:
            client = self._models.get(found.fingerprint)
            if client is None:
                served = next((m.model for m in self.embedder.models() if m.fingerprint == found.fingerprint), None)
                if served is None:
                    return self.embedder, found.name
                client = self._models[found.fingerprint] = self.embedder.with_model(served)
        return client, found.name

    def max_image_bytes(self) -> int:
        with self._info_lock:  # the first GetModelInfo may reopen the channel: once
            return self.embedder.model_info().max_image_bytes

    def attributes(self, c: CollectionStats) -> dict[str, list[str]]:
        """{key: [values]} over the collection's first ATTRIBUTE_SAMPLE items
        (the index's own file keys left out), cached until it changes."""
        version = (c.updated_at, c.count)
        cached = self._attributes.get(c.name)
        if cached and cached[0] == version:
            return cached[1]
        values: dict[str, set[str]] = {}
        for item in self.ranker.list_items(c.name, limit=ATTRIBUTE_SAMPLE):
            for key, value in item.attributes.items():
                if key not in FILE_KEYS:
                    values.setdefault(key, set()).add(value)
        found = {k: sorted(v)[:MAX_VALUES] for k, v in sorted(values.items())}
        self._attributes[c.name] = (version, found)
        return found

    def gallery_file(self, name: str) -> Path:
        """The image file `name` under --gallery once `..` and symlinks are
        resolved; anything else is a 404."""
        if self.config.gallery is None:
            raise WebError(404, "this page has no gallery folder: start `imagesearch web` with --gallery DIR "
                                "(the indexed folder) for thumbnails and \"more like this\"")
        path = file_inside(self.config.gallery, name) if is_image_path(name) else None
        if path is None:
            raise WebError(404, f"{name!r} is not an image file under the gallery folder")
        return path

    def thumbnail(self, path: Path, etag: str) -> bytes:
        """The cached thumbnail for `etag`, made (outside the lock) when missing."""
        with self._thumbs_lock:
            data = self._thumbs.get(etag)
            if data is not None:
                self._thumbs.move_to_end(etag)
                return data
        data = thumbnail_jpeg(path, THUMB_PX)
        if data is None:
            raise WebError(404, f"{path.name} cannot be read as an image")
        with self._thumbs_lock:
            self._thumbs[etag] = data
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data


# ---------------------------------------------------------------- requests


async def _read_form(request: Request, cap: int) -> FormData:
    """The request's form, read through a counter that stops at `cap` bytes
    (files spool to disk past 1 MB); no body, or another type: an empty form."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return FormData()

    async def capped():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                raise _too_large(f"over {seen:,} bytes", cap - FORM_OVERHEAD)
            yield chunk

    try:
        if kind == "multipart/form-data":
            return await MultiPartParser(request.headers, capped(), max_files=1, max_fields=100).parse()
        return await FormParser(request.headers, capped()).parse()
    except MultiPartException as exc:
        raise WebError(400, f"the form could not be read: {exc.message}") from None


def _search_options(params: dict[str, list[str]]) -> dict:
    """RankerClient.search's keyword arguments (and min_score) from the
    request's parameters, each checked."""
    def one(key: str) -> str | None:
        values = [v for v in params.get(key, []) if v != ""]
        return values[-1] if values else None

    def number(key: str, kind, low, high, default):
        text = one(key)
        try:
            value = default if text is None else kind(text)
        except ValueError:
            raise WebError(400, f"{key} must be a number, not {text!r}") from None
        if value is not None and not low <= value <= high:
            raise WebError(400, f"{key} must be between {low} and {high} (got {text})")
        return value

    collection = one("collection")
    if not collection:
        raise WebError(400, "name a collection (GET /api/collections lists them)")
    return {"collection": collection, "top_k": number("top_k", int, 1, MAX_TOP_K, 10),
            "min_score": number("min_score", float, -1.0, 1.0, None),
            "filters": parse_pairs([f for f in params.get("filter", []) if f], "filter"),
            **rerank_options(one("query_expansion"), one("rerank"), flags=("query_expansion", "rerank"))}


async def search(request: Request) -> JSONResponse:
    backend: Backend = request.app.state.backend
    limit = await run_in_threadpool(backend.max_image_bytes)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + FORM_OVERHEAD:
        raise _too_large(f"{int(length):,} bytes", limit)
    form = await _read_form(request, limit + FORM_OVERHEAD)
    try:
        params: dict[str, list[str]] = {}
        for key, value in [*request.query_params.multi_items(), *form.multi_items()]:
            if isinstance(value, str):
                params.setdefault(key, []).append(value)
        options = _search_options(params)
        image, gallery_name = form.get("image"), (params.get("gallery_name") or [""])[-1]
        if isinstance(image, UploadFile):
            name, data = image.filename or "image", await image.read()
        elif gallery_name:
            name = gallery_name
            data = await run_in_threadpool(backend.gallery_file(gallery_name).read_bytes)
        else:
            raise WebError(400, "send an image file in the multipart field `image`, "
                                "or name a gallery image in `gallery_name`")
    finally:
        await form.close()
    if len(data) > limit:
        raise _too_large(f"{len(data):,} bytes", limit)
    if not data:
        raise WebError(400, f"{name} is empty: send an image file")
    model, options["collection"] = await run_in_threadpool(backend.model_for, options["collection"])
    try:
        query = await run_in_threadpool(model.embed, data, name)
    except UsageError as exc:
        if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        raise WebError(400, f"{name} is not an image the embedder can read ({exc}): "
                            "send a photo (JPEG, PNG, WebP, ...)") from None
    min_score = options.pop("min_score")
    matches = await run_in_threadpool(functools.partial(
        backend.ranker.search, vector=query.vector, fingerprint=query.fingerprint, with_attributes=True, **options))
    return JSONResponse({"collection": options["collection"], "fingerprint": query.fingerprint, "query": name,
                         "matches": [match_json(m) for m in above(matches, min_score)]})


async def list_collections(request: Request) -> JSONResponse:
    backend: Backend = request.app.state.backend
    stats = await run_in_threadpool(backend.ranker.stats)
    aliases = await run_in_threadpool(backend.ranker.list_aliases)
    by_name = {c.name: c for c in stats.collections}
    found = []  # aliases first: what the page should search through
    for name, c in [(a.name, by_name[a.collection]) for a in aliases if a.collection in by_name] + \
            [(c.name, c) for c in stats.collections]:
        found.append({"name": name, "count": c.count, "dim": c.dim, "kind": c.kind, "fingerprint": c.fingerprint,
                      "alias_of": c.name if name != c.name else "",
                      "attributes": await run_in_threadpool(backend.attributes, c)})
    try:
        limit: int | None = await run_in_threadpool(backend.max_image_bytes)
    except ClientError:
        limit = None  # the embedder is down: searching says so
    return JSONResponse({"collections": found, "max_top_k": stats.max_top_k, "max_image_bytes": limit,
                         "rerank": list(RERANK_CHOICES), "gallery": backend.config.gallery is not None})


async def thumbnail(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    path = backend.gallery_file(request.path_params["name"])
    st = path.stat()
    etag = '"%s"' % hashlib.sha256(f"{path}\0{st.st_mtime_ns}\0{st.st_size}\0{THUMB_PX}".encode()).hexdigest()[:24]
    headers = {"etag": etag, "cache-control": "private, no-cache"}  # revalidated each time: a 304 is cheap
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    data = await run_in_threadpool(backend.thumbnail, path, etag)
    return Response(data, media_type="image/jpeg", headers=headers)


async def healthz(request: Request) -> JSONResponse:
    backend: Backend = request.app.state.backend
    problems = []
    for client in (backend.embedder, backend.ranker):
        try:
            await run_in_threadpool(functools.partial(client.wait_ready, connect_timeout=1.0, ready_timeout=1.0))
        except ClientError as exc:
            problems.append(str(exc))
    return JSONResponse({"status": "unavailable" if problems else "ok", "problems": problems},
                        status_code=503 if problems else 200)


async def index(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html")


# ---------------------------------------------------------------- the app


class Guard:
    """ASGI middleware: the security headers on every response and, with a
    web token, the token on every request but /healthz: `Authorization:
    Bearer TOKEN`, or the cookie that opening /?token=TOKEN once sets."""

    def __init__(self, app, token: str | None):
        self.app = app
        self.token = token.encode() if token else None

    def _is_token(self, value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(value.encode(), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers[key] = value
            await send(message)

        if self.token and scope["path"] != "/healthz":
            request = Request(scope)
            bearer = request.headers.get("authorization", "")
            if not (self._is_token(bearer.removeprefix("Bearer ")) if bearer.startswith("Bearer ")
                    else self._is_token(request.cookies.get(TOKEN_COOKIE))):
                if scope["path"] == "/" and self._is_token(request.query_params.get("token")):
                    rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                    response = RedirectResponse("/" + (f"?{rest}" if rest else ""), status_code=303)
                    response.set_cookie(TOKEN_COOKIE, request.query_params["token"], httponly=True,
                                        samesite="strict", secure=request.url.scheme == "https")
                else:
                    response = JSONResponse(
                        {"error": "this page needs its token: open /?token=TOKEN once in the browser, or send "
                                  "'Authorization: Bearer TOKEN' (imagesearch web --web-token)", "status": 401},
                        status_code=401, headers={"www-authenticate": "Bearer"})
                return await response(scope, receive, send_secured)
        await self.app(scope, receive, send_secured)


def create_app(config: WebConfig) -> Starlette:
    backend = Backend(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        backend.close()

    app = Starlette(
        routes=[Route("/", index), Route("/healthz", healthz), Route("/api/search", search, methods=["POST"]),
                Route("/api/collections", list_collections), Route("/thumbs/{name:path}", thumbnail),
                Mount("/static", StaticFiles(directory=STATIC), name="static")],
        middleware=[Middleware(Guard, token=config.web_token)],
        exception_handlers={WebError: _error, ClientError: _error}, lifespan=lifespan)
    app.state.backend = backend
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: a free port), so the URL printed is the real one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP
    # (with proto 0, Nagle meets delayed ACKs and every answer waits 40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror} (another --port?)") from None
    return sock


def serve(config: WebConfig, host: str = "127.0.0.1", port: int = 8080, *, announce=print) -> None:
    """Serve the page until Ctrl-C / SIGTERM; `announce` gets its URL first."""
    import uvicorn

    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    announce(f"http://{shown}:{sock.getsockname()[1]}/")
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning", server_header=False,
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
