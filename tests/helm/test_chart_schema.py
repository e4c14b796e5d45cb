"""Bad values are refused before anything is rendered, naming the key.

values.schema.json rejects wrong types, unknown enums, out-of-range numbers,
unknown keys and missing required keys; checks across keys that a JSON
schema cannot express fail the render from the chart's templates.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from chart_render import case_values, chart, ray_resources

helm_python = pytest.importorskip("helm_python")


def _pools(**changes) -> list[dict]:
    """The default pools with ``changes`` ({index: {key: value}}) applied."""
    with chart() as c:
        pools = copy.deepcopy(c.values["pools"])
    for index, change in changes.items():
        pools[int(index.strip("p"))].update(change)
    return pools


def _refusal(values: dict) -> str:
    with chart() as c:
        with pytest.raises(helm_python.HelmError) as info:
            c.render(values, name="baton", namespace="serving")
    return str(info.value)


@pytest.mark.parametrize("case", ["default", "single-gpu-type", "heterogeneous-h100-l40s",
                                  "external-redis-autoscaling"])
def test_shipped_values_fit_the_schema(case):
    with chart() as c:
        c.validate_schema(case_values(case))  # raises on any violation


@pytest.mark.parametrize("values,key,why", [
    ({"pools": _pools(p1={"replicas": -1})}, "/pools/1/replicas", "minimum: got -1, want 0"),
    ({"pools": _pools(p0={"gpusPerPod": -2})}, "/pools/0/gpusPerPod", "minimum"),
    ({"pools": _pools(p0={"replicas": "two"})}, "/pools/0/replicas", "want integer"),
    ({"baton": {"transport": "tcp"}}, "/baton/transport", "'grpc', 'nccl'"),
    ({"baton": {"router": {"policy": "random"}}}, "/baton/router/policy", "must be one of"),
    ({"pools": _pools(p0={"role": "both"})}, "/pools/0/role", "'prefill', 'decode', 'mixed'"),
    ({"model": None}, "at ''", "missing property 'model'"),
    ({"model": {"source": None}}, "/model", "missing property 'source'"),
    ({"model": {"source": "gpt2"}}, "/model/source", "does not match pattern"),
    ({"model": {"dtype": "int4"}}, "/model/dtype", "must be one of"),
    ({"model": {"source": "/models/m", "weights": {"volume": "pvc"}}},
     "/model/weights/pvc/claimName", "minLength"),
    ({"model": {"source": "/models/m", "weights": {"volume": "hostPath"}}},
     "/model/weights/hostPath/path", "does not match pattern"),
    ({"model": {"weights": {"volume": "s3"}}}, "/model/weights/volume", "must be one of"),
    ({"redis": {"enabled": False}}, "/externalRedis/host", "minLength"),
    ({"pools": []}, "/pools", "minItems"),
    ({"pools": _pools(p0={"gpuTyp": "H100"})}, "/pools/0", "additional properties 'gpuTyp'"),
    ({"pools": _pools(p0={"name": "Prefill_1"})}, "/pools/0/name", "does not match pattern"),
    ({"pools": _pools(p1={"engine": {"block_size": 24}})}, "/pools/1/engine/block_size",
     "must be one of"),
    ({"pools": _pools(p1={"engine": {"kv_cache_bytes": "lots"}})}, "/pools/1/engine/kv_cache_bytes",
     "anyOf"),
    ({"pools": _pools(p1={"engine": {"cpu_kernels": "yes"}})}, "/pools/1/engine/cpu_kernels",
     "want boolean"),
    ({"baton": {"slo": {"attainment": 1.5}}}, "/baton/slo/attainment", "maximum"),
    ({"service": {"grpcPort": 70000}}, "/service/grpcPort", "maximum"),
    ({"autoscaling": {"upscalingMode": "Fast"}}, "/autoscaling/upscalingMode", "must be one of"),
    ({"pools": _pools(p1={"autoscale": {"enabled": True, "targetWaitingPerReplica": -2}})},
     "/pools/1/autoscale/targetWaitingPerReplica", "exclusiveMinimum"),
    ({"pools": _pools(p1={"autoscale": {"enabled": True, "downscaleDelaySeconds": -1}})},
     "/pools/1/autoscale/downscaleDelaySeconds", "minimum"),
    ({"pools": _pools(p1={"autoscale": {"enabled": True, "targetKVUsage": 1.5}})},
     "/pools/1/autoscale/targetKVUsage", "maximum"),
    ({"pools": _pools(p1={"autoscale": {"enabled": True, "targetWaiting": 3}})},
     "/pools/1/autoscale", "additional properties 'targetWaiting'"),
    ({"colour": "blue"}, "at ''", "additional properties 'colour'"),
])
def test_schema_refuses_bad_values_naming_the_key(values, key, why):
    message = _refusal(values)
    assert "schema" in message and key in message and why in message, message


@pytest.mark.parametrize("values,message", [
    ({"pools": _pools(p1={"name": "prefill"})},
     'pools[1].name: "prefill" is used by another pool'),
    ({"pools": _pools(p1={"role": "prefill"})},
     "pools: a disaggregated cluster needs both a prefill and a decode pool"),
    ({"pools": _pools(p0={"role": "mixed"})}, "pools: a mixed pool cannot be combined"),
    ({"pools": _pools(p1={"gpuType": "B200"})},
     'pools[1].gpuType: "B200" has no entry in gpuProducts'),
    ({"pools": _pools(p0={"gpusPerPod": 8, "workersPerPod": 3})},
     "pools[0].workersPerPod: 3 does not divide gpusPerPod 8"),
    ({"pools": _pools(p0={"minReplicas": 2})},
     "pools[0]: need minReplicas <= replicas <= maxReplicas, got 2 <= 1 <= 1"),
    ({"model": {"source": "/models/m"}}, 'model.source: "/models/m" is a directory but'),
    ({"pools": _pools(p1={"autoscale": {"enabled": True}})},
     "pools[1].autoscale.enabled needs autoscaling.enabled"),
    ({"autoscaling": {"enabled": True}, "pools": _pools(p0={"autoscale": {"enabled": True}})},
     'pools[0].autoscale.enabled: pool role "prefill" cannot be autoscaled'),
    ({"model": {"source": "/data/m", "weights": {"volume": "pvc", "pvc": {"claimName": "w"}}}},
     'model.source: "/data/m" must be a directory under model.weights.mountPath "/models"'),
    ({"pools": _pools(p1={"engine": {"cpu_kernels": True}})},
     "pools[1].engine.cpu_kernels: true needs a CPU pool (gpusPerPod: 0), got gpusPerPod: 1"),
    ({"model": {"dtype": "bfloat16"},
      "pools": _pools(p1={"gpusPerPod": 0, "engine": {"cpu_kernels": True}})},
     'pools[1].engine.cpu_kernels: true needs model.dtype float32, got "bfloat16"'),
])
def test_templates_refuse_inconsistent_values_naming_the_key(values, message):
    assert message in _refusal(values)


def test_gpu_type_without_gpus_needs_no_product_mapping():
    """An emulated GPU type (gpusPerPod 0, CPU nodes) renders with no GPU
    constraint, offering one gpu_type slot per Baton worker of the pod."""
    pools = _pools(p0={"gpusPerPod": 0, "gpuType": "emulated-H100"},
                   p1={"gpusPerPod": 0, "workersPerPod": 2})
    with chart() as c:
        files = c.render({"pools": pools}, name="baton", namespace="serving")
    cluster = yaml.safe_load(files["baton/templates/raycluster.yaml"])
    offers = []
    for group in cluster["spec"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        assert "affinity" not in spec
        assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
        offers.append((group["rayStartParams"]["num-gpus"], ray_resources(group["rayStartParams"])))
    assert offers == [("0", {"gpu_type:emulated-H100": 1}), ("0", {"gpu_type:L40S": 2})]
