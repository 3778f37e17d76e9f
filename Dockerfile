# stagemesh: one image for every role (stage, gateway, demo-model, up); the entrypoint is
# the `stagemesh` command, so `docker run IMAGE stage --help` works like the CLI.
#
#   docker build -t stagemesh:latest .                                  # CPU torch (default)
#   docker build -t stagemesh:cuda --build-arg TORCH_VARIANT=cu128 .    # CUDA torch
#
# Both carry the UCX data plane (the `ucx` extra, ucxx; it runs on CPU too), which the stages
# use by default; `--build-arg EXTRAS=` leaves it out (the stages then fall back to gRPC).
#
# torch comes from ./wheelhouse/ when a wheel for the requested version and variant is there
# (e.g. a CPU wheel copied or hard-linked from a local cache: no multi-GB download), otherwise
# from the PyTorch index of TORCH_VARIANT only (never PyPI's torch, a CUDA build whatever the
# variant). Its version is the pin in constraints.txt.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=
ARG TORCH_INDEX_URL=
ARG EXTRAS=ucx
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/stagemesh && /opt/stagemesh/bin/pip install -q --upgrade pip
ENV PATH=/opt/stagemesh/bin:${PATH}
WORKDIR /src

# 1. torch (its own layer: source edits do not reinstall it). The glob keeps the build
#    working when there is no wheelhouse/ at all.
COPY constraints.txt wheelhouse* /tmp/wheelhouse/
RUN set -eu; \
    version="${TORCH_VERSION:-$(sed -n 's/^torch==//p' /tmp/wheelhouse/constraints.txt)}"; \
    wheel="$(ls /tmp/wheelhouse/torch-"${version}"+"${TORCH_VARIANT}"-*.whl 2>/dev/null | head -n 1 || true)"; \
    if [ -n "$wheel" ]; then \
        echo "torch from the wheelhouse: ${wheel##*/}"; \
        pip install -q "$wheel"; \
    else \
        index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/${TORCH_VARIANT}}"; \
        echo "torch ${version} from ${index}"; \
        pip install -q "torch==${version}" --index-url "$index" \
          || { echo "no torch ${version} from ${index}: put its wheel in wheelhouse/ or set TORCH_INDEX_URL" >&2; exit 1; }; \
    fi; \
    rm -rf /tmp/wheelhouse; \
    python -c "import importlib.metadata as m; print('torch', m.version('torch'))"

# 2. the other dependencies (read from pyproject.toml; a layer of their own as well), plus
#    grpcio-tools to generate the protos.
COPY pyproject.toml constraints.txt /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -q -c constraints.txt -r /tmp/requirements.txt grpcio-tools

# 3. the project: protos generated, then installed (not editable) into the venv.
COPY README.md setup.py MANIFEST.in /src/
COPY scripts/gen_protos.py /src/scripts/
COPY protos /src/protos
COPY stagekit /src/stagekit
COPY services /src/services
COPY gateway /src/gateway
COPY stagemesh /src/stagemesh
RUN python scripts/gen_protos.py \
 && pip install -q -c constraints.txt --no-deps . \
 && if [ -n "${EXTRAS}" ]; then pip install -q -c constraints.txt ".[${EXTRAS}]"; fi \
 && pip uninstall -q -y grpcio-tools \
 && cd / && python -c "import stagekit.rpc.pb.stage_pb2_grpc, gateway.cli, services.stage.server, stagemesh.cli.main"

FROM ${BASE_IMAGE}
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="stagemesh" \
      org.opencontainers.image.description="Distributed LLM inference as gRPC services (stages + OpenAI-compatible gateway)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.stagemesh.torch-variant="${TORCH_VARIANT}"
ENV PATH=/opt/stagemesh/bin:${PATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/stagemesh
# A C compiler for the native CPU kernels, built on first use for the CPU the container runs
# on (stagekit/kernels/); without it they fall back to slower torch code. NATIVE_KERNELS=0
# leaves it out (saves ~200 MB; CUDA images do not need it).
ARG NATIVE_KERNELS=1
RUN if [ "${NATIVE_KERNELS}" = "1" ]; then \
        apt-get update -q && apt-get install -y -q --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/stagemesh /opt/stagemesh
COPY docker/healthcheck.py /usr/local/bin/stagemesh-healthcheck
COPY docker/model-init.py /usr/local/bin/stagemesh-model-init
# /models belongs to the service user, so a fresh named volume mounted there is writable by
# the one-shot demo-model service (Docker copies the mount point's owner into a new volume).
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/stagemesh --shell /usr/sbin/nologin stagemesh \
 && mkdir -p /models && chown stagemesh:stagemesh /models \
 && sed -i '1s|.*|#!/opt/stagemesh/bin/python|' /usr/local/bin/stagemesh-healthcheck /usr/local/bin/stagemesh-model-init \
 && chmod 0755 /usr/local/bin/stagemesh-healthcheck /usr/local/bin/stagemesh-model-init
USER stagemesh
WORKDIR /home/stagemesh
# stage gRPC, stage metrics, gateway HTTP, gateway gRPC (the ports docker-compose.yml uses)
EXPOSE 50051 9400 8000 8001
ENTRYPOINT ["stagemesh"]
CMD ["--help"]
