"""The `imagesearch web` API through Starlette's ASGI test client, against real
embedder and ranker processes holding a tiny gallery of real photos: a photo
finds its original at rank 1, each error has its status and says what to do,
thumbnails come only from under --gallery (with an ETag), every answer has the
Content-Security-Policy, and --web-token shuts out whoever lacks it."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the [web] extra: pip install 'imagesearch[web]'")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx (dev extra)")

from starlette.testclient import TestClient  # noqa: E402

from clients import RankerClient  # noqa: E402
from clients.cli import main as cli_main  # noqa: E402
from clients.embedder import EmbedderClient  # noqa: E402
from clients.cli.jobs import index_folder  # noqa: E402
from clients.web.app import WebConfig, bind, create_app  # noqa: E402
from testkit import ServiceProcess, sample_photos  # noqa: E402

COLLECTION = "photos"
MAX_IMAGE_BYTES = 300_000
CLASSES = ("a", "a", "b", "b", "c", "c")


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with ServiceProcess("embedder_service", "--backbone", "efficientnet_lite0",
                        "--max-image-bytes", MAX_IMAGE_BYTES, startup_timeout=180) as embedder, \
            ServiceProcess("ranker_service", "--db", tmp_path_factory.mktemp("db") / "g.db") as ranker:
        yield embedder, ranker


@pytest.fixture(scope="module")
def gallery(services, tmp_path_factory) -> Path:
    """Six real photos in class folders a, b, c, indexed with their class."""
    root = tmp_path_factory.mktemp("gallery")
    for i, (data, cls) in enumerate(zip(sample_photos(len(CLASSES), max_side=320), CLASSES)):
        (root / cls).mkdir(exist_ok=True)
        (root / cls / f"photo{i}.jpg").write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    embedder, ranker = services
    with EmbedderClient(embedder.address) as emb, RankerClient(ranker.address) as rank:
        report = index_folder(emb, rank, root, collection=COLLECTION, progress=False, attributes_from_folders=True)
    assert report.done == len(CLASSES), report
    return root


@pytest.fixture(scope="module")
def client(services, gallery):
    embedder, ranker = services
    with TestClient(create_app(WebConfig(embedder.address, ranker.address, gallery=gallery))) as c:
        yield c


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def jpeg(side: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 40)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.slow
def test_a_photo_finds_its_original_at_rank_1(client, gallery):
    data = (gallery / "b" / "photo3.jpg").read_bytes()
    r = client.post("/api/search", files={"image": ("photo3.jpg", data, "image/jpeg")},
                    data={"collection": COLLECTION, "top_k": "3"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["collection"] == COLLECTION and len(answer["fingerprint"]) == 64
    assert [m["rank"] for m in answer["matches"]] == [1, 2, 3]
    first = answer["matches"][0]
    assert first["name"] == "b/photo3.jpg" and first["score"] > 0.99 and first["attributes"]["class"] == "b"
    # "More like this" by name, a filter (IN) and a minimum score, parameters in the query string.
    r = client.post(f"/api/search?collection={COLLECTION}&filter=class=a&filter=class=c&min_score=-1",
                    data={"gallery_name": "b/photo3.jpg"})
    assert r.status_code == 200, r.text
    assert {m["attributes"]["class"] for m in r.json()["matches"]} == {"a", "c"}
    r = client.post("/api/search", data={"gallery_name": "b/photo3.jpg", "collection": COLLECTION,
                                         "min_score": "0.999", "query_expansion": "2", "rerank": ""})
    assert [m["name"] for m in r.json()["matches"]] == ["b/photo3.jpg"]


@pytest.mark.slow
def test_collections_offer_their_attributes(client):
    r = client.get("/api/collections")
    assert r.status_code == 200
    (coll,) = r.json()["collections"]
    assert coll["name"] == COLLECTION and coll["count"] == len(CLASSES)
    assert coll["attributes"] == {"class": ["a", "b", "c"]}  # the index's sha256/size/mtime stay out
    assert r.json()["max_image_bytes"] == MAX_IMAGE_BYTES and "k-reciprocal" in r.json()["rerank"]
    assert client.get("/healthz").json() == {"status": "ok", "problems": []}


@pytest.mark.slow
def test_bad_input_is_a_400_that_says_what_to_do(client):
    r = client.post("/api/search", files={"image": ("notes.jpg", b"plain text, no pixels", "image/jpeg")},
                    data={"collection": COLLECTION})
    assert r.status_code == 400 and "not an image" in r.json()["error"] and "JPEG" in r.json()["error"]
    for form, words in [({"collection": COLLECTION}, "send an image"),
                        ({"collection": COLLECTION, "top_k": "0", "gallery_name": "a/photo0.jpg"}, "top_k"),
                        ({"collection": COLLECTION, "top_k": "ten", "gallery_name": "a/photo0.jpg"}, "number"),
                        ({"collection": COLLECTION, "min_score": "2", "gallery_name": "a/photo0.jpg"}, "min_score"),
                        ({"collection": COLLECTION, "filter": "class", "gallery_name": "a/photo0.jpg"}, "KEY=VALUE"),
                        ({"collection": COLLECTION, "query_expansion": "x", "gallery_name": "a/photo0.jpg"}, "N:ALPHA"),
                        ({"collection": COLLECTION, "rerank": "dba", "gallery_name": "a/photo0.jpg"}, "k-reciprocal"),
                        ({"gallery_name": "a/photo0.jpg"}, "name a collection")]:
        r = client.post("/api/search", data=form)
        assert r.status_code == 400 and words in r.json()["error"], (form, r.text)


@pytest.mark.slow
def test_too_large_is_a_413_before_the_body_is_read(client):
    big = jpeg() + b"\0" * MAX_IMAGE_BYTES
    r = client.post("/api/search", files={"image": ("big.jpg", big, "image/jpeg")}, data={"collection": COLLECTION})
    assert r.status_code == 413 and f"{MAX_IMAGE_BYTES:,} bytes" in r.json()["error"]
    # Far over: refused on its Content-Length, unread.
    r = client.post("/api/search", files={"image": ("big.jpg", big * 3, "image/jpeg")},
                    data={"collection": COLLECTION})
    assert r.status_code == 413 and "send a smaller one" in r.json()["error"]
    # No Content-Length: the stream is cut at the limit all the same.
    r = client.post("/api/search", content=iter([b"--x\r\n", b"\0" * (2 * MAX_IMAGE_BYTES)]),
                    headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


@pytest.mark.slow
def test_unknown_collection_is_a_404(client):
    r = client.post("/api/search", data={"gallery_name": "a/photo0.jpg", "collection": "nope"})
    assert r.status_code == 404 and "imagesearch index" in r.json()["error"]


@pytest.mark.slow
def test_a_service_down_is_a_503(services, gallery):
    embedder, ranker = services
    for emb, rank in [(closed_port(), ranker.address), (embedder.address, closed_port())]:
        with TestClient(create_app(WebConfig(emb, rank, gallery=gallery, timeout=5))) as c:
            r = c.post("/api/search", data={"gallery_name": "a/photo0.jpg", "collection": COLLECTION})
            assert r.status_code == 503 and "is it running?" in r.json()["error"], r.text
            assert c.get("/healthz").status_code == 503


@pytest.mark.slow
def test_thumbnails_come_only_from_under_the_gallery(client, gallery, tmp_path):
    r = client.get("/thumbs/a/photo0.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    etag = r.headers["etag"]
    again = client.get("/thumbs/a/photo0.jpg", headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b""
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg())
    (gallery / "link.jpg").symlink_to(secret)
    try:
        for path in ["/thumbs/%2e%2e/secret.jpg", f"/thumbs/{secret}", f"/thumbs/%2F{str(secret)[1:]}",
                     "/thumbs/link.jpg", "/thumbs/notes.txt", "/thumbs/a/missing.jpg", "/thumbs/a"]:
            r = client.get(path)
            assert r.status_code == 404 and "under the gallery" in r.json()["error"], path
        r = client.post("/api/search", data={"gallery_name": "../secret.jpg", "collection": COLLECTION})
        assert r.status_code == 404
    finally:
        (gallery / "link.jpg").unlink()


@pytest.mark.slow
def test_every_answer_has_the_security_headers(client):
    for path in ["/", "/static/app.js", "/api/collections", "/thumbs/nope.jpg"]:
        r = client.get(path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp, path
        assert r.headers["x-content-type-options"] == "nosniff"
    page = client.get("/").text
    assert "<script src=\"/static/app.js\"" in page and "<script>" not in page and "http" not in page


@pytest.mark.slow
def test_the_web_token_is_required_when_set(services, gallery):
    embedder, ranker = services
    app = create_app(WebConfig(embedder.address, ranker.address, gallery=gallery, web_token="s3cret"))
    with TestClient(app) as c:
        for path in ["/", "/api/collections", "/thumbs/a/photo0.jpg", "/static/app.js"]:
            r = c.get(path)
            assert r.status_code == 401 and "token" in r.json()["error"] and "content-security-policy" in r.headers
        assert c.get("/api/collections", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/healthz").status_code == 200  # probes need no token
        assert c.get("/api/collections", headers={"authorization": "Bearer s3cret"}).status_code == 200
        r = c.get("/?token=s3cret&collection=photos", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/?collection=photos"
        assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
        assert c.get("/thumbs/a/photo0.jpg").status_code == 200  # the cookie now


def test_web_without_the_extra_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert cli_main(["web"]) == 2
    assert ("imagesearch web needs the [web] extra (uvicorn is not installed): pip install 'imagesearch[web]'"
            in capsys.readouterr().err)
    assert cli_main(["demo", "--web", "--out-dir", os.devnull]) == 2


def test_the_listening_socket_says_it_is_tcp():
    """asyncio turns Nagle off (TCP_NODELAY) only on sockets created as IPPROTO_TCP:
    without it every answer waited 40 ms for a delayed ACK (bench/web.py)."""
    with bind("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[1] > 0
