#!/usr/bin/env python3
"""Renders deploy/k8s kustomizations without kubectl: `python deploy/k8s/render.py deploy/k8s/overlays/cpu`.

A deliberately small subset of kustomize, exactly what qllm's base and overlays use, and it refuses anything
else rather than render it wrongly:

- `resources`: YAML files and directories holding a kustomization (rendered first, recursively)
- `namespace`: set on every namespaced object
- `labels`: `pairs` added to metadata.labels, and with `includeTemplates` to pod-template labels;
  `includeSelectors: true` is refused (selectors are written out in the manifests)
- `images`: `name` -> `newName` / `newTag` / `digest` in containers and initContainers
- `patches` with `path` (no `target`): strategic-merge patches matched by apiVersion, kind and name;
  maps merge, `null` deletes a key, lists of containers / env / volumes / volumeMounts / ports merge by
  their key and other lists are replaced

tests/deploy/test_deploy_k8s.py renders base and overlays with this and, where kubectl exists, checks the
output equals `kubectl kustomize`. Needs PyYAML.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}

CLUSTER_SCOPED = {
    "Namespace", "Node", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
    "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass", "APIService",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "CSIDriver", "CSINode",
    "VolumeAttachment",
}
# Workload kinds whose pod template kustomize's `labels.includeTemplates` reaches.
TEMPLATE_LABEL_PATHS = {
    "Deployment": [("spec", "template")],
    "ReplicaSet": [("spec", "template")],
    "DaemonSet": [("spec", "template")],
    "StatefulSet": [("spec", "template")],
    "Job": [("spec", "template")],
    "ReplicationController": [("spec", "template")],
    "CronJob": [("spec", "jobTemplate"), ("spec", "jobTemplate", "spec", "template")],
}
# kustomize's legacy output order (kind first, then name).
KIND_ORDER = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap", "Secret",
    "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume", "PersistentVolumeClaim",
    "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]
KIND_ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
# Strategic-merge keys of the lists qllm's patches touch; any other list is replaced whole.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "envFrom": None, "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name",
}


class RenderError(ValueError):
    pass


def render(directory: str | Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` would print, in its order."""
    return _sort(_build(Path(directory)))


def render_yaml(directory: str | Path) -> str:
    return yaml.safe_dump_all(render(directory), sort_keys=True, default_flow_style=False)


def _load_kustomization(directory: Path) -> dict:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            unknown = set(data) - SUPPORTED_FIELDS
            if unknown:
                raise RenderError(f"{path}: unsupported kustomization fields {sorted(unknown)}")
            return data
    raise RenderError(f"{directory}: no kustomization.yaml")


def _load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise RenderError(f"{path}: not a Kubernetes object: {str(d)[:80]}")
    return docs


def _build(directory: Path) -> list[dict]:
    k = _load_kustomization(directory)
    objects: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        objects.extend(_build(path) if path.is_dir() else _load_docs(path))
    _check_unique(objects, directory)
    for patch_spec in k.get("patches", []):
        if set(patch_spec) != {"path"}:
            raise RenderError(f"{directory}: only `patches: - path: FILE` is supported, not {patch_spec}")
        for patch in _load_docs(directory / patch_spec["path"]):
            _apply_patch(objects, patch, directory / patch_spec["path"])
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for label_spec in k.get("labels", []):
        unknown = set(label_spec) - {"pairs", "includeTemplates", "includeSelectors"}
        if unknown or label_spec.get("includeSelectors"):
            raise RenderError(f"{directory}: labels supports pairs and includeTemplates only")
        pairs = {str(key): str(v) for key, v in label_spec.get("pairs", {}).items()}
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(pairs)
            if label_spec.get("includeTemplates"):
                for path in TEMPLATE_LABEL_PATHS.get(obj["kind"], []):
                    node = _dig(obj, path)
                    if node is not None:
                        node.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    for image in k.get("images", []):
        if set(image) - {"name", "newName", "newTag", "digest"}:
            raise RenderError(f"{directory}: images supports name, newName, newTag, digest")
        for obj in objects:
            _set_images(obj, image)
    return objects


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _ident(obj: dict) -> tuple[str, str, str | None, str]:
    group = obj.get("apiVersion", "").rpartition("/")[0]
    meta = obj["metadata"]
    return group, obj["kind"], meta.get("namespace"), meta["name"]


