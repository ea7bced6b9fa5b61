"""Property checks for the Ray and MLflow side: the sweep entrypoint, images, tracking URIs, token
auth, the RayJob lifecycle, shared storage, GPUs and the network paths to MLflow and PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import re
import shlex
import tomllib
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

from mlflow.server.security_utils import is_allowed_host_header
from packaging.requirements import Requirement

from .k8s_render import REPO_ROOT, by_kind, containers, env_value, one, pod_templates, ray_cluster_specs

MLFLOW_SERVICE, POSTGRES_SERVICE = "mlflow", "postgres"
# The namespace of the ingress controller that serves the MLflow UI (docs/deploy.md).
INGRESS_NAMESPACE = "ingress-nginx"
RAY_POD_ROLES = ("ray-head", "ray-worker")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# Sweep names are the modules in orchestrator/sweeps/; these stand in while that folder has none.
FALLBACK_SWEEP_NAMES = ("colt5",)


def sweep_names(repo_root: Path = REPO_ROOT) -> tuple[str, ...]:
    found = sorted(p.stem for p in (repo_root / "orchestrator" / "sweeps").glob("*.py") if p.stem[0] != "_")
    return tuple(found) or FALLBACK_SWEEP_NAMES


def parse_sweep_command(entrypoint: str, names: tuple[str, ...]) -> argparse.Namespace:
    """Parse `python -m orchestrator.sweep NAME [options]` with the sweep CLI's own parser."""
    from orchestrator.cli import parse_args

    argv = shlex.split(entrypoint)
    if argv[:1] not in (["python"], ["python3"]) or argv[1:3] != ["-m", "orchestrator.sweep"]:
        raise ValueError(f"entrypoint {entrypoint!r} is not `python -m orchestrator.sweep NAME ...`")
    usage = io.StringIO()
    # The CLI defaults --tracking-uri / --storage from the environment: parse as in a bare shell, so
    # this process's variables don't leak into what the RayJob would run.
    bare = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ATTNLAB_STORAGE")}
    try:
        with contextlib.redirect_stderr(usage), mock.patch.dict(os.environ, bare, clear=True):
            args = parse_args(argv[3:])
    except SystemExit:
        message = (usage.getvalue().strip().splitlines() or ["the sweep CLI exited"])[-1]
        raise ValueError(f"{entrypoint!r}: {message}") from None
    if args.name not in names:
        raise ValueError(f"sweep {args.name!r} is not one of {list(names)}")
    return args


def sweep_args(job: dict) -> argparse.Namespace | None:
    """A RayJob's sweep arguments; None when its entrypoint does not parse (check_rayjob says why)."""
    try:
        entrypoint = job["spec"]["entrypoint"]
        return parse_sweep_command(entrypoint, tuple(shlex.split(entrypoint)[3:4]))
    except (ValueError, KeyError):
        return None


def pinned_ray_version(pyproject: Path = REPO_ROOT / "pyproject.toml") -> str:
    for dependency in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement = Requirement(dependency)
        if requirement.name == "ray":
            (spec,) = requirement.specifier
            if spec.operator != "==":
                raise ValueError(f"pyproject pins ray with {spec}: the image and rayVersion could drift")
            return spec.version
    raise ValueError("pyproject.toml does not depend on ray")


# --- Ray: clusters, the RayJob, images ----------------------------------------------------------


