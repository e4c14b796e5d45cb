"""Cluster config: shipped examples load; every bad value is named."""

from __future__ import annotations

import pytest

from cluster.config import EXAMPLES, ClusterConfig, ConfigError, load_config

POOL = {"name": "m", "role": "mixed", "gpu_type": "H100"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_load_and_round_trip(name):
    cfg = load_config(name)
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg


def test_disaggregated_example_values():
    cfg = load_config("tiny-disagg")
    assert [(p.name, p.role, p.gpu_type, p.replicas) for p in cfg.pools] == [
        ("prefill", "prefill", "H100", 1), ("decode", "decode", "L40S", 1)]
    assert cfg.pools[0].kv_cache_bytes == 64 << 20 and cfg.disaggregated


@pytest.mark.parametrize("data,message", [
    ({"pools": [{**POOL, "role": "both"}]},
     r"pools\[0\].role: 'both' is not allowed; allowed: prefill, decode, mixed"),
    ({"pools": [{**POOL, "replicas": -1}]}, r"pools\[0\].replicas: -1 must be >= 0"),
    ({"pools": [{**POOL, "replicas": "two"}]}, r"pools\[0\].replicas: expected int, got 'two'"),
    ({"pools": [{**POOL, "kv_cache_bytes": "lots"}]}, "pools\\[0\\].kv_cache_bytes: 'lots' is not a size"),
    ({"pools": [{**POOL, "block_size": 24}]}, "block_size: 24 must be a power of two"),
    ({"pools": [{"role": "mixed", "gpu_type": "H100"}]}, r"pools\[0\].name: required key is missing"),
    ({"transport": "tcp", "pools": [POOL]}, "transport: 'tcp' is not allowed; allowed: grpc, nccl"),
    ({"router": {"policy": "random"}, "pools": [POOL]}, "router.policy: 'random' is not allowed"),
    ({"scheduler": {"policy": "sjf"}, "pools": [POOL]}, "scheduler.policy: 'sjf' is not allowed"),
    ({"scheduler": {"policy": "ltr", "score_wait_s": -1}, "pools": [POOL]},
     r"scheduler.score_wait_s: -1(\.0)? must be >= 0"),
    ({"pools": [POOL], "colour": 1}, "colour: unknown key"),
    ({"pools": []}, "pools: must be a non-empty list"),
    ({"pools": [{**POOL, "role": "prefill"}]}, "needs both a prefill and a decode pool"),
    ({"pools": [POOL, {**POOL, "name": "p", "role": "prefill"}]}, "cannot be combined"),
    ({"pools": [POOL], "server": {"grpc_port": 70000}}, r"server.grpc_port: 70000 must be in \[0, 65535\]"),
    ({"pools": [POOL], "redis": {"url": "http://x"}}, "redis.url: 'http://x' must start with redis://"),
    ({"pools": [POOL], "ranker": {"precision": "int4"}}, "ranker.precision: 'int4' is not allowed"),
    ({"pools": [POOL], "ranker": {"chunk": 0}}, "ranker.chunk: 0 must be"),
    ({"pools": [{**POOL, "cpu_kernels": "maybe"}]},
     r"pools\[0\].cpu_kernels: expected bool \(true or false\), got 'maybe'"),
    ({"pools": [{**POOL, "cpu_kernels": 1}]},
     r"pools\[0\].cpu_kernels: expected bool \(true or false\), got 1"),
    ({"pools": [{**POOL, "cpu_kernels": True, "gpus_per_replica": 1}]},
     r"pools\[0\].cpu_kernels: true needs a CPU pool \(gpus_per_replica: 0\), got gpus_per_replica: 1"),
    ({"pools": [{**POOL, "cpu_kernels": True}], "model": {"dtype": "bfloat16"}},
     r"pools\[0\].cpu_kernels: true needs model.dtype float32, got 'bfloat16'"),
])
def test_bad_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.from_dict(data)


def test_cpu_kernels_is_per_pool_and_unset_by_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pools:\n"
                    "  - {name: prefill, role: prefill, gpu_type: H100}\n"
                    "  - {name: decode, role: decode, gpu_type: L40S, cpu_kernels: true}\n")
    cfg = load_config(path)
    assert [p.cpu_kernels for p in cfg.pools] == [None, True]
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    assert all(p.cpu_kernels is None for name in EXAMPLES for p in load_config(name).pools)


