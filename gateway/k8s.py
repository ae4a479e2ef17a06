"""``python -m gateway.k8s --out deploy/k8s/``: Kubernetes manifests for the service.

Written, one object kind per file:
  * namespace.yaml;
  * engine.yaml: the engine Deployment (``python -m service``, command line generated from the
    server's own option declarations; optional GPUs; grpc.health.v1 startup, readiness and
    liveness probes; the model directory from a PersistentVolumeClaim, read-only; keys from a
    Secret; Prometheus scrape annotations on the metrics port) and its headless Service;
  * gateway.yaml: the gateway Deployment and its Service. The gateway runs the gateway-only
    mode (``python -m gateway --upstream <headless Service name>``), so its Envoy config is
    produced at start by the same generator as the local one (gateway/envoy_config.py), with
    the keys from the Secret: Envoy's key filter takes its keys inline, so a config rendered
    here would have to carry them in plain text in a ConfigMap.
The API key Secret is not written (it holds secrets); the README shows how to create it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from gateway.gateway_only import UPSTREAM_FLAG
from service.auth import ENV_KEYS
from service.options import ServerOptions

APP = "cosyvoice"
ENGINE = f"{APP}-engine"
GATEWAY = f"{APP}-gateway"
KEY_SECRET = f"{APP}-api-keys"  # one entry, "keys": comma-separated API keys
MODEL_CLAIM = f"{APP}-models"
GRPC_PORT = 50051
METRICS_PORT = 9464
REST_PORT = 8080
ADMIN_PORT = 9901
ENVOY_STATS_PORT = 9902
MODELS_MOUNT = "/models"
DRAIN_SECONDS = 30  # the server's drain on SIGTERM; the pod waits a little longer


@dataclass(frozen=True)
class K8sOptions:
    namespace: str = APP
    image: str = "cosyvoice-service:0.1.0"
    engine_replicas: int = 2
    gateway_replicas: int = 2
    model_subdir: str | None = "CosyVoice2-0.5B"  # under the model volume; None: embedded
    gpus: int = 0  # per engine pod; 0: CPU
    threads: int | None = None


def _labels(component: str) -> dict:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}


def _meta(name: str, o: K8sOptions, component: str) -> dict:
    return {"name": name, "namespace": o.namespace, "labels": _labels(component)}


def _key_env() -> dict:
    return {"name": ENV_KEYS, "valueFrom": {"secretKeyRef": {"name": KEY_SECRET, "key": "keys"}}}


def _grpc_probe(period: int, failures: int) -> dict:
    # Native gRPC probe: grpc.health.v1 Check, which the server answers without a key.
    return {"grpc": {"port": GRPC_PORT}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def _deployment(name: str, o: K8sOptions, component: str, replicas: int, container: dict,
                volumes: list[dict], scrape: tuple[int, str], **pod_spec: object) -> dict:
    """One container's Deployment; ``scrape``: the (port, path) Prometheus scrapes."""
    port, path = scrape
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, o, component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": _labels(component)},
            "template": {
                "metadata": {"labels": _labels(component), "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                    "prometheus.io/path": path}},
                "spec": {**pod_spec, "containers": [container], "volumes": volumes},
            },
        },
    }


def engine_command(o: K8sOptions) -> list[str]:
    server = ServerOptions(
        model_dir=Path(MODELS_MOUNT) / o.model_subdir if o.model_subdir else None,
        device="cuda" if o.gpus else "cpu", threads=o.threads,
        grpc_host="0.0.0.0", grpc_port=GRPC_PORT, state_dir=Path("/var/lib/cosyvoice"),
        metrics_host="0.0.0.0", metrics_port=METRICS_PORT)
    # The server's default --max-batch for this engine and device, written out so that the
    # manifest shows how many streams a pod runs at once.
    server = replace(server, max_batch=server.resolved_max_batch())
    return ["python", "-m", "service", *server.argv()]


