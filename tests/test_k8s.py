"""The committed Kubernetes manifests (deploy/k8s/) are exactly what the generator writes, and
every object in them is valid for a current Kubernetes (kubernetes-validate, strict: unknown
fields are errors)."""

from __future__ import annotations

import copy
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from gateway.k8s import ENGINE, GRPC_PORT, K8sOptions, engine_address, manifests, render
from service import limits
from service.options import parse_server_options
from tests.replicas import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"  # the newest kubernetes-validate 1.37 knows


def test_committed_manifests_are_the_generators_output(tmp_path) -> None:
    expected = render(K8sOptions(), " --out deploy/k8s")
    assert sorted(p.name for p in K8S_DIR.glob("*.yaml")) == sorted(expected)
    for name, text in expected.items():
        assert (K8S_DIR / name).read_text() == text, (
            f"deploy/k8s/{name} is stale: run python -m gateway.k8s --out deploy/k8s")
    # The command line writes the same files.
    subprocess.run([sys.executable, "-m", "gateway.k8s", "--out", str(tmp_path)],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    for name in expected:
        body = (tmp_path / name).read_text().split("\n", 1)[1]
        assert body == expected[name].split("\n", 1)[1]


def _objects(options: K8sOptions) -> list[dict]:
    return [obj for objs in manifests(options).values() for obj in objs]


@pytest.mark.parametrize("options", [K8sOptions(), K8sOptions(gpus=2, model_subdir=None)],
                         ids=["committed", "gpu-embedded"])
def test_every_manifest_is_valid_kubernetes(options) -> None:
    for obj in _objects(options):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_catches_a_wrong_manifest() -> None:
    deployment = copy.deepcopy(_objects(K8sOptions())[1])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _file_objects(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S_DIR / name).read_text()))


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_engine_probes_gpu_secret_and_scrape_annotations() -> None:
    deployment, service = _file_objects("engine.yaml")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT}
    # Liveness must not follow gRPC health: it is NOT_SERVING all through a drain.
    assert container["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert pod["spec"]["terminationGracePeriodSeconds"] > 30  # above the server's drain
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "cosyvoice-api-keys"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    metrics_port = int(pod["metadata"]["annotations"]["prometheus.io/port"])
    assert {"name": "metrics", "containerPort": metrics_port} in container["ports"]
    assert service["spec"]["clusterIP"] == "None"  # headless: Envoy resolves every pod
    # The server's own parser accepts the command line, and it listens where probes look.
    server = parse_server_options(container["command"][3:])
    assert (server.grpc_host, server.grpc_port, server.metrics_port) == (
        "0.0.0.0", GRPC_PORT, metrics_port)
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    gpu = _objects(K8sOptions(gpus=1))[1]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cuda" in gpu["command"]
    # CosyVoice pods batch (a GPU's wide scheduler, or a CPU's), an embedded pod does not
    assert _flag(gpu["command"], "--max-batch") == str(limits.GPU_MAX_BATCH)
    assert _flag(container["command"], "--max-batch") == str(limits.CPU_MAX_BATCH)
    embedded = _objects(K8sOptions(gpus=1, model_subdir=None))[1]
    assert _flag(embedded["spec"]["template"]["spec"]["containers"][0]["command"],
                 "--max-batch") == "1"


def test_gateway_resolves_the_headless_service_through_gateway_only_mode() -> None:
    from gateway.gateway_only import parse_options

    deployment, _ = _file_objects("gateway.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["python", "-m", "gateway"]
    options = parse_options(container["command"][3:])
    (upstream,) = options.upstreams
    assert not upstream.is_ip and f"{upstream.host}:{upstream.port}" == engine_address(
        K8sOptions())
    assert upstream.host.startswith(ENGINE + ".")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == options.stats_port
