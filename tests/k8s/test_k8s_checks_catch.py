"""Each property check fails on a copy of a rendered overlay broken the way a real edit could break it.

A check that passes on the real manifests (test_k8s_manifests.py) is only worth something if it can
fail: every case here breaks one thing and asserts the check names it.
"""

from __future__ import annotations

import pytest

from .k8s_checks import (
    check_containers,
    check_env_references,
    check_namespace,
    check_no_literal_secrets,
    check_rbac,
    check_secrets_documented,
    documented_secrets,
)
from .k8s_ray_checks import (
    check_gpus,
    check_images_agree,
    check_network_policies,
    check_ray,
    check_rayjob,
    check_storage,
    check_tracking,
    parse_sweep_command,
    pinned_ray_version,
    sweep_names,
)
from .k8s_render import REPO_ROOT, is_ray_kind, one, render_overlay, schema_errors


def gpu():
    return render_overlay("gpu")


def cluster(objs):
    return one(objs, "RayCluster")["spec"]


def worker(objs):
    return cluster(objs)["workerGroupSpecs"][0]["template"]["spec"]


def head_container(objs):
    return cluster(objs)["headGroupSpec"]["template"]["spec"]["containers"][0]


def mlflow_container(objs):
    return one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def job(objs):
    return one(objs, "RayJob")["spec"]


def set_env(container, name, value):
    container["env"] = [v for v in container.get("env", []) if v["name"] != name] + [
        {"name": name, "value": value}
    ]


def test_schema_rejects_unknown_fields_and_wrong_types():
    objs = gpu()
    mlflow_container(objs)["securityContex"] = {}
    errors = [e for o in objs if not is_ray_kind(o) for e in schema_errors(o)]
    assert any("securityContex" in e for e in errors)


def test_crd_schemas_reject_unknown_fields_and_wrong_types():
    objs = gpu()
    cluster(objs)["headGroupSpec"]["rayStartParam"] = {}
    job(objs)["shutdownAfterJobFinishes"] = "yes"
    errors = [e for o in objs if is_ray_kind(o) for e in schema_errors(o)]
    assert any("rayStartParam" in e for e in errors)
    assert any("shutdownAfterJobFinishes" in e for e in errors)
    assert schema_errors({"apiVersion": "ray.io/v9", "kind": "RayCluster", "metadata": {"name": "x"}})


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda o: worker(o)["containers"][0].pop("resources"), "resources.requests.cpu"),
        (
            lambda o: job(o)["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"].update(
                allowPrivilegeEscalation=True
            ),
            "allowPrivilegeEscalation",
        ),
        (lambda o: cluster(o)["autoscalerOptions"].pop("securityContext"), "autoscaler: no securityContext"),
        (
            lambda o: one(o, "Deployment", "mlflow")["spec"]["template"]["spec"]["initContainers"][0].pop(
                "securityContext"
            ),
            "wait-for-postgres: no securityContext",
        ),
        (
            lambda o: one(o, "StatefulSet")["spec"]["template"]["spec"]["containers"][0].update(
                image="postgres:latest"
            ),
            "latest",
        ),
        (lambda o: worker(o)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda o: worker(o)["containers"][0]["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
        (lambda o: head_container(o)["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRoot"),
    ],
)
def test_container_check_catches(breakage, expected):
    objs = gpu()
    breakage(objs)
    assert any(expected in p for p in check_containers(objs)), check_containers(objs)


def test_env_reference_check_catches_a_typo():
    objs = gpu()
    set_env(
        mlflow_container(objs), "MLFLOW_BACKEND_STORE_URI", "postgresql://$(POSTGRES_USR):x@postgres:5432/m"
    )
    assert any("POSTGRES_USR" in p for p in check_env_references(objs))


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (
            lambda o: o.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "s", "namespace": "attnlab"},
                    "stringData": {"password": "hunter2"},
                }
            ),
            "Secret/s",
        ),
        (lambda o: set_env(mlflow_container(o), "POSTGRES_PASSWORD", "hunter2"), "literal value"),
        (
            lambda o: set_env(
                mlflow_container(o),
                "MLFLOW_BACKEND_STORE_URI",
                "postgresql://mlflow:hunter2@postgres:5432/mlflow",
            ),
            "embeds a password",
        ),
    ],
)
def test_literal_secret_check_catches(breakage, expected):
    objs = gpu()
    breakage(objs)
    assert any(expected in p for p in check_no_literal_secrets(objs))


