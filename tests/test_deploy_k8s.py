"""deploy/k8s: the kustomize base and the GPU overlay render with `kubectl
kustomize`, every object validates offline against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail), and the shape the
operations docs promise holds (one ranker replica with a volume, a headless
embedder Service, health probes, resources, non-root, Secrets, HPA, PDB)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from imagesearch import defaults

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"
PROBE_MODULE = "imagesearch.serving.probe"


def render(folder: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations")
    result = subprocess.run([kubectl, "kustomize", str(folder)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module", params=["base", "overlays/gpu"])
def rendered(request) -> tuple[str, dict[tuple[str, str], dict]]:
    docs = render(K8S / request.param)
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(by_kind) == len(docs), "two objects of one kind share a name"
    return request.param, by_kind


def containers(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"]["containers"]


def test_every_object_validates_against_the_kubernetes_schema(rendered):
    _, objects = rendered
    for (kind, name), obj in objects.items():
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{name}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_the_expected_objects_are_there(rendered):
    _, objects = rendered
    assert set(objects) == {("Deployment", "embedder"), ("Service", "embedder"), ("HorizontalPodAutoscaler", "embedder"),
                            ("PodDisruptionBudget", "embedder"), ("StatefulSet", "ranker"), ("Service", "ranker")}


def test_ranker_is_one_replica_with_a_persistent_volume_under_its_db(rendered):
    _, objects = rendered
    ranker = objects[("StatefulSet", "ranker")]
    assert ranker["spec"]["replicas"] == 1
    assert ranker["spec"]["serviceName"] == "ranker"
    claims = {c["metadata"]["name"] for c in ranker["spec"]["volumeClaimTemplates"]}
    (container,) = containers(ranker)
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    db = Path(env["IMAGESEARCH_RANKER_DB"])
    assert any(db.is_relative_to(mounts[c]) for c in claims), f"{db} is not on a PersistentVolumeClaim"
    assert ("HorizontalPodAutoscaler", "ranker") not in objects


def test_embedder_service_is_headless_so_round_robin_sees_every_pod(rendered):
    _, objects = rendered
    service = objects[("Service", "embedder")]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= \
        objects[("Deployment", "embedder")]["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("workload, port", [(("Deployment", "embedder"), defaults.EMBEDDER_PORT),
                                            (("StatefulSet", "ranker"), defaults.RANKER_PORT)])
def test_probes_ask_the_standard_health_service_on_the_served_port(rendered, workload, port):
    _, objects = rendered
    (container,) = containers(objects[workload])
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"] == [port]
    env = {e["name"]: e.get("value") for e in container["env"]}
    metrics_port = int(env[f"IMAGESEARCH_{workload[1].upper()}_METRICS_PORT"])
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"] == [metrics_port]
    annotations = objects[workload]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port) and annotations["prometheus.io/scrape"] == "true"
    service = objects[("Service", workload[1])]
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", PROBE_MODULE], probe
        assert command[-1] == f"127.0.0.1:{port}", probe
        assert ("--alive" in command) == (probe == "livenessProbe"), probe


@pytest.mark.parametrize("workload", [("Deployment", "embedder"), ("StatefulSet", "ranker")])
def test_runs_as_non_root_with_resources_and_secrets(rendered, workload):
    _, objects = rendered
    pod = objects[workload]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    token = next(e for e in container["env"] if e["name"] == defaults.AUTH_TOKEN_ENV)
    assert token["valueFrom"]["secretKeyRef"] == {"name": "imagesearch-auth", "key": "token"}
    tls_volume = next(v for v in pod["volumes"] if "secret" in v)
    assert tls_volume["secret"]["secretName"] == "imagesearch-tls"
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    assert any(k.endswith("_TLS_CERT") for k in env) and any(k.endswith("_TLS_KEY") for k in env)


def test_embedder_scales_with_an_hpa_and_keeps_one_pod_through_drains(rendered):
    _, objects = rendered
    hpa = objects[("HorizontalPodAutoscaler", "embedder")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "embedder"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in objects[("Deployment", "embedder")]["spec"], "the HPA owns the replica count"
    pdb = objects[("PodDisruptionBudget", "embedder")]
    assert pdb["spec"]["minAvailable"] >= 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        objects[("Deployment", "embedder")]["spec"]["template"]["metadata"]["labels"].items()


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_image_and_leaves_the_ranker_on_cpu(rendered):
    variant, objects = rendered
    (embedder,) = containers(objects[("Deployment", "embedder")])
    (ranker,) = containers(objects[("StatefulSet", "ranker")])
    assert "nvidia.com/gpu" not in ranker["resources"]["limits"]
    if variant == "base":
        assert embedder["image"] == "imagesearch:cpu"
        assert "nvidia.com/gpu" not in embedder["resources"]["limits"]
        return
    assert embedder["image"] == "imagesearch:cuda"
    assert embedder["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value") for e in embedder["env"]}
    assert env["IMAGESEARCH_EMBEDDER_DEVICE"] == "cuda"
    assert env[defaults.AUTH_TOKEN_ENV] is None, "the overlay must keep the base's env (the token from its Secret)"
