"""Installs by role (pyproject.toml, imagesearch/extras.py).

- The base install is the client library and the contracts: importing them
  loads none of what the extras bring, and what they import (lazily too) is
  exactly the base dependency list.
- Each entry point whose extra is missing says which one to install, in one
  line, and exits 2.
- With IMAGESEARCH_CLIENT_PYTHON naming the python of a base-only install
  (.ci/run builds one), that install embeds, upserts and searches against
  services run from this one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from imagesearch import extras
from tests.test_architecture import MODULES, PRODUCT, import_closure

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# The base install: distribution -> the module it gives.
BASE = {"grpcio": "grpc", "grpcio-health-checking": "grpc_health", "protobuf": "google", "numpy": "numpy",
        "tqdm": "tqdm", "pillow": "PIL"}
# Imported by the client side only behind an extras check (module -> extra).
BEHIND_A_CHECK = {"opentelemetry": "tracing", "starlette": "web", "uvicorn": "web"}
# What the extras bring; the base import must load none of it.
HEAVY = ("torch", "torchvision", "timm", "faiss", "pymilvus", "milvus_lite", "onnxruntime", "onnxscript",
         "sqlite_utils", "matplotlib", "skimage", "sklearn", "pytorch_metric_learning",
         "prometheus_client", "opentelemetry", "starlette", "uvicorn")
CLIENT_SIDE = ("clients", "imagesearch.v1")
CLIENT_PYTHON_ENV = "IMAGESEARCH_CLIENT_PYTHON"


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env, **kwargs)


def test_importing_the_client_library_loads_nothing_of_the_extras():
    code = ("import sys; import clients, clients.cli, clients.cli.commands, clients.cli.parser, imagesearch.v1; "
            "from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, ranker_pb2, ranker_pb2_grpc; "
            f"heavy = {HEAVY!r}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_base_dependencies_are_exactly_what_the_client_side_imports():
    base = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert base == set(BASE)
    client_modules = [m for m in MODULES if m.startswith(CLIENT_SIDE)]
    third_party: dict[str, list[str]] = {}
    for module in client_modules:
        for name, chain in import_closure(module).items():
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in MODULES and top != "__future__":
                third_party.setdefault(top, chain)
    assert set(third_party) - set(BEHIND_A_CHECK) == set(BASE.values()), third_party
    for module, extra in BEHIND_A_CHECK.items():
        assert any(m.startswith(module) for m in extras.EXTRAS[extra][1])


def test_every_extra_the_checks_name_is_in_pyproject():
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras.EXTRAS) <= set(optional)
    for name in ("embedder", "ranker", "milvus", "train", "all", "dev"):
        assert name in optional
    everything = " ".join(optional["all"])
    for name in ("embedder", "ranker", "milvus", "train", "demo"):
        assert name in everything
    assert "imagesearch[all" in " ".join(optional["dev"])


def test_ci_runs_the_readme_test_command_and_the_readme_names_real_extras():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().replace(" --quiet", "")
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv && ")]
    (test_command,) = [c for c in commands if "pytest" in c]
    for part in test_command.split(" && "):
        assert part in ci, part
    (demo_command,) = [c for c in commands if "imagesearch demo" in c]
    assert "'.[demo]'" in demo_command
    optional = PYPROJECT["project"]["optional-dependencies"]
    named = set(re.findall(r"^\| `\[(\w+)\]`", readme, flags=re.MULTILINE))
    assert named == set(optional), "the README's install table names every extra, and only those"


def test_only_the_product_packages_ship():
    setuptools = pytest.importorskip("setuptools")
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = {p.split(".")[0] for p in setuptools.find_packages(str(ROOT), include=include)}
    assert shipped == set(PRODUCT)


def test_console_scripts_are_the_documented_entry_points():
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts == {"imagesearch": "clients.cli:main", "imagesearch-embedder": "embedder_service.__main__:main",
                       "imagesearch-ranker": "ranker_service.__main__:main",
                       "imagesearch-train": "trainer.__main__:main"}


def without(modules, code: str) -> str:
    """`code` run as if `modules` were not installed."""
    return f"import sys; sys.modules.update(dict.fromkeys({list(modules)!r})); {code}"


@pytest.mark.parametrize("module, absent, extra", [
    ("embedder_service", "torch", "embedder"),
    ("ranker_service", "faiss", "ranker"),
    ("ranker_service", "prometheus_client", "ranker"),
    ("trainer", "matplotlib", "train"),
])
def test_a_service_without_its_extra_says_which_to_install(module, absent, extra):
    done = run_python(without([absent], f"import runpy; runpy.run_module({module!r}, run_name='__main__')"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"needs the [{extra}] extra ({absent} is not installed): pip install 'imagesearch[{extra}]'" \
        in done.stderr


def test_the_milvus_backend_without_its_extra_says_which_to_install(tmp_path):
    code = without(["pymilvus"], "from ranker_service.__main__ import main; "
                   f"sys.exit(main(['--backend', 'milvus', '--milvus-uri', {str(tmp_path / 'm.db')!r}]))")
    done = run_python(code)
    assert done.returncode == 2, done.stderr
    assert "error: the ranker's Milvus backend needs the [milvus] extra (pymilvus is not installed): " \
           "pip install 'imagesearch[milvus]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv, absent, extra", [
    (["serve", "--db", "x.db"], "torch", "embedder"),
    (["serve", "--db", "x.db"], "sqlite_utils", "ranker"),
    (["demo"], "skimage", "demo"),
    (["demo"], "faiss", "demo"),
])
def test_cli_commands_that_start_services_say_which_extra_to_install(tmp_path, argv, absent, extra):
    done = run_python(without([absent], f"from clients.cli import main; sys.exit(main({argv!r}))"))
    assert done.returncode == 2, done.stderr
    assert f"needs the [{extra}] extra ({absent} is not installed): pip install 'imagesearch[{extra}]'" \
        in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_run_names_the_missing_extra_only_for_a_service_it_would_start(tmp_path):
    for folder in ("g", "q"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.jpg").write_bytes(b"\xff\xd8\xff")
    argv = ["run", "--gallery", str(tmp_path / "g"), "--query", str(tmp_path / "q"), "--out", str(tmp_path / "r.json"),
            "--embedder", "127.0.0.1:1"]
    done = run_python(without(["faiss"], f"from clients.cli import main; sys.exit(main({argv!r}))"))
    assert done.returncode == 2, done.stderr
    assert "the ranker needs the [ranker] extra" in done.stderr and "give --ranker the address" in done.stderr
    assert "[embedder]" not in done.stderr


def test_tracing_without_its_extra_says_which_to_install():
    code = without(["opentelemetry"], "from imagesearch import tracing; tracing.configure('x')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OTEL_TRACES_EXPORTER": "console"})
    assert done.returncode == 2
    assert "pip install 'imagesearch[tracing]'" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- a real base-only install

CLIENT_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    from pathlib import Path

    import clients
    from clients import EmbedderClient, RankerClient, file_source

    repo, embedder, ranker, photos = sys.argv[1:5]
    # The installed package (in site-packages, wherever the venv lives), not the
    # checkout's clients/; and the base install only.
    here = Path(clients.__file__).resolve()
    assert "site-packages" in here.parts and not here.is_relative_to(Path(repo, "clients").resolve()), here
    extras = [m for m in ("torch", "faiss", "pymilvus", "onnxruntime", "sqlite_utils") if importlib.util.find_spec(m)]
    assert not extras, f"not a base-only install: {extras} installed"
    paths = sorted(Path(photos).iterdir())
    with EmbedderClient(embedder) as emb, RankerClient(ranker) as rank:
        rank.wait_ready(connect_timeout=30)
        emb.wait_ready(connect_timeout=30)
        vectors = {}
        for result in emb.embed_stream([file_source(p.name, p) for p in paths]):
            assert result.ok, result
            vectors[result.name] = result
        stored = rank.upsert("client-only", list(vectors.values()))
        query = paths[0].name
        matches = rank.search("client-only", vectors[query].vector, top_k=3, fingerprint=vectors[query].fingerprint)
    print(json.dumps({"clients": clients.__file__, "stored": stored.upserted,
                      "matches": [(m.rank, m.name, round(m.score, 4)) for m in matches], "query": query}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(CLIENT_PYTHON_ENV),
                    reason=f"{CLIENT_PYTHON_ENV} names no base-only install's python (.ci/run builds one)")
def test_a_base_only_install_embeds_upserts_and_searches(tmp_path):
    from testkit import ServiceProcess, sample_photos

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, data in enumerate(sample_photos(4)):
        (photos / f"photo{i}.jpg").write_bytes(data)
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    with ServiceProcess("embedder_service", "--backbone", "efficientnet_lite0", "--engine", "torch",
                        "--device", "cpu") as emb, \
            ServiceProcess("ranker_service", "--db", tmp_path / "gallery.db") as rank:
        # Outside the checkout, with no PYTHONPATH: the installed package or nothing.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        done = subprocess.run([os.environ[CLIENT_PYTHON_ENV], "-s", str(script), str(ROOT), emb.address,
                               rank.address, str(photos)], capture_output=True, text=True, timeout=180,
                              cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["stored"] == 4
    assert result["matches"][0][:2] == [1, result["query"]]
    assert result["matches"][0][2] == pytest.approx(1.0, abs=1e-3)
