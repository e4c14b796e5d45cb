"""The chart renders valid Kubernetes objects that place Baton correctly.

For the default values and each example values file: strict lint passes,
core manifests fit Kubernetes' schemas, the RayCluster fits KubeRay's CRD,
the ConfigMap is a config Baton's own loader accepts, every pool's worker
group lands on its GPU type's nodes and offers the Ray resources Baton's
placement asks for, and secrets reach pods only through secretKeyRef.
"""

from __future__ import annotations

import base64
import copy

import pytest
import yaml
from chart_render import (
    CASES,
    CHART,
    CRD_KINDS,
    KUBE_VERSION,
    RELEASE,
    case_values,
    merged_values,
    notes,
    only,
    ray_resources,
    raycluster_errors,
    render,
    servicemonitor_errors,
    validate_core,
)

helm_python = pytest.importorskip("helm_python")

FULLNAME = RELEASE  # release "baton" of chart "baton": the name is not doubled


@pytest.fixture(scope="module", params=CASES)
def case(request):
    values = case_values(request.param)
    return request.param, merged_values(values), render(values)


@pytest.fixture(scope="module")
def baton_config(case, tmp_path_factory):
    from cluster.config import load_config

    _, _, docs = case
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(only(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    return load_config(path)


def _workers_per_pod(pool: dict) -> int:
    return pool.get("workersPerPod", max(1, pool["gpusPerPod"]))


def _head(docs):
    return only(docs, "RayCluster")["spec"]["headGroupSpec"]


def _groups(docs) -> dict[str, dict]:
    return {g["groupName"]: g for g in only(docs, "RayCluster")["spec"]["workerGroupSpecs"]}


def _containers(docs):
    """(pod owner, container) of every container and init container rendered."""
    for doc in docs:
        templates = []
        if doc["kind"] == "RayCluster":
            templates = [_head(docs)["template"]] + [g["template"] for g in _groups(docs).values()]
        elif doc["kind"] in ("StatefulSet", "Deployment"):
            templates = [doc["spec"]["template"]]
        for t in templates:
            for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]:
                yield doc["metadata"]["name"], c


# ----- validity ---------------------------------------------------------------
def test_strict_lint_passes(case):
    name, _, _ = case
    report = helm_python.lint(CHART, case_values(name), strict=True,
                              kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == []


def test_core_manifests_fit_kubernetes_schemas(case):
    _, _, docs = case
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert {"ConfigMap", "Service"} <= {d["kind"] for d in core}
    for doc in core:
        validate_core(doc)


def test_raycluster_fits_kuberay_crd(case):
    _, _, docs = case
    assert raycluster_errors(only(docs, "RayCluster")) == []


def test_servicemonitor_fits_its_schema(case):
    _, values, docs = case
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == int(values["serviceMonitor"]["enabled"])
    for m in monitors:
        assert servicemonitor_errors(m) == []
        m = copy.deepcopy(m)
        m["spec"]["endpoints"][0]["interval"] = "10 seconds"
        del m["spec"]["selector"]
        errors = servicemonitor_errors(m)
        assert any("'selector' is a required property" in e for e in errors), errors
        assert any(e.startswith("spec/endpoints/0/interval:") for e in errors), errors


def test_crd_check_catches_a_misspelt_field(case):
    _, _, docs = case
    cluster = only(docs, "RayCluster")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in raycluster_errors(cluster))


# ----- Baton's config ---------------------------------------------------------
def test_configmap_is_the_baton_config_of_the_values(case, baton_config):
    _, values, _ = case
    cfg = baton_config
    assert cfg.name == FULLNAME and cfg.redis.namespace == FULLNAME
    assert cfg.model.source == values["model"]["source"]
    assert cfg.model.dtype == values["model"]["dtype"]
    assert cfg.transport == values["baton"]["transport"]
    assert cfg.scheduler.policy == values["baton"]["scheduler"]["policy"]
    assert cfg.admission.max_waiting == values["baton"]["admission"]["max_waiting"]
    assert cfg.ranker.log_prompts == values["baton"]["ranker"]["log_prompts"]
    assert (cfg.server.grpc_port, cfg.server.http_port) == (50051, 8000)
    expected = [(p["name"], p["role"], p["gpuType"], p["replicas"] * _workers_per_pod(p),
                 p["gpusPerPod"] / _workers_per_pod(p)) for p in values["pools"]]
    assert [(p.name, p.role, p.gpu_type, p.replicas, p.gpus_per_replica)
            for p in cfg.pools] == expected
    for pool, spec in zip(values["pools"], cfg.pools):
        _check_autoscale(pool, spec)
        engine = pool.get("engine", {})
        if "max_num_seqs" in engine:
            assert spec.max_num_seqs == engine["max_num_seqs"]
        if "tensor_parallel" in engine:
            assert spec.tensor_parallel == engine["tensor_parallel"]
        assert spec.cpu_kernels == engine.get("cpu_kernels")  # unset: None, on where it applies


def _check_autoscale(pool: dict, spec) -> None:
    """The pool's autoscale values, in Baton's units: replicas are workers,
    bounded by the worker group's pods."""
    scale = pool.get("autoscale", {})
    if not scale.get("enabled"):
        assert spec.autoscale is None
        return
    workers = _workers_per_pod(pool)
    a = spec.autoscale
    assert (a.min_replicas, a.max_replicas) == (pool["minReplicas"] * workers,
                                                pool["maxReplicas"] * workers)
    for key, field in (("targetWaitingPerReplica", "target_waiting_per_replica"),
                       ("targetKVUsage", "target_kv_usage"),
                       ("upscaleDelaySeconds", "upscale_delay_s"),
                       ("downscaleDelaySeconds", "downscale_delay_s"), ("maxStep", "max_step")):
        if key in scale:
            assert getattr(a, field) == scale[key], key


def test_autoscaled_example_scales_decode_on_queue_depth(tmp_path):
    """The external-Redis example: Baton sizes decode between the group's
    bounds, and the Ray autoscaler (which adds the pods) is on."""
    from cluster.config import load_config

    values = case_values("external-redis-autoscaling")
    docs = render(values)
    path = tmp_path / "config.yaml"
    path.write_text(only(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    (decode,) = load_config(path).pools_with_role("decode")
    assert (decode.autoscale.min_replicas, decode.autoscale.max_replicas) == (1, 8)
    assert decode.autoscale.target_waiting_per_replica == 8
    assert only(docs, "RayCluster")["spec"]["enableInTreeAutoscaling"] is True
    assert _groups(docs)["decode"]["maxReplicas"] == 8


def test_cpu_kernels_reach_the_config_of_a_cpu_pool(tmp_path):
    """``pools[].engine.cpu_kernels`` is copied into that pool of the Baton config."""
    from cluster.config import load_config

    pools = copy.deepcopy(merged_values({})["pools"])
    for pool in pools:
        pool["gpusPerPod"] = 0
    pools[0]["engine"]["cpu_kernels"] = False
    pools[1]["engine"]["cpu_kernels"] = True
    docs = render({"pools": pools})
    path = tmp_path / "config.yaml"
    path.write_text(only(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    assert [(p.name, p.cpu_kernels) for p in load_config(path).pools] == [
        ("prefill", False), ("decode", True)]
    default = tmp_path / "default.yaml"  # unset: None, on wherever the kernels apply
    default.write_text(only(render({}), "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    assert [p.cpu_kernels for p in load_config(default).pools] == [None, None]


def test_config_names_secret_variables_and_holds_no_secret(case, baton_config):
    _, values, docs = case
    cfg = baton_config
    assert cfg.server.auth_token_env == ("BATON_API_TOKEN" if values["auth"]["enabled"] else None)
    assert cfg.redis.password_env == "BATON_REDIS_PASSWORD"
    text = only(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"]
    for secret in _secret_values(docs):
        assert secret not in text


def test_config_points_at_the_redis_in_use(case, baton_config):
    _, values, _ = case
    if values["redis"]["enabled"]:
        assert baton_config.redis.url == f"redis://{FULLNAME}-redis:6379/0"
    else:
        ext = values["externalRedis"]
        scheme = "rediss" if ext["tls"] else "redis"
        assert baton_config.redis.url == f"{scheme}://{ext['host']}:{ext['port']}/{ext['db']}"


def test_model_weights_are_mounted_where_the_config_looks(case):
    _, values, docs = case
    weights = values["model"]["weights"]
    for owner, c in _containers(docs):
        if owner != FULLNAME or c["name"] == "fetch-model":
            continue
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        if weights["volume"] == "none":
            assert "model-weights" not in mounts
        else:
            assert mounts["model-weights"] == weights["mountPath"]
            assert values["model"]["source"].startswith(weights["mountPath"] + "/")


# ----- placement by GPU type --------------------------------------------------
def test_each_pool_is_pinned_to_its_gpu_types_nodes(case):
    _, values, docs = case
    groups = _groups(docs)
    assert list(groups) == [p["name"] for p in values["pools"]]
    for pool in values["pools"]:
        spec = groups[pool["name"]]["template"]["spec"]
        products = values["gpuProducts"][pool["gpuType"]]
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]
        assert terms, pool["name"]
        for term in terms:  # every alternative term still demands the GPU product
            assert {"key": "nvidia.com/gpu.product", "operator": "In",
                    "values": products} in term["matchExpressions"]
        for key, value in pool.get("nodeSelector", {}).items():
            assert spec["nodeSelector"][key] == value
        labels = groups[pool["name"]]["template"]["metadata"]["labels"]
        assert labels["baton/pool"] == pool["name"] and labels["baton/gpu-type"] == pool["gpuType"]


def test_gpu_limits_and_ray_gpus_match_each_pool(case):
    _, values, docs = case
    groups = _groups(docs)
    for pool in values["pools"]:
        group = groups[pool["name"]]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == pool["gpusPerPod"]
        assert group["rayStartParams"]["num-gpus"] == str(pool["gpusPerPod"])
        assert ray_resources(group["rayStartParams"]) == {f"gpu_type:{pool['gpuType']}":
                                                          pool["gpusPerPod"]}
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
            pool["replicas"], pool["minReplicas"], pool["maxReplicas"])


def test_ray_resources_fit_batons_placement(case, baton_config):
    """Every worker actor Baton creates (workers.gpu.placement_options) fits on
    the pods of its pool's group, and no other group offers its GPU type."""
    from workers.gpu import placement_options

    _, _, docs = case
    groups = _groups(docs)
    head = _head(docs)["rayStartParams"]
    assert head["num-gpus"] == "0" and "resources" not in head
    for pool in baton_config.pools:
        options = placement_options(pool.gpu_type, pool.gpus_per_replica)
        group = groups[pool.name]
        offer = {**ray_resources(group["rayStartParams"]),
                 "GPU": int(group["rayStartParams"]["num-gpus"])}
        demand = {**options["resources"], "GPU": options.get("num_gpus", 0)}
        per_pod = pool.replicas // group["replicas"]
        assert pool.replicas == per_pod * group["replicas"]
        for resource, amount in demand.items():
            assert per_pod * amount <= offer[resource], (pool.name, resource)
        for other, g in groups.items():
            if other != pool.name and pool.gpu_type != next(
                    p.gpu_type for p in baton_config.pools if p.name == other):
                assert options["resources"].keys().isdisjoint(ray_resources(g["rayStartParams"]))


# ----- secrets ------------------------------------------------------------------
def _secret_values(docs) -> list[str]:
    return [base64.b64decode(v).decode() for d in docs if d["kind"] == "Secret"
            for v in d["data"].values()]


def test_secrets_are_referenced_never_inlined(case):
    _, values, docs = case
    secrets = _secret_values(docs)
    rendered_secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert len(secrets) == (values["auth"]["enabled"] and not values["auth"]["existingSecret"]) + (
        values["redis"]["enabled"] and not values["redis"]["auth"]["existingSecret"])
    for doc in docs:
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            for secret in secrets:
                assert secret not in text and base64.b64encode(secret.encode()).decode() not in text
    wanted = {"BATON_REDIS_PASSWORD", "BATON_API_TOKEN", "REDIS_PASSWORD", "REDISCLI_AUTH"}
    seen = set()
    for _, container in _containers(docs):
        for env in container.get("env", []):
            if env["name"] in wanted:
                seen.add(env["name"])
                assert "value" not in env
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["name"] in rendered_secrets | {
                    values["auth"]["existingSecret"], values["externalRedis"]["existingSecret"],
                    values["redis"]["auth"]["existingSecret"]} - {""}
    assert "BATON_REDIS_PASSWORD" in seen
    assert ("BATON_API_TOKEN" in seen) == values["auth"]["enabled"]


def test_every_ray_pod_gets_the_redis_password(case):
    """Workers open their own heartbeat connection, so they need it as the head does."""
    _, _, docs = case
    templates = [_head(docs)["template"]] + [g["template"] for g in _groups(docs).values()]
    for t in templates:
        (container,) = t["spec"]["containers"]
        assert "BATON_REDIS_PASSWORD" in {e["name"] for e in container["env"]}


# ----- the API, Redis and the options -----------------------------------------
def test_service_exposes_grpc_http_and_metrics_of_the_head(case):
    _, _, docs = case
    svc = only(docs, "Service", FULLNAME)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "grpc": 50051, "http": 8000, "ray-metrics": 8080}
    head_labels = _head(docs)["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= head_labels.items()
    (head,) = _head(docs)["template"]["spec"]["containers"]
    assert {p["name"] for p in head["ports"]} >= {"grpc", "http", "ray-metrics"}
    assert "baton serve --config /etc/baton/config.yaml --ray-address auto" in head["args"][0]
    assert head["readinessProbe"]["grpc"]["port"] == 50051


def test_redis_in_chart_or_external(case):
    _, values, docs = case
    statefulsets = [d for d in docs if d["kind"] == "StatefulSet"]
    assert len(statefulsets) == (1 if values["redis"]["enabled"] else 0)
    cluster = only(docs, "RayCluster")["spec"]
    if values["gcsFaultTolerance"]["enabled"]:
        ft = cluster["gcsFaultToleranceOptions"]
        ext = values["externalRedis"]
        host = f"{FULLNAME}-redis:6379" if values["redis"]["enabled"] else (
            f"{'rediss://' if ext['tls'] else ''}{ext['host']}:{ext['port']}")
        assert ft["redisAddress"] == host
        assert "secretKeyRef" in ft["redisPassword"]["valueFrom"]
    else:
        assert "gcsFaultToleranceOptions" not in cluster


def test_optional_monitoring_autoscaling_and_budgets(case):
    _, values, docs = case
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == int(values["serviceMonitor"]["enabled"])
    for m in monitors:
        assert {"port": "http", "path": "/metrics"}.items() <= m["spec"]["endpoints"][0].items()
        assert m["spec"]["selector"]["matchLabels"].items() <= only(
            docs, "Service", FULLNAME)["metadata"]["labels"].items()
        assert m["metadata"]["labels"].items() >= values["serviceMonitor"]["labels"].items()
    cluster = only(docs, "RayCluster")["spec"]
    assert cluster.get("enableInTreeAutoscaling", False) == values["autoscaling"]["enabled"]
    assert cluster["upgradeStrategy"] == {"type": values["upgradeStrategy"]}
    budgets = {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    if values["podDisruptionBudget"]["enabled"]:
        assert budgets >= {f"{FULLNAME}-head"} | {f"{FULLNAME}-{p['name']}" for p in values["pools"]}
    else:
        assert budgets == set()


def test_notes_tell_how_to_call_the_api():
    text = notes({})
    assert f"port-forward svc/{FULLNAME} 50051:50051 8000:8000" in text
    assert "baton generate" in text and "BATON_API_TOKEN" in text
