# The image every Ray pod of the Helm chart (helm/baton) runs: Baton, Ray and a
# CUDA build of torch. Build from the repository root:
#
#   docker build -t baton-serve:0.1.0 .
#   docker build --build-arg CUDA_BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=<PyTorch wheel index of that CUDA> -t baton-serve:0.1.0 .
#
# CUDA_BASE: any CUDA runtime image with apt and Python 3.10+ installable.
# TORCH_INDEX_URL: a PyTorch wheel index for one CUDA version (README, "GPU
# install"); empty installs torch==2.13.0 from the default index.
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_BASE}
ARG TORCH_INDEX_URL=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/baton \
    PATH=/opt/baton/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/baton

# torch first and alone, so no later dependency resolves a different build.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install torch==2.13.0; \
    fi

WORKDIR /opt/baton/src
COPY pyproject.toml README.md ./
COPY cluster cluster
COPY workers workers
COPY kvtransfer kvtransfer
COPY kernels kernels
COPY proto proto
COPY sim sim
RUN pip install . && baton --help >/dev/null

# KubeRay's convention: Ray runs as uid 1000 with a writable home (/tmp/ray is
# the session directory). Ubuntu images ship a user with that uid; replace it.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --create-home --shell /bin/bash ray
USER 1000
WORKDIR /home/ray

# KubeRay replaces the command (ray start, then `baton serve` on the head).
CMD ["baton", "--help"]
