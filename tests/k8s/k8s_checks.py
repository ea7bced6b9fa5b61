"""Property checks on rendered manifests: pod security, resources, images, secrets, RBAC, namespace.

Each check takes the rendered objects and returns a list of problems ([] = fine), so the tests can
both assert a clean overlay and show that a broken copy is caught.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .k8s_render import by_kind, containers, pod_templates

# Env var names that carry credentials: they must come from a Secret, never a literal value.
SECRET_ENV_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL)", re.I)
ENV_REFERENCE = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
FORBIDDEN_VERBS = {"*", "escalate", "bind", "impersonate"}


# --- containers and pods ------------------------------------------------------------------------


def image_problems(image: str) -> list[str]:
    if "@sha256:" in image:
        return []
    name_and_tag = image.rsplit("/", 1)[-1]
    if ":" not in name_and_tag:
        return [f"image {image!r} has no tag (pin a version)"]
    if name_and_tag.rsplit(":", 1)[1] == "latest":
        return [f"image {image!r} uses the moving tag 'latest'"]
    return []


def check_containers(objs: list[dict]) -> list[str]:
    """Every container: pinned image, requests and memory limit, a restricted security context."""
    problems = []
    for obj in objs:
        for where, _role, pod_spec, container in containers(obj):
            pod_security = pod_spec.get("securityContext", {})
            security = container.get("securityContext")
            problems += [f"{where}: {p}" for p in image_problems(container.get("image", ""))]
            resources = container.get("resources", {})
            for section, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
                for key in keys:
                    if key not in resources.get(section, {}):
                        problems.append(f"{where}: resources.{section}.{key} is not set")
            if not security:
                problems.append(f"{where}: no securityContext")
                continue
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: securityContext.capabilities.drop must contain ALL")
            if security.get("capabilities", {}).get("add"):
                problems.append(f"{where}: securityContext.capabilities.add is not allowed")
            if security.get("privileged"):
                problems.append(f"{where}: privileged container")
            if not security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot is not true (container or pod)")
            if security.get("runAsUser", pod_security.get("runAsUser")) == 0:
                problems.append(f"{where}: runs as uid 0")
            seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
            if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: seccompProfile must be RuntimeDefault (container or pod)")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            for port in container.get("ports", []):
                if "hostPort" in port:
                    problems.append(f"{where}: hostPort {port['hostPort']}")
    for obj in objs:
        for where, _role, template in pod_templates(obj):
            spec = template["spec"]
            for flag in ("hostNetwork", "hostPID", "hostIPC"):
                if spec.get(flag):
                    problems.append(f"{where}: {flag} is true")
            for volume in spec.get("volumes", []):
                if "hostPath" in volume:
                    problems.append(f"{where}: hostPath volume {volume['name']}")
    return problems


def check_env_references(objs: list[dict]) -> list[str]:
    """$(VAR) in env values must name a variable defined earlier; in command/args, one defined at all.

    Kubernetes leaves an unresolvable reference as literal text, so a typo is silent at runtime.
    """
    problems = []
    for obj in objs:
        for where, _role, _pod, container in containers(obj):
            defined: list[str] = []
            for var in container.get("env", []):
                for ref in ENV_REFERENCE.findall(var.get("value", "")):
                    if ref not in defined:
                        problems.append(f"{where}: env {var['name']} uses $({ref}) before it is defined")
                defined.append(var["name"])
            for word in container.get("command", []) + container.get("args", []):
                for ref in ENV_REFERENCE.findall(word):
                    if ref not in defined:
                        problems.append(f"{where}: command/args use undefined $({ref})")
    return problems


# --- secrets ------------------------------------------------------------------------------------


def check_no_literal_secrets(objs: list[dict]) -> list[str]:
    """No Secret with data, no credential-looking env var with a literal value, no password in a URI."""
    problems = []
    for obj in by_kind(objs, "Secret"):
        if obj.get("data") or obj.get("stringData"):
            problems.append(f"Secret/{obj['metadata']['name']}: holds literal values in the repository")
    for obj in objs:
        for where, _role, _pod, container in containers(obj):
            from_secret = {
                v["name"] for v in container.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})
            }
            for var in container.get("env", []):
                value = var.get("value")
                if value is None:
                    continue
                if SECRET_ENV_NAME.search(var["name"]) and value:
                    problems.append(f"{where}: env {var['name']} has a literal value; use a secretKeyRef")
                for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
                    refs = ENV_REFERENCE.fullmatch(password)
                    if not refs or refs.group(1) not in from_secret:
                        problems.append(f"{where}: env {var['name']} embeds a password not from a Secret")
    return problems


def check_kustomizations_have_no_secret_literals(k8s_dir: Path) -> list[str]:
    """No secretGenerator with literals or files, and no Secret manifest with data, anywhere in k8s/."""
    import yaml

    problems = []
    for path in sorted(k8s_dir.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            for generator in doc.get("secretGenerator", []):
                if generator.get("literals") or generator.get("files") or generator.get("envs"):
                    problems.append(f"{path}: secretGenerator {generator.get('name')} carries values")
            if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                problems.append(f"{path}: Secret {doc['metadata']['name']} carries values")
    return problems


def required_secrets(objs: list[dict]) -> dict[str, set[str]]:
    """Secret name -> keys the manifests read from it (the operator's and ingress's reads included)."""
    needed: dict[str, set[str]] = {}
    for obj in objs:
        for _where, _role, _pod, container in containers(obj):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    needed.setdefault(ref["name"], set()).add(ref["key"])
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    needed.setdefault(source["secretRef"]["name"], set())
        for _where, _role, template in pod_templates(obj):
            for volume in template["spec"].get("volumes", []):
                if "secret" in volume:
                    needed.setdefault(volume["secret"]["secretName"], set())
        if obj.get("kind") == "RayCluster":
            auth = obj["spec"].get("authOptions", {})
            if auth.get("mode") == "token" and auth.get("secretName"):
                needed.setdefault(auth["secretName"], set()).add("auth_token")
        if obj.get("kind") == "Ingress":
            for tls in obj["spec"].get("tls", []):
                needed.setdefault(tls["secretName"], set()).update({"tls.crt", "tls.key"})
            auth_secret = (
                obj["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/auth-secret")
            )
            if auth_secret:
                needed.setdefault(auth_secret, set()).add("auth")
    return needed


def documented_secrets(markdown: str) -> dict[str, set[str]]:
    """Secret name -> keys created by the `kubectl ... create secret` commands in a document's code blocks."""
    code = "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S))
    created: dict[str, set[str]] = {}
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        if not (line.lstrip().startswith("kubectl ") and re.search(r"\bcreate secret\b", line)):
            continue
        words = shlex.split(line, comments=True)
        kind, name = words[words.index("secret") + 1 : words.index("secret") + 3]
        keys = created.setdefault(name, set())
        if kind == "tls":
            keys.update({"tls.crt", "tls.key"})
        for word in words:
            for prefix in ("--from-literal=", "--from-file="):
                if word.startswith(prefix):
                    source = word[len(prefix) :]
                    keys.add(source.split("=", 1)[0] if "=" in source else Path(source).name)
    return created


