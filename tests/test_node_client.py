"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader, loading protos/ as it
ships) against the real embedder and ranker: embed a photo, upsert, search,
and status codes for bad input, a missing collection and a missing token. Its
vector must equal the Python client's for the same bytes. And the TypeScript
stubs that protos/buf.gen.yaml makes type-check.

Needs `node` and `npm ci` in tests/node (CI does both); skips otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testkit import ROOT, ServiceProcess
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc

NODE_DIR = ROOT / "tests" / "node"
TOKEN = "node-test-token"


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("run `npm ci` in tests/node first (CI does)")
    return node


def test_node_client_embeds_upserts_searches_and_gets_status_codes(node, tmp_path):
    import skimage.data

    photo = tmp_path / "photo.jpg"
    Image.fromarray(skimage.data.chelsea()).save(photo, quality=90)
    out = tmp_path / "node.json"
    env = {"IMAGESEARCH_AUTH_TOKEN": TOKEN}
    with ServiceProcess("ranker_service", "--db", str(tmp_path / "r.db"), env=env) as ranker, \
            ServiceProcess("embedder_service", "--max-wait-ms", "1", env=env) as embedder:
        result = subprocess.run(
            [node, "--test", "--test-reporter=spec", str(NODE_DIR / "drive_services.test.mjs")], check=False,
            cwd=NODE_DIR, capture_output=True, text=True, timeout=120,
            env={**os.environ, "IMAGESEARCH_EMBEDDER": embedder.address,
                 "IMAGESEARCH_RANKER": ranker.address, "IMAGESEARCH_AUTH_TOKEN": TOKEN, "PHOTO": str(photo),
                 "OUT": str(out)})
        assert result.returncode == 0, result.stdout + result.stderr
        with embedder.channel() as channel:
            python = embedder_pb2_grpc.EmbedderServiceStub(channel).Embed(
                embedder_pb2.EmbedRequest(image=photo.read_bytes()), metadata=[("authorization", f"Bearer {TOKEN}")],
                timeout=60)
    got = json.loads(out.read_text())
    np.testing.assert_allclose(got["vector"], python.vector, atol=1e-6)
    assert [m["name"] for m in got["matches"]] == ["photo.jpg", "other.jpg"]
    assert (got["bad_input"], got["unknown_collection"], got["no_token"]) == (3, 5, 16)


def test_buf_gen_yaml_typescript_stubs_generate_and_type_check(node, tmp_path):
    """protos/buf.gen.yaml's TypeScript entry, run as docs/clients.md says
    (`buf generate` with protoc-gen-es), gives stubs that `tsc --strict` accepts."""
    yaml = pytest.importorskip("yaml")
    buf = shutil.which("buf") or str(Path(sys.executable).with_name("buf"))
    if not Path(buf).exists():
        pytest.skip("buf is not installed (pip install buf-bin)")
    config = yaml.safe_load((ROOT / "protos" / "buf.gen.yaml").read_text())
    (ts,) = [p for p in config["plugins"] if p.get("local") == "protoc-gen-es"]
    template = {"version": config["version"], "plugins": [{**ts, "out": str(tmp_path / ts["out"])}]}
    bin_dir = NODE_DIR / "node_modules" / ".bin"
    result = subprocess.run([buf, "generate", "--template", json.dumps(template)], check=False, cwd=ROOT / "protos",
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    stubs = sorted((tmp_path / ts["out"] / "imagesearch" / "v1").glob("*_pb.ts"))
    assert [p.name for p in stubs] == ["common_pb.ts", "embedder_pb.ts", "ranker_pb.ts"]
    assert "export const EmbedderService" in stubs[1].read_text()
    assert "export const RankerService" in stubs[2].read_text()
    (tmp_path / "node_modules").symlink_to(NODE_DIR / "node_modules")
    check = subprocess.run([node, str(NODE_DIR / "node_modules" / "typescript" / "bin" / "tsc"), "--noEmit", "--strict",
                            "--target", "es2022", "--module", "esnext", "--moduleResolution", "bundler",
                            "--skipLibCheck", *map(str, stubs)], check=False, cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
