#!/usr/bin/env bash
# Every GPU check and benchmark, in one go, on a CUDA machine whose python3
# already has torch, triton and transformers (grpcio/protobuf/isal wheels can be
# installed beforehand). Logs and JSON land in $OUT (default benchmarks/out/gpu).
#
#   bash benchmarks/gpu_run.sh [tests] [kernels] [engine] [kv] [profile]  # default: all five
#
# Each step has its own time limit so one stuck step leaves the others' results.
set -u
OUT=${OUT:-benchmarks/out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-tests kernels engine kv profile}

step() {  # name limit_s command...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "-- $name rc=$? in $((SECONDS - t0))s"
    tail -n "${TAIL:-25}" "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton, transformers, grpc, google.protobuf as pb, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__, '| grpcio', grpc.__version__, '| protobuf', pb.__version__, '| numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

for s in $steps; do
    case $s in
        tests) step tests "${TESTS_LIMIT:-170}" $PY -m pytest tests/gpu -q -p no:cacheprovider -rs ;;
        kernels) step kernels "${KERNELS_LIMIT:-130}" $PY benchmarks/kernels_bench.py --device cuda \
                     --json "$OUT/kernels_gpu.json" ;;
        engine) step engine "${ENGINE_LIMIT:-200}" $PY benchmarks/engine_throughput.py --device cuda \
                    --peers hf --json "$OUT/engine_gpu.json" --model-cache /tmp/baton-models \
                    --log-dir /tmp/baton-peer-logs ${ENGINE_ARGS:-} ;;
        kv) step kv "${KV_LIMIT:-120}" $PY benchmarks/kv_transfer_bench.py --device cuda \
                --json "$OUT/kv_gpu.json" ${KV_ARGS:-} ;;
        profile) echo "== profile"; timeout "${PROFILE_LIMIT:-60}" $PY benchmarks/step_profile.py \
                     --device cuda --top 20 2>&1 | tee -a "$OUT/machine.txt" | head -8 ;;
        *) echo "unknown step $s (tests, kernels, engine, kv, profile)"; exit 2 ;;
    esac
done
