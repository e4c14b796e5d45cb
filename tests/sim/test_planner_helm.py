"""The planner's Helm values install the cluster it planned.

Each case is a winner config (a real small search, and a hand-sized
heterogeneous disaggregated cluster); its values must fit the chart's schema,
render to valid manifests offline (tests/helm/chart_render.py), and the
rendered ConfigMap, read by Baton's own loader, must carry the same pools,
model, transport, scheduler, router, admission and SLO.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_planner import options

from cluster.config import ModelSpec, load_config
from sim.planner import GPU_PRODUCTS, Candidate, Instance, helm_values, plan, winner, winner_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helm"))
from chart_render import (  # noqa: E402  (tests/helm is not a package)
    CHART,
    CRD_KINDS,
    KUBE_VERSION,
    RELEASE,
    chart,
    only,
    raycluster_errors,
    render,
    validate_core,
)

helm_python = pytest.importorskip("helm_python")

HETEROGENEOUS = [(Instance("prefill", "H100-SXM", 2), 3), (Instance("decode", "A100-80GB", 4), 2)]


def _searched():
    opts = options()
    return winner_config(opts, winner(plan(opts, verify_top=3)[0]))


def _sized():
    return winner_config(options(), Candidate("disaggregated", HETEROGENEOUS, 0.0, 0.0))


@pytest.fixture(scope="module", params=["searched", "heterogeneous"])
def planned(request, tmp_path_factory):
    """(winner config, its Helm values, the manifests, the config the ConfigMap holds)."""
    cfg = _searched() if request.param == "searched" else _sized()
    values = helm_values(cfg)
    docs = render(values)
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(only(docs, "ConfigMap", f"{RELEASE}-config")["data"]["config.yaml"])
    return cfg, values, docs, load_config(path)


def test_values_fit_the_chart_schema_and_pass_strict_lint(planned):
    _, values, _, _ = planned
    with chart() as c:
        c.validate_schema(values)  # raises on any violation
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


def test_rendered_manifests_are_valid(planned):
    _, _, docs, _ = planned
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            validate_core(doc)
    assert raycluster_errors(only(docs, "RayCluster")) == []


def test_configmap_is_the_winner_config(planned):
    cfg, _, _, served = planned
    assert served.pools == cfg.pools  # names, roles, GPU types, replicas, TP, engine settings
    assert served.model == replace(cfg.model, source=f"/models/{cfg.model.source}")
    assert (served.transport, served.scheduler, served.router, served.admission, served.slo) == \
        (cfg.transport, cfg.scheduler, cfg.router, cfg.admission, cfg.slo)


def test_worker_groups_hold_each_replica_on_its_gpus(planned):
    cfg, _, docs, _ = planned
    groups = only(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    assert [(g["groupName"], g["replicas"], g["minReplicas"], g["maxReplicas"],
             g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for g in groups] == [(p.name, p.replicas, p.replicas, p.replicas, p.tensor_parallel)
                                 for p in cfg.pools]
    for group, pool in zip(groups, cfg.pools):
        terms = group["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert [t["matchExpressions"][-1]["values"] for t in terms] == [GPU_PRODUCTS[pool.gpu_type]]


def test_model_source_maps_to_the_chart():
    cfg = _sized()
    preset = helm_values(replace(cfg, model=ModelSpec("tiny", "bfloat16")))["model"]
    assert (preset["source"], preset["weights"]["volume"]) == ("tiny", "none")
    local = helm_values(replace(cfg, model=ModelSpec("/data/hf/Llama-3.1-8B", "bfloat16")))["model"]
    assert (local["source"], local["weights"]) == (
        "/data/hf/Llama-3.1-8B",
        {"volume": "pvc", "mountPath": "/data/hf", "pvc": {"claimName": "model-weights"}})


def test_what_the_chart_cannot_express_is_refused():
    cfg = _sized()
    half = replace(cfg, pools=(replace(cfg.pools[0], gpus_per_replica=0.5), cfg.pools[1]))
    with pytest.raises(ValueError, match="pool prefill: gpus_per_replica 0.5 is not whole"):
        helm_values(half)
    odd = replace(cfg, pools=(replace(cfg.pools[0], gpu_type="MI300X"), cfg.pools[1]))
    with pytest.raises(ValueError, match="GPU type 'MI300X' has no known"):
        helm_values(odd)