def test_secret_docs_check_catches_a_missing_secret_or_key():
    markdown = (REPO_ROOT / "docs" / "deploy.md").read_text()
    assert documented_secrets(markdown)["attnlab-ray-token"] == {"auth_token"}
    without_token = markdown.replace("attnlab-ray-token \\", "attnlab-other-token \\")
    assert any("attnlab-ray-token" in p for p in check_secrets_documented(gpu(), without_token))
    without_key = markdown.replace("--from-literal=POSTGRES_USER=mlflow", "--from-literal=PGUSER=mlflow")
    assert any("POSTGRES_USER" in p for p in check_secrets_documented(gpu(), without_key))


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (
            lambda o: o.append(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRole",
                    "metadata": {"name": "x"},
                    "rules": [],
                }
            ),
            "cluster-wide",
        ),
        (
            lambda o: one(o, "Role")["rules"].append(
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
            ),
            "Secrets",
        ),
        (
            lambda o: one(o, "ServiceAccount", "attnlab-mlflow").update(automountServiceAccountToken=True),
            "attnlab-mlflow",
        ),
        (
            lambda o: worker(o).update(automountServiceAccountToken=True),
            "automountServiceAccountToken should be False",
        ),
        (lambda o: worker(o).update(serviceAccountName="default"), "'default' is not a ServiceAccount"),
    ],
)
def test_rbac_check_catches(breakage, expected):
    objs = gpu()
    breakage(objs)
    assert any(expected in p for p in check_rbac(objs)), check_rbac(objs)


def test_namespace_check_catches_a_weaker_profile():
    objs = gpu()
    one(objs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = "baseline"
    assert check_namespace(objs)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda o: cluster(o).update(rayVersion="2.59.0"), "rayVersion"),
        (lambda o: cluster(o)["authOptions"].update(mode="disabled"), "token authentication"),
        (
            lambda o: set_env(worker(o)["containers"][0], "RAY_AUTH_MODE", "disabled"),
            "RAY_AUTH_MODE=disabled",
        ),
        (lambda o: cluster(o)["workerGroupSpecs"][0].update(minReplicas=9), "min <= replicas <= max"),
        (lambda o: worker(o).update(restartPolicy="Always"), "restartPolicy"),
    ],
)
def test_ray_check_catches(breakage, expected):
    objs = gpu()
    breakage(objs)
    assert any(expected in p for p in check_ray(objs, pinned_ray_version())), check_ray(
        objs, pinned_ray_version()
    )


@pytest.mark.parametrize(
    "entrypoint, expected",
    [
        ("python -m orchestrator.sweep no_such_sweep", "no_such_sweep"),
        ("python -m orchestrator.sweep colt5 --gpu-count 1", "unrecognized arguments"),
        ("python -m orchestrator.sweep colt5 --max-concurrent many", "invalid int value"),
        ("python -m orchestrator.sweep colt5 --num-samples 0", "--num-samples"),
        ("python train.py colt5", "is not `python -m orchestrator.sweep"),
    ],
)
def test_rayjob_check_catches_a_bad_entrypoint(entrypoint, expected):
    objs = gpu()
    job(objs)["entrypoint"] = entrypoint
    assert any(expected in p for p in check_rayjob(objs, sweep_names())), check_rayjob(objs, sweep_names())


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda o: job(o).update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
        (lambda o: job(o).pop("ttlSecondsAfterFinished"), "ttlSecondsAfterFinished"),
        (lambda o: job(o).pop("backoffLimit"), "backoffLimit must be set"),
        (
            lambda o: job(o)["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=1, minReplicas=1),
            "workers at full size",
        ),
        (
            lambda o: cluster(o)["headGroupSpec"]["rayStartParams"].update({"num-cpus": "4"}),
            "RayCluster's spec",
        ),
    ],
)
def test_rayjob_check_catches_lifecycle_and_drift(breakage, expected):
    objs = gpu()
    breakage(objs)
    assert any(expected in p for p in check_rayjob(objs, sweep_names())), check_rayjob(objs, sweep_names())


def test_sweep_names_fall_back_to_the_constant_without_sweep_modules(tmp_path):
    assert sweep_names(tmp_path) == ("colt5",)
    (tmp_path / "orchestrator" / "sweeps").mkdir(parents=True)
    (tmp_path / "orchestrator" / "sweeps" / "mine.py").write_text("")
    (tmp_path / "orchestrator" / "sweeps" / "__init__.py").write_text("")
    assert sweep_names(tmp_path) == ("mine",)
    assert "colt5" in sweep_names()
    assert parse_sweep_command("python -m orchestrator.sweep colt5 --smoke", ("colt5",)).smoke


