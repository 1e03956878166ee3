"""deploy/Dockerfile and deploy/compose.yaml, checked statically (no Docker
engine runs here): stages, the non-root user, the ports, the health probes,
the volume under the ranker's database, the embedder's replicas; and the probe
command they use, run against a real server."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from imagesearch import defaults, serving
from tests.certs import make_pki

yaml = pytest.importorskip("yaml")
tomllib = pytest.importorskip("tomllib", reason="Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
PROBE = ["python", "-m", "imagesearch.serving.probe"]
USER_ID = "10001"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> dict[str, dict]:
    """Stage name -> {base, instructions}; the last, unnamed stage is 'final'."""
    result, current = {}, None
    for word, rest in instructions(path):
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else "final"
            current = result[name] = {"base": parts[0], "instructions": []}
        elif current is not None:
            current["instructions"].append((word, rest))
    return result


def effective(all_stages: dict, name: str, instruction: str, variant: str) -> list[str]:
    """Every value of `instruction` in stage `name` and the stages it builds on."""
    stage = all_stages[name]
    base = stage["base"].replace("${VARIANT}", variant)
    inherited = effective(all_stages, base, instruction, variant) if base in all_stages else []
    return inherited + [rest for word, rest in stage["instructions"] if word == instruction]


@pytest.fixture(scope="module")
def dockerfile() -> dict:
    return stages(DOCKERFILE)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_dockerfile_is_multi_stage_with_cpu_default_and_cuda_by_argument(dockerfile):
    assert DOCKERFILE.read_text().count("\nARG VARIANT=cpu\n") == 1
    assert dockerfile["final"]["base"] == "runtime-${VARIANT}"
    assert {"build", "runtime", "runtime-cpu", "runtime-cuda"} <= set(dockerfile)
    for variant in ("cpu", "cuda"):
        copies = effective(dockerfile, "final", "COPY", variant)
        assert any(c.startswith("--from=build ") for c in copies), "the runtime copies the venv from the build stage"
        assert not effective(dockerfile, "final", "RUN", variant) or all(
            "pip install" not in r for r in effective(dockerfile, "final", "RUN", variant)), \
            "nothing is pip-installed in the runtime stage"


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_image_runs_as_the_non_root_user(dockerfile, variant):
    users = effective(dockerfile, "final", "USER", variant)
    assert users and users[-1].split(":")[0] == USER_ID
    assert any(f"--uid {USER_ID}" in r for r in effective(dockerfile, "final", "RUN", variant))


def test_image_exposes_the_service_ports_and_health_checks_with_the_probe(dockerfile):
    exposed = {int(p) for e in effective(dockerfile, "final", "EXPOSE", "cpu") for p in e.split()}
    assert {defaults.EMBEDDER_PORT, defaults.RANKER_PORT} <= exposed
    (check,) = effective(dockerfile, "final", "HEALTHCHECK", "cpu")
    command = check.split(" CMD ", 1)[1]
    assert shlex.split(command)[:3] == PROBE
    env = " ".join(effective(dockerfile, "final", "ENV", "cpu"))
    assert f"IMAGESEARCH_PROBE_ADDRESS=127.0.0.1:{defaults.EMBEDDER_PORT}" in env


def test_every_copied_path_exists_and_passes_the_dockerignore(dockerfile):
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for name, stage in dockerfile.items():
        for word, rest in stage["instructions"]:
            if word != "COPY" or rest.startswith("--from"):
                continue
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path"
                assert source.rstrip("/") in included, f"{source} is excluded by Dockerfile.dockerignore"


def test_commands_are_the_project_entry_points(dockerfile, compose):
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    (cmd,) = effective(dockerfile, "final", "CMD", "cpu")
    assert re.findall(r'"([^"]+)"', cmd)[0] in scripts
    assert compose["services"]["ranker"]["command"][0] == "imagesearch-ranker" in scripts
    assert compose["services"]["embedder"]["command"][0] == "imagesearch-embedder" in scripts


def test_the_image_installs_the_extras_of_the_services_it_runs(dockerfile):
    build = dockerfile["build"]["instructions"]
    args = dict(rest.split("=", 1) for word, rest in build if word == "ARG" and "=" in rest)
    installed = set(args["EXTRAS"].split(","))
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"embedder", "ranker"} <= installed <= set(optional)
    assert any('pip install ".[${EXTRAS}]"' in rest for word, rest in build if word == "RUN")


def test_compose_ranker_keeps_its_database_on_a_volume_and_publishes_its_port(compose):
    ranker = compose["services"]["ranker"]
    db = Path(ranker["environment"]["IMAGESEARCH_RANKER_DB"])
    volumes = {v.split(":")[1]: v.split(":")[0] for v in ranker["volumes"]}
    assert volumes[str(db.parent)] in compose["volumes"], "the database folder is a named volume"
    assert ranker["environment"]["IMAGESEARCH_RANKER_PORT"] == str(defaults.RANKER_PORT)
    assert ranker["ports"] == [f"127.0.0.1:{defaults.RANKER_PORT}:{defaults.RANKER_PORT}"]
    assert "replicas" not in ranker.get("deploy", {}), "one ranker: SQLite has one writer"


def test_compose_embedder_has_replicas_and_no_fixed_host_port(compose):
    embedder = compose["services"]["embedder"]
    replicas = embedder["deploy"]["replicas"]
    default = int(re.fullmatch(r"\$\{EMBEDDER_REPLICAS:-(\d+)\}", replicas).group(1))
    assert default >= 2
    assert "ports" not in embedder, "a fixed host port cannot be shared by replicas"
    assert embedder["environment"]["IMAGESEARCH_EMBEDDER_PORT"] == str(defaults.EMBEDDER_PORT)
    assert compose["services"]["cli"]["environment"]["IMAGESEARCH_EMBEDDER"] == \
        f"dns:///embedder:{defaults.EMBEDDER_PORT}"


@pytest.mark.parametrize("service, port", [("embedder", defaults.EMBEDDER_PORT), ("ranker", defaults.RANKER_PORT)])
def test_compose_services_are_health_checked_non_root_and_read_only(compose, service, port):
    spec = compose["services"][service]
    test = spec["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:4] == PROBE and test[-1] == f"127.0.0.1:{port}"
    assert spec["user"].split(":")[0] == USER_ID
    assert spec["read_only"] is True
    assert "auth-token" in spec["secrets"] and "/run/secrets/auth-token" in spec["command"]
    assert spec["environment"][f"IMAGESEARCH_{service.upper()}_METRICS_PORT"] == "9100"


def run_probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagesearch.serving.probe", *args], check=False, capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def test_the_probe_reports_serving_loading_and_down(grpc_server):
    running, _ = grpc_server(lambda server: None, [], serving_now=False)
    address = f"127.0.0.1:{running.port}"
    loading = run_probe(address)
    assert loading.returncode == 1 and "NOT_SERVING" in loading.stderr
    assert run_probe("--alive", address).returncode == 0, "loading is alive"
    running.set_serving(True)
    ok = run_probe(address)
    assert ok.returncode == 0, ok.stderr
    running.stop(0).wait()
    down = run_probe("--alive", "--timeout", "1", address)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_the_probe_speaks_tls_as_the_kubernetes_probes_do(grpc_server, tmp_path):
    pki = make_pki(tmp_path)
    config = serving.ServerConfig(host="127.0.0.1", port=0, grace_s=1.0, tls_cert=pki.server_cert,
                                  tls_key=pki.server_key)
    running, _ = grpc_server(lambda server: None, [], config)
    address = f"127.0.0.1:{running.port}"
    ok = run_probe("--tls-ca", str(pki.ca), "--tls-server-name", "localhost", address)
    assert ok.returncode == 0, ok.stderr
    assert run_probe("--timeout", "1", address).returncode == 1, "plaintext against a TLS server fails"
