"""Prometheus metrics of real service processes (`--metrics-port 0`): each
counter moves by exactly the calls made, scraped over HTTP before and after
and parsed with prometheus-client's own parser."""

from __future__ import annotations

import re
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit import ServiceProcess, sample_photos
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, ranker_pb2, ranker_pb2_grpc

METRICS_LINE = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
RANKER = "/imagesearch.v1.RankerService/"
EMBEDDER = "/imagesearch.v1.EmbedderService/"


def metrics_url(service: ServiceProcess) -> str:
    match = METRICS_LINE.search(service.output)
    assert match, service.output
    return f"http://{match.group(1)}:{match.group(2)}/metrics"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before, after, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def unit(dim: int, seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def test_ranker_counters_move_by_exactly_the_calls_made(tmp_path):
    with ServiceProcess("ranker_service", "--db", str(tmp_path / "r.db"), "--metrics-port", "0") as ranker, \
            ranker.channel() as channel:
        url = metrics_url(ranker)
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        before = scrape(url)
        for start, n in ((0, 3), (3, 2)):
            stub.Upsert(iter([ranker_pb2.UpsertRequest(collection="c", name=f"n{i}", vector=unit(8, i),
                                                       fingerprint="fp") for i in range(start, start + n)]),
                        timeout=30)
        for i in range(3):
            assert len(list(stub.Search(ranker_pb2.SearchRequest(collection="c", vector=unit(8, i), top_k=2),
                                        timeout=30))) == 2
        for request, code in ((ranker_pb2.SearchRequest(collection="nope", vector=unit(8, 0)), "NOT_FOUND"),
                              (ranker_pb2.SearchRequest(collection="c", vector=[0.0] * 8), "INVALID_ARGUMENT")):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Search(request, timeout=30))
            assert err.value.code().name == code
        stub.Delete(ranker_pb2.DeleteRequest(collection="c", names=["n0", "missing"]), timeout=30)
        stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=30)
        after = scrape(url)

    requests = "imagesearch_ranker_requests_total"
    assert moved(before, after, requests, method=RANKER + "Upsert", code="OK") == 2
    assert moved(before, after, requests, method=RANKER + "Search", code="OK") == 3
    assert moved(before, after, requests, method=RANKER + "Search", code="NOT_FOUND") == 1
    assert moved(before, after, requests, method=RANKER + "Search", code="INVALID_ARGUMENT") == 1
    assert moved(before, after, requests, method=RANKER + "Delete", code="OK") == 1
    assert moved(before, after, requests, method=RANKER + "GetStats", code="OK") == 1
    ours = {k for k in after if k[0] == requests and dict(k[1])["method"].startswith(RANKER)}
    assert sum(moved(before, after, requests, **dict(labels)) for _, labels in ours) == 9, "no other call counted"
    assert moved(before, after, "imagesearch_ranker_request_duration_seconds_count", method=RANKER + "Search") == 5
    assert value(after, "imagesearch_ranker_requests_in_flight", method=RANKER + "Search") == 0
    assert moved(before, after, "imagesearch_ranker_upserted_rows_total") == 5
    assert moved(before, after, "imagesearch_ranker_deleted_rows_total") == 1
    assert moved(before, after, "imagesearch_ranker_search_duration_seconds_count", kind="exact") == 3
    assert value(after, "imagesearch_ranker_vectors", collection="c", kind="exact") == 4
    assert value(after, "imagesearch_ranker_memory_bytes", collection="c", kind="exact") >= 4 * 8 * 4
    assert value(after, "imagesearch_ranker_database_bytes") > 0
    assert value(after, "process_resident_memory_bytes") > 0, "the library's process collector is there"