def test_image_check_catches_a_second_ray_image():
    objs = gpu()
    job(objs)["submitterPodTemplate"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.60.0"
    assert check_images_agree(objs)
    objs = gpu()
    mlflow_container(objs)["image"] = head_container(objs)["image"]
    assert check_images_agree(objs)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (
            lambda o: set_env(
                worker(o)["containers"][0], "MLFLOW_TRACKING_URI", "http://mlflow.other.svc:5000"
            ),
            "is not the MLflow Service",
        ),
        (
            lambda o: set_env(head_container(o), "MLFLOW_TRACKING_URI", "http://mlflow.attnlab.svc:5001"),
            "is not the MLflow Service",
        ),
        (lambda o: set_env(mlflow_container(o), "MLFLOW_SERVER_ALLOWED_HOSTS", "localhost:*"), "reject Host"),
        (lambda o: one(o, "Ingress")["spec"]["rules"][0].update(host="ui.example.org"), "rejects Host"),
        (
            lambda o: job(o).update(entrypoint=job(o)["entrypoint"] + " --tracking-uri sqlite:///x.db"),
            "--tracking-uri",
        ),
        (lambda o: mlflow_container(o)["args"].remove("--serve-artifacts"), "--serve-artifacts"),
        (lambda o: set_env(mlflow_container(o), "MLFLOW_ARTIFACTS_DESTINATION", "/mlartifacts"), "s3://"),
        (lambda o: mlflow_container(o).pop("readinessProbe"), "readinessProbe"),
    ],
)
def test_tracking_check_catches(breakage, expected):
    objs = gpu()
    breakage(objs)
    assert any(expected in p for p in check_tracking(objs)), check_tracking(objs)


def test_storage_check_catches_a_local_path_and_a_single_node_volume():
    objs = gpu()
    set_env(worker(objs)["containers"][0], "ATTNLAB_STORAGE", "/tmp/ray")
    assert any("not on a PersistentVolumeClaim" in p for p in check_storage(objs, single_node=False))
    objs = gpu()
    one(objs, "PersistentVolumeClaim", "ray-storage")["spec"]["accessModes"] = ["ReadWriteOnce"]
    assert any("ReadWriteMany" in p for p in check_storage(objs, single_node=False))


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda o: worker(o).pop("tolerations"), "toleration"),
        (lambda o: worker(o).pop("nodeSelector"), "node selector"),
        (
            lambda o: worker(o)["containers"][0]["resources"]["requests"].update({"nvidia.com/gpu": "2"}),
            "requests != limits",
        ),
        (
            lambda o: job(o).update(
                entrypoint="python -m orchestrator.sweep colt5 --address auto --gpus-per-trial 2"
            ),
            "fit a worker",
        ),
        (
            lambda o: job(o).update(entrypoint="python -m orchestrator.sweep colt5 --address auto"),
            "fit a worker",
        ),
    ],
)
def test_gpu_check_catches(breakage, expected):
    objs = gpu()
    breakage(objs)
    assert any(expected in p for p in check_gpus(objs, expect_gpus=True)), check_gpus(objs, expect_gpus=True)


def test_gpu_check_catches_a_cpu_overlay_that_asks_for_gpus():
    objs = render_overlay("dev")
    job(objs)["entrypoint"] = "python -m orchestrator.sweep colt5 --smoke --address auto"
    assert any("--gpus-per-trial 0" in p for p in check_gpus(objs, expect_gpus=False))
    assert check_gpus(gpu(), expect_gpus=False)


def _policy(objs, name):
    return one(objs, "NetworkPolicy", name)["spec"]


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (
            lambda o: _policy(o, "postgres")["ingress"][0]["from"].append({"podSelector": {}}),
            "postgres: reachable",
        ),
        (lambda o: _policy(o, "mlflow")["ingress"][0]["from"].append({"namespaceSelector": {}}), "outside"),
        (lambda o: _policy(o, "mlflow")["ingress"][0].pop("from"), "mlflow: ingress is not restricted"),
        (lambda o: o.remove(one(o, "NetworkPolicy", "default-deny-ingress")), "default-deny"),
        (lambda o: o.remove(one(o, "NetworkPolicy", "postgres")), "postgres: reachable"),
        # A relabelled worker group falls out of the Ray selector: the check sees MLflow lose a client.
        (
            lambda o: cluster(o)["workerGroupSpecs"][0]["template"]["metadata"]["labels"].update(
                {"app.kubernetes.io/component": "gpu-worker"}
            ),
            "mlflow: reachable",
        ),
    ],
)
def test_network_policy_check_catches(breakage, expected):
    objs = gpu()
    breakage(objs)
    assert any(expected in p for p in check_network_policies(objs)), check_network_policies(objs)