def check_ray(objs: list[dict], ray_version: str) -> list[str]:
    problems = []
    for obj in by_kind(objs, "RayCluster") + by_kind(objs, "RayJob"):
        if not DNS_1035_LABEL.match(obj["metadata"]["name"]):
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: name is not a DNS-1035 label")
    for obj in objs:
        for where, spec in ray_cluster_specs(obj):
            if spec.get("rayVersion") != ray_version:
                problems.append(f"{where}: rayVersion {spec.get('rayVersion')} != pinned ray {ray_version}")
            auth = spec.get("authOptions", {})
            if auth.get("mode") != "token" or not auth.get("secretName"):
                problems.append(f"{where}: token authentication must be on, from a named Secret")
            if not spec.get("enableInTreeAutoscaling"):
                problems.append(f"{where}: the worker group must autoscale (enableInTreeAutoscaling)")
            groups = spec.get("workerGroupSpecs", [])
            templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]
            v2 = spec.get("autoscalerOptions", {}).get("version") == "v2"
            if v2 and any(t["spec"].get("restartPolicy", "Never") != "Never" for t in templates):
                problems.append(f"{where}: autoscaler v2 needs restartPolicy Never or unset")
            for group in groups:
                low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
                if not (0 <= low <= group.get("replicas", low) <= high and high >= 1):
                    problems.append(
                        f"{where}.{group['groupName']}: needs 0 <= min <= replicas <= max, max >= 1"
                    )
            for group in [spec["headGroupSpec"], *groups]:
                start_params = set(group.get("rayStartParams", {}))
                if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & start_params:
                    problems.append(
                        f"{where}: resources in both rayStartParams and the group (KubeRay rejects)"
                    )
    for obj in objs:
        for where, _role, _pod, container in containers(obj):
            mode = env_value(container, "RAY_AUTH_MODE")
            if mode not in (None, "token"):
                problems.append(f"{where}: RAY_AUTH_MODE={mode} switches token authentication off")
    return problems


def job_cluster_from(cluster_spec: dict) -> dict:
    """The cluster a RayJob should run: the RayCluster's spec with every worker group at full size."""
    spec = copy.deepcopy(cluster_spec)
    for group in spec.get("workerGroupSpecs", []):
        group["minReplicas"] = group["replicas"] = group["maxReplicas"]
    return spec


def check_rayjob(objs: list[dict], names: tuple[str, ...]) -> list[str]:
    from attention.config import ConfigError
    from orchestrator.sweep import prepare

    problems = []
    clusters = by_kind(objs, "RayCluster")
    for job in by_kind(objs, "RayJob"):
        where, spec = f"RayJob/{job['metadata']['name']}", job["spec"]
        try:
            # prepare() is the sweep's own check of everything that can fail before Ray starts.
            prepare(parse_sweep_command(spec.get("entrypoint", ""), names))
        except (ValueError, ConfigError) as e:
            problems.append(f"{where}: {e}")
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append(f"{where}: shutdownAfterJobFinishes must be true (free the cluster)")
        if not spec.get("ttlSecondsAfterFinished", 0) > 0:
            problems.append(f"{where}: ttlSecondsAfterFinished must be positive")
        if not isinstance(spec.get("backoffLimit"), int) or spec["backoffLimit"] < 0:
            problems.append(f"{where}: backoffLimit must be set (>= 0)")
        if "backoffLimit" not in spec.get("submitterConfig", {}):
            problems.append(f"{where}: submitterConfig.backoffLimit must be set")
        if not spec.get("activeDeadlineSeconds", 0) > 0:
            problems.append(f"{where}: activeDeadlineSeconds must be positive")
        if spec.get("clusterSelector") or "rayClusterSpec" not in spec:
            problems.append(f"{where}: must create its own cluster (rayClusterSpec, no clusterSelector)")
        elif not any(spec["rayClusterSpec"] == job_cluster_from(c["spec"]) for c in clusters):
            problems.append(f"{where}: rayClusterSpec is not the RayCluster's spec with workers at full size")
        submitter = spec.get("submitterPodTemplate", {}).get("spec", {})
        if (
            spec.get("submissionMode", "K8sJobMode") != "K8sJobMode"
            or submitter.get("restartPolicy") != "Never"
        ):
            problems.append(
                f"{where}: K8sJobMode with a submitter pod template (restartPolicy Never) expected"
            )
    return problems


def check_images_agree(objs: list[dict]) -> list[str]:
    """One image for every Ray container (head, workers, submitter, autoscaler), another for MLflow."""
    ray_images = {w: c["image"] for o in objs for w, role, _p, c in containers(o) if role.startswith("ray-")}
    if not ray_images:
        return ["no Ray containers rendered"]
    if len(set(ray_images.values())) != 1:
        return [f"Ray containers run different images: {ray_images}"]
    backends = _workloads_behind(objs, one(objs, "Service", MLFLOW_SERVICE))
    if any(container["image"] in ray_images.values() for _w, _t, container in backends):
        return ["MLflow runs the Ray image; it has its own (docker/Dockerfile target mlflow)"]
    return []


