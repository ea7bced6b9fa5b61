"""Render the kustomize overlays in k8s/ and validate every object offline.

Core kinds are validated with kubernetes-validate's bundled, strict schemas (unknown fields fail);
ray.io kinds against the openAPIV3Schema of the KubeRay v1.7.0 CRDs, made strict the way the API
server's strict field validation treats them (an unknown field is an error, not silently pruned).
Also the walkers the property checks share: pod templates, containers, Ray cluster specs.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

# libyaml parses the 60k lines of CRDs ~15x faster than the pure-Python loader.
YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
# KubeRay v1.7.0's CRDs (its released YAML files) validate the ray.io objects. A clone does not carry
# them: ATTNLAB_KUBERAY_CRDS names their folder (CI's .ci/run sets it); without it those checks skip.
CRD_DIR = Path(os.environ["ATTNLAB_KUBERAY_CRDS"]) if os.environ.get("ATTNLAB_KUBERAY_CRDS") else None
CRD_SKIP_REASON = ("KubeRay v1.7.0 CRDs not available: set ATTNLAB_KUBERAY_CRDS to a folder holding their YAML "
                   "files to validate the RayCluster/RayJob objects against them")
# The oldest Kubernetes release the manifests are written for (KubeRay 1.7 supports it; kubectl here).
KUBERNETES_VERSION = "1.32"
OVERLAYS = tuple(sorted(p.parent.name for p in (K8S_DIR / "overlays").glob("*/kustomization.yaml")))

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def kubectl() -> str:
    """The kubectl binary (KUBECTL overrides); a clear failure, never a skip, when it is missing."""
    path = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not path:
        raise RuntimeError(
            "kubectl not found on PATH (set KUBECTL=/path/to/kubectl): the k8s tests render the overlays "
            "with `kubectl kustomize`. Install it with `apt-get install kubectl` (Debian) or any "
            "kubectl >= 1.27, which has kustomize v5 built in."
        )
    return path


@functools.cache
def render(kustomization_dir: str) -> tuple[dict, ...]:
    """`kubectl kustomize DIR`, parsed; cached per directory (rendering is the slow part)."""
    result = subprocess.run(
        [kubectl(), "kustomize", kustomization_dir], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization_dir} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.load_all(result.stdout, Loader=YamlLoader) if doc)


def render_overlay(name: str) -> list[dict]:
    """A fresh deep copy of an overlay's objects, safe to mutate in a test."""
    return copy.deepcopy(list(render(str(K8S_DIR / "overlays" / name))))


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    if len(found) != 1:
        raise AssertionError(f"expected exactly one {kind} {name or ''}, found {len(found)}")
    return found[0]


# --- schemas ------------------------------------------------------------------------------------


def strict_schema(schema: dict) -> dict:
    """Copy of an OpenAPI v3 CRD schema in which objects with declared properties reject others.

    Mirrors the API server's strict field validation (kubectl's default): free-form maps
    (additionalProperties given) and x-kubernetes-preserve-unknown-fields stay open.
    """
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> strict validator, for every served version of every KubeRay CRD."""
    if CRD_DIR is None:
        pytest.skip(CRD_SKIP_REASON)
    if not CRD_DIR.is_dir():
        raise RuntimeError(f"ATTNLAB_KUBERAY_CRDS={CRD_DIR} is not a folder")
    validators = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=YamlLoader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def is_ray_kind(obj: dict) -> bool:
    return obj.get("apiVersion", "").startswith("ray.io/")


def schema_errors(obj: dict) -> list[str]:
    """Why obj is not a valid object of its kind ([] when it is)."""
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    api_version = obj.get("apiVersion", "")
    if api_version.startswith("ray.io/"):
        validator = crd_validators().get((api_version, obj.get("kind")))
        if validator is None:
            return [f"{where}: no KubeRay v1.7.0 CRD serves {api_version} {obj.get('kind')}"]
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
        ]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]
    return []


# --- walkers ------------------------------------------------------------------------------------


def ray_cluster_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, RayClusterSpec) of a RayCluster, or of the cluster a RayJob / RayService creates."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj.get("kind") == "RayCluster":
        yield name, obj["spec"]
    elif obj.get("kind") == "RayJob" and "rayClusterSpec" in obj["spec"]:
        yield f"{name}.rayClusterSpec", obj["spec"]["rayClusterSpec"]
    elif obj.get("kind") == "RayService":
        yield f"{name}.rayClusterConfig", obj["spec"]["rayClusterConfig"]


def pod_templates(obj: dict) -> Iterator[tuple[str, str, dict]]:
    """(where, role, pod template) for every pod an object makes; role names the Ray ones."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    kind = obj.get("kind")
    if kind in WORKLOAD_KINDS:
        yield name, "workload", obj["spec"]["template"]
    elif kind == "CronJob":
        yield name, "workload", obj["spec"]["jobTemplate"]["spec"]["template"]
    elif kind == "Pod":
        yield name, "workload", {"metadata": obj["metadata"], "spec": obj["spec"]}
    for where, spec in ray_cluster_specs(obj):
        yield f"{where}.head", "ray-head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{where}.{group['groupName']}", "ray-worker", group["template"]
    if kind == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        yield f"{name}.submitter", "ray-submitter", obj["spec"]["submitterPodTemplate"]


def autoscaler_container(cluster_spec: dict) -> dict | None:
    """The sidecar KubeRay adds to the head pod, as far as the spec decides it (autoscalerOptions)."""
    if not cluster_spec.get("enableInTreeAutoscaling"):
        return None
    options = cluster_spec.get("autoscalerOptions", {})
    head_image = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    return {
        "name": "autoscaler",
        "image": options.get("image", head_image),
        "env": options.get("env", []),
        "resources": options.get("resources", {}),
        "securityContext": options.get("securityContext", {}),
    }


def containers(obj: dict) -> Iterator[tuple[str, str, dict, dict]]:
    """(where, role, pod spec, container) for every container, init containers and autoscaler included."""
    for where, role, template in pod_templates(obj):
        spec = template["spec"]
        for key in ("initContainers", "containers"):
            for container in spec.get(key, []):
                yield f"{where}/{container['name']}", role, spec, container
    for where, cluster_spec in ray_cluster_specs(obj):
        sidecar = autoscaler_container(cluster_spec)
        if sidecar is not None:
            head_spec = cluster_spec["headGroupSpec"]["template"]["spec"]
            yield f"{where}.head/autoscaler", "ray-autoscaler", head_spec, sidecar


def env_value(container: dict, name: str) -> str | None:
    for var in container.get("env", []):
        if var["name"] == name:
            return var.get("value")
    return None
