"""k8s/ renders, validates offline, and has the properties the deployment depends on.

Every overlay is rendered with `kubectl kustomize` (a missing kubectl fails, it does not skip) and
every object validated: core kinds against Kubernetes 1.32's strict schemas, ray.io kinds against
the KubeRay v1.7.0 CRDs. The property checks live in k8s_checks / k8s_ray_checks;
test_k8s_checks_catch.py shows each of them failing on a broken copy.
"""

from __future__ import annotations

import pytest

from .k8s_checks import (
    check_containers,
    check_env_references,
    check_kustomizations_have_no_secret_literals,
    check_namespace,
    check_no_literal_secrets,
    check_rbac,
    check_secrets_documented,
)
from .k8s_ray_checks import (
    check_gpus,
    check_images_agree,
    check_network_policies,
    check_ray,
    check_rayjob,
    check_storage,
    check_tracking,
    pinned_ray_version,
    sweep_names,
)
from .k8s_render import (
    K8S_DIR,
    OVERLAYS,
    REPO_ROOT,
    by_kind,
    crd_validators,
    is_ray_kind,
    render,
    render_overlay,
    schema_errors,
)

# What each overlay is for; a new overlay must say so here.
OVERLAY_EXPECTATIONS = {
    "dev": {"gpus": False, "single_node": True},
    "gpu": {"gpus": True, "single_node": False},
}
KINDS_EVERY_OVERLAY_HAS = {
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "Deployment",
    "StatefulSet",
    "Service",
    "PersistentVolumeClaim",
    "NetworkPolicy",
    "RayCluster",
    "RayJob",
}


def test_every_overlay_is_described():
    assert set(OVERLAYS) == set(OVERLAY_EXPECTATIONS)


def test_crd_schemas_cover_the_ray_kinds():
    served = set(crd_validators())
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService")} <= served


@pytest.mark.parametrize("target", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_renders_and_every_core_object_validates(target):
    objs = list(render(str(K8S_DIR / target)))
    assert KINDS_EVERY_OVERLAY_HAS <= {o["kind"] for o in objs}
    errors = [error for obj in objs if not is_ray_kind(obj) for error in schema_errors(obj)]
    assert errors == []


@pytest.mark.parametrize("target", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_every_ray_object_validates_against_the_kuberay_crds(target):
    ray_objs = [obj for obj in render(str(K8S_DIR / target)) if is_ray_kind(obj)]
    assert ray_objs
    errors = [error for obj in ray_objs for error in schema_errors(obj)]
    assert errors == []


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render_overlay(request.param)


def test_containers_are_restricted_and_sized(overlay):
    assert check_containers(overlay[1]) == []


def test_env_references_resolve(overlay):
    assert check_env_references(overlay[1]) == []


def test_no_literal_secrets(overlay):
    assert by_kind(overlay[1], "Secret") == []
    assert check_no_literal_secrets(overlay[1]) == []


def test_no_secret_values_anywhere_in_k8s_dir():
    assert check_kustomizations_have_no_secret_literals(K8S_DIR) == []


def test_every_secret_read_is_created_in_the_docs(overlay):
    markdown = (REPO_ROOT / "docs" / "deploy.md").read_text()
    assert check_secrets_documented(overlay[1], markdown) == []


def test_rbac_is_least_privilege(overlay):
    assert check_rbac(overlay[1]) == []


def test_namespace_enforces_restricted_pod_security(overlay):
    assert check_namespace(overlay[1]) == []


def test_ray_clusters_pin_the_version_and_use_token_auth(overlay):
    assert check_ray(overlay[1], pinned_ray_version()) == []


def test_rayjob_runs_a_real_sweep_and_cleans_up(overlay):
    assert check_rayjob(overlay[1], sweep_names()) == []


def test_ray_images_agree(overlay):
    assert check_images_agree(overlay[1]) == []


def test_tracking_uris_point_at_the_mlflow_service(overlay):
    assert check_tracking(overlay[1]) == []


def test_ray_storage_is_shared(overlay):
    name, objs = overlay
    assert check_storage(objs, OVERLAY_EXPECTATIONS[name]["single_node"]) == []


def test_gpus(overlay):
    name, objs = overlay
    assert check_gpus(objs, OVERLAY_EXPECTATIONS[name]["gpus"]) == []


def test_network_policies(overlay):
    assert check_network_policies(overlay[1]) == []


def test_the_sweep_label_selects_only_the_rayjobs(overlay):
    # docs/deploy.md applies the infrastructure with -l 'app.kubernetes.io/component!=sweep', then the
    # sweep with -l app.kubernetes.io/component=sweep.
    sweep = [
        o for o in overlay[1] if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "sweep"
    ]
    assert sweep and {o["kind"] for o in sweep} == {"RayJob"}
    assert by_kind(overlay[1], "RayJob") == sweep