@pytest.mark.slow
def test_embedder_counters_move_by_exactly_the_calls_made():
    good = sample_photos(3, max_side=200)
    with ServiceProcess("embedder_service", "--metrics-port", "0", "--max-wait-ms", "1",
                        "--max-image-pixels", str(300 * 300)) as embedder, embedder.channel() as channel:
        url = metrics_url(embedder)
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        import io

        from PIL import Image
        big = io.BytesIO()
        Image.new("RGB", (400, 400), (200, 10, 10)).save(big, "PNG")
        before = scrape(url)
        for data in good[:2]:
            stub.Embed(embedder_pb2.EmbedRequest(image=data), timeout=60)
        for data, code in ((b"not an image", "INVALID_ARGUMENT"), (big.getvalue(), "RESOURCE_EXHAUSTED")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Embed(embedder_pb2.EmbedRequest(image=data, name="bad"), timeout=60)
            assert err.value.code().name == code
        replies = list(stub.EmbedStream(iter([embedder_pb2.EmbedStreamRequest(id=str(i), image=d)
                                              for i, d in enumerate(good)]), timeout=60))
        assert len(replies) == 3 and all(r.WhichOneof("result") == "embedding" for r in replies)
        stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=30)
        after = scrape(url)

    requests = "imagesearch_embedder_requests_total"
    assert moved(before, after, requests, method=EMBEDDER + "Embed", code="OK") == 2
    assert moved(before, after, requests, method=EMBEDDER + "Embed", code="INVALID_ARGUMENT") == 1
    assert moved(before, after, requests, method=EMBEDDER + "Embed", code="RESOURCE_EXHAUSTED") == 1
    assert moved(before, after, requests, method=EMBEDDER + "EmbedStream", code="OK") == 1
    assert moved(before, after, requests, method=EMBEDDER + "GetModelInfo", code="OK") == 1
    one = {"model": "default"}  # the single-model flags serve one model named default
    refused = "imagesearch_embedder_images_refused_total"
    assert moved(before, after, refused, **one, reason="undecodable") == 1
    assert moved(before, after, refused, **one, reason="too_many_pixels") == 1
    assert moved(before, after, refused, **one, reason="too_many_bytes") == 0
    assert moved(before, after, "imagesearch_embedder_decode_seconds_count", **one) == 7
    assert moved(before, after, "imagesearch_embedder_batch_size_images_sum", **one) == 5, "5 good images through the model"
    assert moved(before, after, "imagesearch_embedder_inference_seconds_count", **one) == \
        moved(before, after, "imagesearch_embedder_batch_size_images_count", **one) >= 3
    assert value(after, "imagesearch_embedder_queue_depth_images", **one) == 0
    assert value(after, "imagesearch_embedder_requests_in_flight", method=EMBEDDER + "Embed") == 0


def test_metrics_are_off_unless_asked_for(tmp_path):
    with ServiceProcess("ranker_service", "--db", str(tmp_path / "r.db")) as ranker:
        pass
    assert "metrics on" not in ranker.output


@pytest.mark.slow
def test_serve_gives_each_replica_its_own_metrics_port(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from testkit import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "--db", str(tmp_path / "g.db"),
                             "--embedder-port", "0", "--ranker-port", "0", "--embedder-replicas", "2",
                             "--metrics-port", "0"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "IMAGESEARCH_TORCH_THREADS": "1"})
    urls: dict[str, str] = {}
    lines = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stderr:
            lines.append(line)
            found = re.search(r"^\s+(\S+) metrics: (http://\S+)", line)
            if found:
                urls[found.group(1)] = found.group(2)
            if line.startswith("serving:") or time.monotonic() > deadline:
                break
        assert set(urls) == {"ranker", "embedder-1", "embedder-2"}, "".join(lines)
        assert len(set(urls.values())) == 3, urls
        for what, url in urls.items():
            service = "ranker" if what == "ranker" else "embedder"
            samples = scrape(url)
            assert any(name.startswith(f"imagesearch_{service}_") for name, _ in samples), (what, url)
            other = "embedder" if service == "ranker" else "ranker"
            assert not any(name.startswith(f"imagesearch_{other}_") for name, _ in samples)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_the_metrics_endpoint_answers_metrics_alone(tmp_path):
    import urllib.error

    with ServiceProcess("ranker_service", "--db", str(tmp_path / "r.db"), "--metrics-port", "0") as ranker:
        url = metrics_url(ranker)
        assert scrape(url)
        for path in ("/", "/metrics/", "/metricsx", "/favicon.ico", "/../metrics/x"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url.removesuffix("/metrics") + path, timeout=10)
            assert refused.value.code == 404, path


@pytest.mark.parametrize("flags, shown", [((), "hashed"), (("--metrics-collections", "names"), "names")])
def test_with_a_token_collection_names_stay_off_the_metrics_page_unless_allowed(tmp_path, flags, shown):
    import hashlib

    token = "metrics-test-token"
    with ServiceProcess("ranker_service", "--db", str(tmp_path / "r.db"), "--metrics-port", "0", *flags,
                        env={"IMAGESEARCH_AUTH_TOKEN": token}) as ranker, ranker.channel() as channel:
        ranker_pb2_grpc.RankerServiceStub(channel).Upsert(
            iter([ranker_pb2.UpsertRequest(collection="secret-shop", name="a", vector=unit(8, 0), fingerprint="fp")]),
            timeout=30, metadata=[("authorization", f"Bearer {token}")])
        with urllib.request.urlopen(metrics_url(ranker), timeout=10) as reply:
            page = reply.read().decode()
        label = "secret-shop" if shown == "names" else hashlib.sha256(b"secret-shop").hexdigest()[:12]
        assert f'imagesearch_ranker_vectors{{collection="{label}",kind="exact"}} 1.0' in page
        assert ("secret-shop" in page) == (shown == "names")
