#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (CI has no GPU and never runs this). From the repo
# root: `bash scripts/gpu-check.sh`; logs go to $OUT (default /tmp/gpu-check).
# It runs on CUDA: the sharded layers (NCCL when there are >= 2 GPUs, gloo over CUDA tensors
# when ranks share one), the TP x PP parity matrix against transformers, half precision,
# live stage requests, the MoE parity (experts split and placed, all-to-all dispatch) and the
# data-parallel-attention group (EP across replicas, lockstep), and the transport suite (CUDA
# tensors over UCX where ucxx imports).
# Needs python3 with CUDA torch, transformers, safetensors, tokenizers, jinja2 and pytest;
# missing wheels come from .whl/ and .whl-ucx/ (scripts/gpu-wheels.sh fetches them), and the
# generated protos from stagekit/rpc/pb (carry it, or have grpcio-tools there).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
shopt -s nullglob
wheels=(.whl/*.whl .whl-ucx/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "gpus", torch.cuda.device_count())
try:
    import ucxx  # noqa: F401
    print("ucxx ok")
except Exception as e:  # noqa: BLE001
    print("ucxx unavailable:", e)
PY
[ -f stagekit/rpc/pb/stage_pb2.py ] || python3 scripts/gen_protos.py || exit 1
tests=(tests/gpu tests/unit/test_parallel_layers.py tests/integration/test_parity.py
       tests/integration/test_dtypes.py tests/integration/test_stage_requests.py
       tests/integration/test_parity_moe.py
       tests/integration/test_dp_attention.py)
[ -d tests/transport ] && tests+=(tests/transport)
python3 -m pytest -q -p no:cacheprovider -rs "${tests[@]}" 2>&1 | tee "$OUT/pytest.log"
exit "${PIPESTATUS[0]}"
