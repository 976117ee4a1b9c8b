"""deploy/k8s: renders base and overlays (kubectl kustomize when present, and deploy/k8s/render.py),
validates every object against the Kubernetes OpenAPI schemas offline, and checks what an operator relies on."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu"]
SCHEMA_VERSIONS = ["1.30", "1.37"]  # the oldest supported (preStop sleep) and the newest shipped schemas
IMAGE = "ghcr.io/qllm/qllm:0.1.0"
PORTS = {"router": (50051, 9151), "worker": (50061, 9161), "predictor": (50071, 9171), "kvmanager": (50081, 9181)}


def _load_renderer():
    spec = importlib.util.spec_from_file_location("qllm_deploy_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = _load_renderer()


def kubectl_kustomize(directory: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render.render(K8S / request.param)


def by_kind(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workloads(objects):
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def component(obj) -> str:
    return obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


# --- rendering ------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_matches_kubectl_kustomize(name):
    assert render.render(K8S / name) == kubectl_kustomize(K8S / name)


def test_render_cli(tmp_path):
    out = subprocess.run([sys.executable, str(K8S / "render.py"), str(K8S / "base")], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert [d for d in yaml.safe_load_all(out) if d] == render.render(K8S / "base")


# --- schemas --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(rendered, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    _, objects = rendered
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_schema_check_catches_mistakes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    worker = by_kind(render.render(K8S / "base"), "StatefulSet")["qllm-worker"]
    container = worker["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["prot"] = 50061  # a typo'd field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, SCHEMA_VERSIONS[-1], strict=True)


# --- what the manifests promise -------------------------------------------------------------------------

def test_expected_objects(rendered):
    _, objects = rendered
    assert set(by_kind(objects, "Deployment")) == {"qllm-router", "qllm-predictor", "qllm-kvmanager"}
    assert set(by_kind(objects, "StatefulSet")) == {"qllm-worker"}
    assert set(by_kind(objects, "Service")) == {"qllm-router", "qllm-predictor", "qllm-kvmanager",
                                                "qllm-worker-headless"}
    assert set(by_kind(objects, "PodDisruptionBudget")) == {"qllm-router", "qllm-worker"}
    assert {"qllm-common", "qllm-router", "qllm-worker", "qllm-predictor", "qllm-kvmanager"} <= \
        set(by_kind(objects, "ConfigMap"))
    for obj in objects:
        assert obj["metadata"]["namespace"] == "qllm"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "qllm"


def test_pods_are_hardened_probed_and_scraped(rendered, drain_grace_s):
    _, objects = rendered
    for wl in workloads(objects):
        name = component(wl)
        grpc_port, metrics_port = PORTS[name]
        pod = wl["spec"]["template"]
        spec = pod["spec"]
        assert spec["enableServiceLinks"] is False, name  # would inject QLLM_<SERVICE>_PORT=tcp://...
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "qllm"
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics_port)
        assert annotations["prometheus.io/path"] == "/metrics"
        [container] = spec["containers"]
        assert container["image"] == IMAGE
        assert container["args"] == [name]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": metrics_port}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": grpc_port}, (name, probe)
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}
        res = container["resources"]
        assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert spec["terminationGracePeriodSeconds"] > pre_stop + drain_grace_s, name
        # Every env value's $(VAR) reference names a variable defined before it.
        defined: set[str] = set()
        for env in container.get("env", []):
            for ref in re.findall(r"\$\((\w+)\)", env.get("value", "")):
                assert ref in defined, f"{name}: {env['name']} uses $({ref}) before it is defined"
            defined.add(env["name"])


def test_selectors_match_exactly_one_workload(rendered):
    _, objects = rendered
    pods = {component(wl): wl["spec"]["template"]["metadata"]["labels"] for wl in workloads(objects)}

    def matching(selector):
        return [c for c, labels in pods.items() if all(labels.get(k) == v for k, v in selector.items())]

    for wl in workloads(objects):
        assert matching(wl["spec"]["selector"]["matchLabels"]) == [component(wl)]
    for svc in by_kind(objects, "Service").values():
        [target] = matching(svc["spec"]["selector"])
        assert svc["spec"]["ports"][0]["port"] == PORTS[target][0]
        assert svc["spec"]["ports"][0]["targetPort"] == "grpc"
    for pdb in by_kind(objects, "PodDisruptionBudget").values():
        assert len(matching(pdb["spec"]["selector"]["matchLabels"])) == 1


def test_workers_are_discovered_through_the_headless_service(rendered):
    _, objects = rendered
    headless = by_kind(objects, "Service")["qllm-worker-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses", False) is False
    worker = by_kind(objects, "StatefulSet")["qllm-worker"]
    assert worker["spec"]["serviceName"] == "qllm-worker-headless"
    router = by_kind(objects, "Deployment")["qllm-router"]
    env = {e["name"]: e for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["QLLM_WORKERS"]["value"] == "dns:///qllm-worker-headless.$(POD_NAMESPACE).svc.cluster.local:50061"
    assert env["QLLM_PREDICTOR"]["value"].startswith("qllm-predictor.$(POD_NAMESPACE).") and \
        env["QLLM_PREDICTOR"]["value"].endswith(":50071")
    assert env["QLLM_KVMANAGER"]["value"].endswith(":50081")
    assert by_kind(objects, "Deployment")["qllm-kvmanager"]["spec"]["replicas"] == 1  # one in-memory ledger


def test_every_pod_mounts_the_internal_token_and_the_kvmanager_knows_the_workers(rendered):
    """Issue 16: internal RPCs need the shared token (the Secret qllm-internal-token, mounted read-only where
    QLLM_INTERNAL_TOKEN_FILE points; not optional), and the kvmanager calls only the router's workers."""
    _, objects = rendered
    token_file = by_kind(objects, "ConfigMap")["qllm-common"]["data"]["QLLM_INTERNAL_TOKEN_FILE"]
    for wl in workloads(objects):
        pod = wl["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "qllm-internal-token")
        assert not volume["secret"].get("optional", False)
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
        assert mount["readOnly"] and token_file == mount["mountPath"] + "/internal-token"
    env = {component(wl): {e["name"]: e for e in wl["spec"]["template"]["spec"]["containers"][0]["env"]}
           for wl in workloads(objects)}
    assert env["kvmanager"]["QLLM_WORKERS"]["value"] == env["router"]["QLLM_WORKERS"]["value"]


def test_gpu_base_and_cpu_overlay():
    base = render.render(K8S / "base")
    cpu = render.render(K8S / "overlays" / "cpu")
    gpu_worker = by_kind(base, "StatefulSet")["qllm-worker"]["spec"]["template"]["spec"]
    resources = gpu_worker["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1 and resources["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_worker["tolerations"])
    assert by_kind(base, "ConfigMap")["qllm-worker"]["data"]["QLLM_DEVICE"] == "cuda"

    assert "nvidia.com/gpu" not in yaml.safe_dump_all(cpu)
    cpu_worker = by_kind(cpu, "StatefulSet")["qllm-worker"]["spec"]["template"]["spec"]
    assert "tolerations" not in cpu_worker
    assert by_kind(cpu, "ConfigMap")["qllm-worker"]["data"]["QLLM_DEVICE"] == "cpu"
    threads = int(by_kind(cpu, "ConfigMap")["qllm-worker"]["data"]["QLLM_TORCH_THREADS"])
    cpu_limit = int(cpu_worker["containers"][0]["resources"]["limits"]["cpu"])
    assert threads == cpu_limit - 1  # one core left to the gRPC loop
    # Everything else is the base, unchanged.
    strip = {"StatefulSet", "ConfigMap"}
    assert [o for o in cpu if o["kind"] not in strip] == [o for o in base if o["kind"] not in strip]


def test_configmaps_hold_real_flags_with_valid_values(rendered, parse_service_env):
    _, objects = rendered
    maps = by_kind(objects, "ConfigMap")
    common = maps["qllm-common"]["data"]
    for service in PORTS:
        data = maps[f"qllm-{service}"]["data"]
        wl = next(w for w in workloads(objects) if component(w) == service)
        container = wl["spec"]["template"]["spec"]["containers"][0]
        assert [r["configMapRef"]["name"] for r in container["envFrom"]] == ["qllm-common", f"qllm-{service}"]
        env = {**common, **data}
        # Plain values from the container's env (not the $(VAR) ones) are settings too.
        env.update({e["name"]: e["value"] for e in container.get("env", [])
                    if e["name"].startswith("QLLM_") and "value" in e and "$(" not in e["value"]})
        args = parse_service_env(service, env)
        assert args.host == "0.0.0.0"  # reachable on the pod IP, probes and /metrics included
        assert args.port == PORTS[service][0] and args.metrics_port == PORTS[service][1]


# --- the renderer's own semantics (checked against kubectl where it exists) ----------------------------

def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def sample(tmp_path) -> Path:
    _write(tmp_path / "base" / "kustomization.yaml", """
resources: [app.yaml]
namespace: demo
labels:
  - pairs: {team: ml}
    includeTemplates: true
images:
  - name: example.com/app
    newName: registry.local:5000/app
    newTag: "2.0"
""")
    _write(tmp_path / "base" / "app.yaml", """
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  selector: {matchLabels: {app: a}}
  template:
    metadata: {labels: {app: a}}
    spec:
      tolerations: [{key: k, operator: Exists}]
      initContainers:
        - {name: init, image: example.com/app:1.0}
      containers:
        - name: main
          image: example.com/app:1.0
          args: [a, b]
          env: [{name: A, value: "1"}, {name: B, value: "2"}]
          resources: {limits: {memory: 1Gi, example.com/dev: 1}}
        - {name: side, image: other.org/side@sha256:0000000000000000000000000000000000000000000000000000000000000000}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {X: "1", Y: "2"}
""")
    _write(tmp_path / "overlay" / "kustomization.yaml", """
resources: [../base]
patches:
  - path: patch.yaml
""")
    _write(tmp_path / "overlay" / "patch.yaml", """
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  template:
    spec:
      tolerations: null
      containers:
        - {name: extra, image: example.com/app:1.0}
        - name: main
          args: [c]
          env: [{name: B, value: "3"}, {name: C, value: "4"}]
          resources: {limits: {example.com/dev: null}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {Y: null, Z: "3"}
""")
    return tmp_path


def test_renderer_semantics(sample):
    objects = render.render(sample / "overlay")
    assert [o["kind"] for o in objects] == ["ConfigMap", "Deployment"]
    cfg, app = objects
    assert cfg["data"] == {"X": "1", "Z": "3"} and cfg["metadata"] == {"name": "cfg", "namespace": "demo",
                                                                       "labels": {"team": "ml"}}
    spec = app["spec"]["template"]["spec"]
    assert app["spec"]["template"]["metadata"]["labels"] == {"app": "a", "team": "ml"}
    assert app["spec"]["selector"] == {"matchLabels": {"app": "a"}}  # selectors untouched
    assert "tolerations" not in spec
    extra, main, side = spec["containers"]  # new and patched ones in the patch's order, then the rest
    assert extra == {"name": "extra", "image": "example.com/app:1.0"}  # the base's images ran before
    assert main["args"] == ["c"]  # plain lists are replaced
    # Merged by name, in kustomize's order: the patch's entries first, then the others.
    assert main["env"] == [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}, {"name": "A", "value": "1"}]
    assert main["resources"] == {"limits": {"memory": "1Gi"}}
    assert main["image"] == "registry.local:5000/app:2.0"
    assert spec["initContainers"][0]["image"] == "registry.local:5000/app:2.0"
    assert side["image"].startswith("other.org/side@sha256:")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_renderer_semantics_match_kubectl(sample):
    assert render.render(sample / "overlay") == kubectl_kustomize(sample / "overlay")
    assert render.render(sample / "base") == kubectl_kustomize(sample / "base")


@pytest.mark.parametrize("kustomization", [
    "resources: [a.yaml]\ncommonLabels: {a: b}\n",
    "resources: [a.yaml]\nlabels: [{pairs: {a: b}, includeSelectors: true}]\n",
    "resources: [a.yaml]\npatches: [{path: a.yaml, target: {kind: ConfigMap}}]\n",
    "resources: [a.yaml, a.yaml]\n",
])
def test_renderer_refuses_what_it_does_not_implement(tmp_path, kustomization):
    _write(tmp_path / "kustomization.yaml", kustomization)
    _write(tmp_path / "a.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    with pytest.raises(render.RenderError):
        render.render(tmp_path)