def engine_objects(o: K8sOptions) -> list[dict]:
    resources: dict = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
    if o.gpus:
        resources["limits"]["nvidia.com/gpu"] = o.gpus
    volumes = [{"name": "state", "emptyDir": {}}]
    mounts = [{"name": "state", "mountPath": "/var/lib/cosyvoice"}]
    if o.model_subdir:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": MODEL_CLAIM,
                                                                    "readOnly": True}})
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    container = {
        "name": "engine", "image": o.image, "command": engine_command(o),
        "env": [_key_env(), {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "ports": [{"name": "grpc", "containerPort": GRPC_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        # Loading a model takes minutes on a CPU: liveness waits until the startup probe passed.
        "startupProbe": _grpc_probe(10, 60),
        "readinessProbe": _grpc_probe(5, 2),  # NOT_SERVING (draining): out of the Service
        # Liveness asks only whether the port accepts connections: gRPC health says NOT_SERVING
        # all through a drain, and a liveness failure then would kill the streams it finishes.
        "livenessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "resources": resources, "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    deployment = _deployment(
        ENGINE, o, "engine", o.engine_replicas, container, volumes,
        scrape=(METRICS_PORT, "/metrics"), terminationGracePeriodSeconds=DRAIN_SECONDS + 10)
    # Headless: the name resolves to every ready engine pod's address; Envoy (STRICT_DNS)
    # makes one host of each and re-resolves, so `kubectl scale` needs nothing else.
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(ENGINE, o, "engine"),
        "spec": {"clusterIP": "None", "selector": _labels("engine"),
                 "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc",
                            "appProtocol": "grpc"}]},
    }
    return [deployment, service]


def engine_address(o: K8sOptions) -> str:
    return f"{ENGINE}.{o.namespace}.svc.cluster.local:{GRPC_PORT}"


def gateway_command(o: K8sOptions) -> list[str]:
    return ["python", "-m", "gateway", UPSTREAM_FLAG, engine_address(o),
            "--host", "0.0.0.0", "--port", str(REST_PORT), "--admin-port", str(ADMIN_PORT),
            "--stats-port", str(ENVOY_STATS_PORT), "--state-dir", "/var/lib/cosyvoice-gateway"]


def gateway_objects(o: K8sOptions) -> list[dict]:
    container = {
        "name": "gateway", "image": o.image, "command": gateway_command(o),
        "env": [_key_env(), {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "ports": [{"name": "http", "containerPort": REST_PORT},
                  {"name": "envoy-stats", "containerPort": ENVOY_STATS_PORT}],
        # /healthz: 200 while at least one engine replica passes Envoy's health check.
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                           "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"},
                      "limits": {"memory": "512Mi"}},
        "volumeMounts": [{"name": "state", "mountPath": "/var/lib/cosyvoice-gateway"}],
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    deployment = _deployment(GATEWAY, o, "gateway", o.gateway_replicas, container,
                             [{"name": "state", "emptyDir": {}}],
                             scrape=(ENVOY_STATS_PORT, "/stats/prometheus"))
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(GATEWAY, o, "gateway"),
        "spec": {"selector": _labels("gateway"),
                 # REST and gRPC (HTTP/2 cleartext) on the one port.
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    return [deployment, service]


def manifests(o: K8sOptions) -> dict[str, list[dict]]:
    """File name -> the objects in it."""
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": o.namespace, "labels": {"app.kubernetes.io/name": APP}}}
    return {"namespace.yaml": [namespace], "engine.yaml": engine_objects(o),
            "gateway.yaml": gateway_objects(o)}


HEADER = "# Generated by `python -m gateway.k8s{args}`; edit gateway/k8s.py, not this file.\n"


def render(o: K8sOptions, args: str = "") -> dict[str, str]:
    return {name: HEADER.format(args=args) + yaml.safe_dump_all(objects, sort_keys=False)
            for name, objects in manifests(o).items()}


def main(argv: list[str] | None = None) -> int:
    defaults = K8sOptions()
    p = argparse.ArgumentParser(prog="python -m gateway.k8s", description="Write Kubernetes "
                                "manifests for the engine servers and the gateway.")
    p.add_argument("--out", type=Path, required=True, help="directory to write them into")
    p.add_argument("--namespace", default=defaults.namespace)
    p.add_argument("--image", default=defaults.image,
                   help="an image with the project installed (scripts/setup.sh)")
    p.add_argument("--engine-replicas", type=int, default=defaults.engine_replicas)
    p.add_argument("--gateway-replicas", type=int, default=defaults.gateway_replicas)
    p.add_argument("--model-subdir", default=defaults.model_subdir,
                   help=f"model directory inside the {MODEL_CLAIM} volume ('' for the "
                        "embedded engine, no volume)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per engine pod (0: CPU)")
    p.add_argument("--threads", type=int, default=None, help="engine threads per pod")
    a = p.parse_args(argv)
    o = K8sOptions(namespace=a.namespace, image=a.image, engine_replicas=a.engine_replicas,
                   gateway_replicas=a.gateway_replicas, model_subdir=a.model_subdir or None,
                   gpus=a.gpus, threads=a.threads)
    shown = " ".join(x for x in (argv if argv is not None else sys.argv[1:]))
    a.out.mkdir(parents=True, exist_ok=True)
    for name, text in render(o, f" {shown}" if shown else "").items():
        (a.out / name).write_text(text)
        print(a.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