def check_secrets_documented(objs: list[dict], markdown: str) -> list[str]:
    documented = documented_secrets(markdown)
    problems = []
    for name, keys in sorted(required_secrets(objs).items()):
        if name not in documented:
            problems.append(f"Secret {name} is used but docs/deploy.md never creates it")
        elif missing := keys - documented[name]:
            problems.append(f"Secret {name}: docs/deploy.md does not create key(s) {sorted(missing)}")
    return problems


# --- RBAC, service accounts, namespace ----------------------------------------------------------


def check_rbac(objs: list[dict]) -> list[str]:
    problems = []
    for kind in ("ClusterRole", "ClusterRoleBinding"):
        problems += [f"{kind}/{o['metadata']['name']}: cluster-wide RBAC" for o in by_kind(objs, kind)]
    for role in by_kind(objs, "Role"):
        for rule in role.get("rules", []):
            where = f"Role/{role['metadata']['name']}"
            if "*" in rule.get("apiGroups", []) + rule.get("resources", []):
                problems.append(f"{where}: wildcard in {rule}")
            if FORBIDDEN_VERBS & set(rule.get("verbs", [])):
                problems.append(f"{where}: forbidden verb in {rule['verbs']}")
            if "secrets" in rule.get("resources", []):
                problems.append(f"{where}: grants access to Secrets")
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind(objs, "ServiceAccount")}
    for name, sa in accounts.items():
        if sa.get("automountServiceAccountToken") is not False:
            problems.append(f"ServiceAccount/{name}: automountServiceAccountToken must be false")
    for obj in objs:
        for where, role, template in pod_templates(obj):
            spec = template["spec"]
            account = spec.get("serviceAccountName")
            if account not in accounts:
                problems.append(f"{where}: serviceAccountName {account!r} is not a ServiceAccount here")
            # Only the Ray head needs the API (its autoscaler sidecar scales the workers).
            wants_token = role == "ray-head"
            if spec.get("automountServiceAccountToken") is not wants_token:
                problems.append(f"{where}: automountServiceAccountToken should be {wants_token}")
    return problems


def check_namespace(objs: list[dict]) -> list[str]:
    namespaces = by_kind(objs, "Namespace")
    if len(namespaces) != 1:
        return [f"expected one Namespace, found {len(namespaces)}"]
    namespace = namespaces[0]
    name, labels = namespace["metadata"]["name"], namespace["metadata"].get("labels", {})
    problems = []
    if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
        problems.append(f"Namespace/{name}: Pod Security Admission must enforce 'restricted'")
    for obj in objs:
        if obj["kind"] not in CLUSTER_SCOPED_KINDS and obj["metadata"].get("namespace") != name:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: not in namespace {name}")
    return problems
