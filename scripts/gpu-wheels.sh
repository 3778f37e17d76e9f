#!/usr/bin/env bash
# Run on a machine with PyPI access: fetch the wheels scripts/gpu-check.sh installs on a GPU
# box whose image lacks them (Python 3.12, x86-64). Optional UCX (CUDA 13) wheels: pass --ucx.
set -euo pipefail
cd "$(dirname "$0")/.."
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       "${plat[@]}" -d "$1" "${@:2}"; }
dl .whl grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
if [ "${1:-}" = "--ucx" ]; then
  dl .whl-ucx ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 libucx-cu13 rmm-cu13==26.10.0 librmm-cu13==26.10.0 \
     rapids-logger==0.3.0
fi
du -sh .whl .whl-ucx 2>/dev/null || true
