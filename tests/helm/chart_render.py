"""Render the Baton Helm chart offline and validate what comes out.

Lifecycle: a test names a values case (the chart defaults or a file in
helm/examples), ``render`` runs Helm's own Go template engine through
helm-python-sdk (no helm binary, no cluster) and returns the manifests as
dicts; ``validate_core`` checks a core manifest with kubernetes-validate and
``raycluster_errors`` checks the RayCluster against KubeRay's CRD schema,
vendored in data/ with its license.
"""

from __future__ import annotations

import gzip
import json
import shlex
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "baton"
EXAMPLES = ROOT / "helm" / "examples"
CRD = Path(__file__).with_name("data") / "ray.io_rayclusters.yaml.gz"
SERVICE_MONITOR_SCHEMA = Path(__file__).with_name("data") / "servicemonitor.schema.json"
KUBE_VERSION = "1.37.0"  # the newest release kubernetes-validate>=1.37 carries schemas for
RELEASE, NAMESPACE = "baton", "serving"
CASES = ("default", "single-gpu-type", "heterogeneous-h100-l40s", "external-redis-autoscaling")
CRD_KINDS = ("RayCluster", "ServiceMonitor")  # kinds kubernetes-validate has no schema for


def case_values(case: str) -> dict:
    """User-supplied values of a case ({} for the chart defaults)."""
    if case == "default":
        return {}
    return yaml.safe_load((EXAMPLES / f"{case}.yaml").read_text())


def chart():
    import helm_python

    return helm_python.Chart.load(CHART)


def merged_values(values: dict) -> dict:
    """The values a release would use: defaults coalesced with ``values``."""
    with chart() as c:
        return c.merge_values(values)


def render(values: dict) -> list[dict]:
    """Every manifest the chart renders for ``values`` (NOTES.txt excluded)."""
    with chart() as c:
        files = c.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(values: dict) -> str:
    with chart() as c:
        files = c.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return files["baton/templates/NOTES.txt"]


def only(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def validate_core(doc: dict) -> None:
    """Raise if a core Kubernetes manifest does not fit its schema (strict:
    unknown fields are errors, as with `kubectl apply --validate=strict`)."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def raycluster_errors(doc: dict) -> list[str]:
    """Schema errors of a RayCluster against KubeRay's CRD, as 'path: message'."""
    import jsonschema

    validator = jsonschema.Draft7Validator(_raycluster_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def servicemonitor_errors(doc: dict) -> list[str]:
    """Schema errors of a ServiceMonitor against the vendored subset of the
    Prometheus operator's API (data/servicemonitor.schema.json)."""
    import jsonschema

    schema = json.loads(SERVICE_MONITOR_SCHEMA.read_text())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


@cache
def _raycluster_schema() -> dict:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _to_json_schema(version["schema"]["openAPIV3Schema"])


def _to_json_schema(node):
    """OpenAPI v3 (structural CRD schema) -> JSON schema.

    The API server prunes unknown fields silently; here an unknown field is an
    error (additionalProperties: false), so a misspelt key in a template fails
    the test instead of vanishing on apply.
    """
    if isinstance(node, list):
        return [_to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def ray_resources(params: dict) -> dict:
    """rayStartParams.resources as `ray start` receives it: KubeRay pastes the
    string into a bash command line, so it is unquoted the way a shell does."""
    (word,) = shlex.split(params["resources"])
    return json.loads(word)