def _check_unique(objects: list[dict], where: Path) -> None:
    seen = set()
    for obj in objects:
        ident = _ident(obj)
        if ident in seen:
            raise RenderError(f"{where}: {ident[1]}/{ident[3]} appears twice")
        seen.add(ident)


def _apply_patch(objects: list[dict], patch: dict, path: Path) -> None:
    group, kind, namespace, name = _ident(patch)
    matches = [o for o in objects if _ident(o)[:2] == (group, kind) and o["metadata"]["name"] == name
               and (namespace is None or o["metadata"].get("namespace") == namespace)]
    if len(matches) != 1:
        raise RenderError(f"{path}: patch matches {len(matches)} objects ({kind}/{name}), not 1")
    target = matches[0]
    merged = _merge(target, patch, ())
    target.clear()
    target.update(merged)


def _merge(base: Any, patch: Any, path: tuple[str, ...]) -> Any:
    if isinstance(patch, dict) and any(str(k).startswith("$") for k in patch):
        raise RenderError(f"{'.'.join(path)}: patch directives ($patch, $retainKeys, ...) are not supported")
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, (*path, key))
            else:
                out[key] = _strip_nulls(copy.deepcopy(value))
        return out
    if isinstance(base, list) and isinstance(patch, list) and path:
        key = _merge_key(path[-1], base + patch)
        if key is not None:
            # As kustomize orders them: the patch's items (merged into their originals) in the patch's
            # order, then the originals the patch does not mention, in their order.
            out, used = [], set()
            for item in patch:
                match = next((i for i, b in enumerate(base) if isinstance(b, dict) and isinstance(item, dict)
                              and b.get(key) == item.get(key)), None)
                if match is None:
                    out.append(_strip_nulls(copy.deepcopy(item)))
                else:
                    used.add(match)
                    out.append(_merge(base[match], item, (*path, "[]")))
            out.extend(copy.deepcopy(b) for i, b in enumerate(base) if i not in used)
            return out
    return _strip_nulls(copy.deepcopy(patch))


def _merge_key(field: str, items: list) -> str | None:
    if field == "ports":
        dicts = [i for i in items if isinstance(i, dict)]
        return "containerPort" if dicts and all("containerPort" in i for i in dicts) else "port"
    return MERGE_KEYS.get(field)


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def _set_images(node: Any, spec: dict) -> None:
    if isinstance(node, dict):
        for field in ("containers", "initContainers"):
            for container in node.get(field, []) if isinstance(node.get(field), list) else []:
                image = container.get("image")
                if not isinstance(image, str):
                    continue
                name, tag, digest = _split_image(image)
                if name != spec["name"]:
                    continue
                name = spec.get("newName", name)
                if "digest" in spec:
                    container["image"] = f"{name}@{spec['digest']}"
                else:
                    tag = str(spec["newTag"]) if "newTag" in spec else tag
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        for value in node.values():
            _set_images(value, spec)
    elif isinstance(node, list):
        for value in node:
            _set_images(value, spec)


def _sort(objects: list[dict]) -> list[dict]:
    def rank(obj: dict) -> tuple:
        kind = obj["kind"]
        if kind in KIND_ORDER:
            position = KIND_ORDER.index(kind)
        elif kind in KIND_ORDER_LAST:
            position = len(KIND_ORDER) + 1 + KIND_ORDER_LAST.index(kind)
        else:
            position = len(KIND_ORDER)
        meta = obj["metadata"]
        return position, kind, meta.get("namespace") or "", meta["name"]

    return sorted(objects, key=rank)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(render_yaml(argv[0]))
    except RenderError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