def test_sizes_accept_units():
    cfg = ClusterConfig.from_dict({"pools": [{**POOL, "kv_cache_bytes": "1.5GiB"}]})
    assert cfg.pools[0].kv_cache_bytes == 3 << 29


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_redis_password_env_names_a_variable():
    cfg = ClusterConfig.from_dict({"pools": [POOL], "redis": {"password_env": "BATON_REDIS_PASSWORD"}})
    assert cfg.redis.password_env == "BATON_REDIS_PASSWORD"
    assert ClusterConfig.from_dict({"pools": [POOL]}).redis.password_env is None
    with pytest.raises(ConfigError, match="redis.password_env: '1-PASS' is not an environment variable name"):
        ClusterConfig.from_dict({"pools": [POOL], "redis": {"password_env": "1-PASS"}})
    with pytest.raises(ConfigError, match="redis.password_env: expected str, got 5"):
        ClusterConfig.from_dict({"pools": [POOL], "redis": {"password_env": 5}})


def test_autoscale_block_is_typed_and_replicas_is_the_start():
    cfg = ClusterConfig.from_dict({"pools": [{**POOL, "replicas": 2, "autoscale": {
        "min_replicas": 1, "max_replicas": 4, "target_waiting_per_replica": 2,
        "downscale_delay_s": 30}}]})
    a = cfg.pools[0].autoscale
    assert (a.min_replicas, a.max_replicas, a.target_waiting_per_replica) == (1, 4, 2.0)
    assert (a.downscale_delay_s, a.upscale_delay_s, a.max_step, a.policy) == (30.0, 5.0, 1,
                                                                              "queue-depth")
    assert cfg.pools[0].replicas == 2
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    assert ClusterConfig.from_dict({"pools": [POOL]}).pools[0].autoscale is None


SCALE = {"max_replicas": 3}


@pytest.mark.parametrize("autoscale,message", [
    ({}, r"pools\[0\].autoscale.max_replicas: required key is missing"),
    ({**SCALE, "target_waiting_per_replica": -1},
     r"pools\[0\].autoscale.target_waiting_per_replica: -1.0 must be > 0"),
    ({**SCALE, "target_kv_usage": 1.2}, r"pools\[0\].autoscale.target_kv_usage: 1.2 must be in \(0, 1\]"),
    ({**SCALE, "upscale_delay_s": -5}, r"pools\[0\].autoscale.upscale_delay_s: -5.0 must be >= 0"),
    ({**SCALE, "max_step": 0}, r"pools\[0\].autoscale.max_step: 0 must be > 0"),
    ({**SCALE, "policy": "cpu"}, r"pools\[0\].autoscale.policy: 'cpu' is not allowed; allowed: queue-depth"),
    ({**SCALE, "min_replicas": 2}, r"pools\[0\].autoscale: replicas \(1, the count at start\) must "
                                   r"be in \[min_replicas, max_replicas\] = \[2, 3\]"),
    ({"max_replicas": 0, "min_replicas": 0}, r"pools\[0\].autoscale.max_replicas: 0 must be >= 1"),
    ({**SCALE, "target": 3}, r"pools\[0\].autoscale.target: unknown key; allowed: max_replicas"),
    ({**SCALE, "max_step": 1.5}, r"pools\[0\].autoscale.max_step: expected int, got 1.5"),
])
def test_bad_autoscale_values_are_named(autoscale, message):
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.from_dict({"pools": [{**POOL, "autoscale": autoscale}]})


def test_prefill_pools_are_not_autoscaled():
    pools = [{"name": "p", "role": "prefill", "gpu_type": "H100", "autoscale": SCALE},
             {"name": "d", "role": "decode", "gpu_type": "L40S"}]
    with pytest.raises(ConfigError, match=r"pools\[0\].autoscale: pool role 'prefill' cannot be "
                                          "autoscaled; allowed roles: decode, mixed"):
        ClusterConfig.from_dict({"pools": pools})