# --- MLflow, tracking URIs, storage -------------------------------------------------------------


def _namespace(objs: list[dict]) -> str:
    return one(objs, "Namespace")["metadata"]["name"]


def _service_hosts(name: str, namespace: str) -> set[str]:
    return {name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"}


def _service_port(service: dict) -> int:
    (port,) = service["spec"]["ports"]
    return port["port"]


def _workloads_behind(objs: list[dict], service: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod template, container) of every container in the pods a Service selects."""
    selector = service["spec"]["selector"]
    return [
        (where, template, container)
        for obj in objs
        for where, _role, template in pod_templates(obj)
        if all(template["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
        for container in template["spec"]["containers"]
    ]


def check_tracking(objs: list[dict]) -> list[str]:
    """Every tracking URI names the MLflow Service, and the server accepts that Host header."""
    namespace = _namespace(objs)
    service = one(objs, "Service", MLFLOW_SERVICE)
    port = _service_port(service)
    backends = _workloads_behind(objs, service)
    if len(backends) != 1:
        return [f"Service/{MLFLOW_SERVICE} selects {len(backends)} containers, expected the MLflow server"]
    (server_where, _template, server), problems = backends[0], []
    hosts = env_value(server, "MLFLOW_SERVER_ALLOWED_HOSTS") or ""
    allowed = [h.strip() for h in hosts.split(",") if h.strip()]
    if not allowed:
        problems.append(f"{server_where}: MLFLOW_SERVER_ALLOWED_HOSTS unset; MLflow 3 rejects Service hosts")
    uris = {}
    for obj in objs:
        for where, role, _pod, container in containers(obj):
            if role in RAY_POD_ROLES:
                uris[where] = env_value(container, "MLFLOW_TRACKING_URI")
        args = sweep_args(obj) if obj["kind"] == "RayJob" else None
        if args is not None and args.tracking_uri:
            uris[f"RayJob/{obj['metadata']['name']} --tracking-uri"] = args.tracking_uri
    if not uris:
        problems.append("no Ray container to check MLFLOW_TRACKING_URI on")
    expected = f"http://{MLFLOW_SERVICE}.{namespace}.svc:{port}"
    for where, uri in uris.items():
        parts = urlsplit(uri or "")
        if (parts.scheme, parts.port) != ("http", port) or parts.hostname not in _service_hosts(
            MLFLOW_SERVICE, namespace
        ):
            problems.append(f"{where}: tracking URI {uri!r} is not the MLflow Service ({expected})")
        elif allowed and not is_allowed_host_header(allowed, parts.netloc):
            problems.append(f"{where}: MLflow's allowed hosts {allowed} reject Host {parts.netloc!r}")
    for ingress in by_kind(objs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            if MLFLOW_SERVICE in {p["backend"]["service"]["name"] for p in rule["http"]["paths"]}:
                if not is_allowed_host_header(allowed, rule["host"]):
                    problems.append(
                        f"Ingress/{ingress['metadata']['name']}: MLflow rejects Host {rule['host']!r}"
                    )
    return problems + check_mlflow_server(objs, server_where, server)


def check_mlflow_server(objs: list[dict], where: str, server: dict) -> list[str]:
    """Artifacts proxied to S3, PostgreSQL behind the backend store URI, probes."""
    problems, args, namespace = [], server.get("command", []) + server.get("args", []), _namespace(objs)
    if "--serve-artifacts" not in args or "--no-serve-artifacts" in args:
        problems.append(f"{where}: the server must proxy artifacts (--serve-artifacts)")
    destination = env_value(server, "MLFLOW_ARTIFACTS_DESTINATION") or ""
    if not destination.startswith("s3://"):
        problems.append(f"{where}: MLFLOW_ARTIFACTS_DESTINATION {destination!r} is not an s3:// bucket")
    store = urlsplit(env_value(server, "MLFLOW_BACKEND_STORE_URI") or "")
    postgres_port = _service_port(one(objs, "Service", POSTGRES_SERVICE))
    if (
        not store.scheme.startswith("postgresql")
        or store.port != postgres_port
        or (store.hostname not in _service_hosts(POSTGRES_SERVICE, namespace))
    ):
        problems.append(f"{where}: MLFLOW_BACKEND_STORE_URI must point at the {POSTGRES_SERVICE} Service")
    endpoint = env_value(server, "MLFLOW_S3_ENDPOINT_URL")
    services = [s["metadata"]["name"] for s in by_kind(objs, "Service")]
    if endpoint and not any(urlsplit(endpoint).hostname in _service_hosts(s, namespace) for s in services):
        problems.append(f"{where}: MLFLOW_S3_ENDPOINT_URL {endpoint} is no Service here")
    for probe in ("readinessProbe", "livenessProbe"):
        if probe not in server:
            problems.append(f"{where}: no {probe}")
    return problems


def check_storage(objs: list[dict], single_node: bool) -> list[str]:
    """ATTNLAB_STORAGE is on a PersistentVolumeClaim in every Ray pod; ReadWriteMany unless one node."""
    problems, claims = [], {c["metadata"]["name"]: c for c in by_kind(objs, "PersistentVolumeClaim")}
    for obj in objs:
        for where, role, template in pod_templates(obj):
            if role not in RAY_POD_ROLES:
                continue
            container = template["spec"]["containers"][0]
            path = env_value(container, "ATTNLAB_STORAGE") or ""
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            mounts = [
                m["name"]
                for m in container.get("volumeMounts", [])
                if path.startswith(m["mountPath"].rstrip("/") + "/")
            ]
            claim = (
                volumes.get(mounts[-1], {}).get("persistentVolumeClaim", {}).get("claimName")
                if mounts
                else None
            )
            if claim not in claims:
                problems.append(f"{where}: ATTNLAB_STORAGE {path!r} is not on a PersistentVolumeClaim here")
            elif not single_node and "ReadWriteMany" not in claims[claim]["spec"]["accessModes"]:
                problems.append(
                    f"{where}: claim {claim} is not ReadWriteMany: workers on other nodes can't mount it"
                )
    return problems


# --- GPUs ---------------------------------------------------------------------------------------


def check_gpus(objs: list[dict], expect_gpus: bool) -> list[str]:
    """GPU workers: requests == limits, a toleration and a node selector; the sweep asks for them."""
    problems, gpus_per_pod = [], []
    for obj in objs:
        for where, role, template in pod_templates(obj):
            spec = template["spec"]
            for container in spec["containers"]:
                limits = container.get("resources", {}).get("limits", {})
                requests = container.get("resources", {}).get("requests", {})
                if "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests:
                    continue
                gpus_per_pod.append(int(limits.get("nvidia.com/gpu", 0)))
                if str(requests.get("nvidia.com/gpu", limits.get("nvidia.com/gpu"))) != str(
                    limits.get("nvidia.com/gpu")
                ):
                    problems.append(f"{where}: nvidia.com/gpu requests != limits")
                if role != "ray-worker":
                    problems.append(f"{where}: only Ray workers should take GPUs")
                if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
                    problems.append(f"{where}: GPU pod without a toleration for the nvidia.com/gpu taint")
                if not spec.get("nodeSelector") and not spec.get("affinity"):
                    problems.append(f"{where}: GPU pod without a node selector or affinity")
    if expect_gpus != bool(gpus_per_pod):
        problems.append(
            f"GPU workers expected: {expect_gpus}; containers asking for GPUs: {len(gpus_per_pod)}"
        )
    for job in by_kind(objs, "RayJob"):
        args = sweep_args(job)
        if args is None:
            continue
        trial_gpus = args.gpus_per_trial
        if not gpus_per_pod and trial_gpus != 0:
            problems.append(f"RayJob/{job['metadata']['name']}: no GPUs here, pass --gpus-per-trial 0")
        if gpus_per_pod and not (trial_gpus and 0 < trial_gpus / args.workers_per_trial <= min(gpus_per_pod)):
            # Pass it explicitly: the sweep's default counts the GPUs present when it starts.
            problems.append(
                f"RayJob/{job['metadata']['name']}: --gpus-per-trial must be set and fit a worker"
            )
    return problems


# --- network policies ---------------------------------------------------------------------------


def selector_matches(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        fails = {
            "In": labels.get(key) not in values,
            "NotIn": key in labels and labels[key] in values,
            "Exists": key not in labels,
            "DoesNotExist": key in labels,
        }[operator]
        if fails:
            return False
    return True


def allowed_sources(objs: list[dict], target_labels: dict, port: int) -> tuple[set[str], set[str]] | None:
    """Pods of this namespace (by 'where') and outside sources allowed to reach `port` on pods with
    `target_labels`; None when no NetworkPolicy restricts ingress to those pods.
    """
    namespace = one(objs, "Namespace")["metadata"]
    ns_labels = {**namespace.get("labels", {}), "kubernetes.io/metadata.name": namespace["name"]}
    policies = [
        p
        for p in by_kind(objs, "NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(p["spec"]["podSelector"], target_labels)
    ]
    if not policies:
        return None
    pods = [(where, t["metadata"].get("labels", {})) for o in objs for where, _role, t in pod_templates(o)]
    local, outside = set(), set()
    for rule in (rule for policy in policies for rule in policy["spec"].get("ingress", [])):
        if rule.get("ports") and port not in [p.get("port") for p in rule["ports"]]:
            continue
        if not rule.get("from"):
            return None  # a rule without peers admits every source
        for peer in rule["from"]:
            ns_selector = peer.get("namespaceSelector")
            if "ipBlock" in peer:
                outside.add(f"ipBlock {peer['ipBlock']['cidr']}")
                continue
            if ns_selector is None or selector_matches(ns_selector, ns_labels):
                local |= {w for w, labels in pods if selector_matches(peer.get("podSelector", {}), labels)}
            name = (ns_selector or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
            if ns_selector is not None and name != namespace["name"]:
                # Any namespace selector not pinned to this namespace's name may admit other namespaces.
                pinned = (
                    name and ns_selector.keys() == {"matchLabels"} and len(ns_selector["matchLabels"]) == 1
                )
                outside.add(f"namespace/{name}" if pinned else f"namespaces {ns_selector}")
    return local, outside


def check_network_policies(objs: list[dict], ui_namespace: str = INGRESS_NAMESPACE) -> list[str]:
    """Only Ray pods and the UI's ingress controller reach MLflow; only MLflow reaches PostgreSQL."""
    ray_pods = {w for o in objs for w, role, _t in pod_templates(o) if role in RAY_POD_ROLES}
    mlflow, postgres = one(objs, "Service", MLFLOW_SERVICE), one(objs, "Service", POSTGRES_SERVICE)
    mlflow_where, mlflow_template, _ = _workloads_behind(objs, mlflow)[0]
    _pg_where, pg_template, _ = _workloads_behind(objs, postgres)[0]
    problems = []
    for name, template, port, want_local, want_outside in (
        (MLFLOW_SERVICE, mlflow_template, _service_port(mlflow), ray_pods, {f"namespace/{ui_namespace}"}),
        (POSTGRES_SERVICE, pg_template, _service_port(postgres), {mlflow_where}, set()),
    ):
        sources = allowed_sources(objs, template["metadata"]["labels"], port)
        if sources is None:
            problems.append(f"{name}: ingress is not restricted by any NetworkPolicy")
            continue
        local, outside = sources
        if local != want_local:
            problems.append(f"{name}: reachable from {sorted(local)}, expected {sorted(want_local)}")
        if not outside <= want_outside:
            problems.append(f"{name}: reachable from outside the namespace: {sorted(outside - want_outside)}")
    default_deny = [
        p
        for p in by_kind(objs, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and "Ingress" in p["spec"].get("policyTypes", [])
        and not p["spec"].get("ingress")
    ]
    if not default_deny:
        problems.append("no default-deny ingress NetworkPolicy")
    return problems
