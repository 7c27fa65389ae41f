# syntax=docker/dockerfile:1
#
# Three targets (docker-compose.yml picks them by name):
#   build    CUDA devel image: installs torch, compiles the pgrpo._C extension (CPU + CUDA kernels) into a wheel.
#   grader   python slim + the pure-python grader code only: no torch, no CUDA, no third-party packages.
#   runtime  the trainer (default target): plain Ubuntu + the venv from `build`. torch's CUDA wheels carry the
#            CUDA user-space libraries (nvidia-* wheels); the driver comes from the host via the NVIDIA
#            container toolkit, so the runtime needs no CUDA base image.
#
# Base images are pinned by tag. The CUDA major of the devel base (13.x) must match the CUDA build of the
# pinned torch (2.14.1+cu130), or nvcc and torch disagree about the runtime ABI.
#
#   docker build --target runtime -t projected-grpo/trainer:dev .
#   docker build --target grader  -t projected-grpo/grader:dev .

ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
ARG RUNTIME_IMAGE=ubuntu:24.04
ARG GRADER_IMAGE=python:3.12-slim-bookworm
# One uid for every container that touches the shared socket / runs volumes.
ARG APP_UID=10001

# ---------------------------------------------------------------------------------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS build
ARG TORCH_VERSION=2.14.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# Ampere (8.0 A100, 8.6 A10/RTX30), Hopper (9.0 H100/H200), Blackwell (10.0 B200, 12.0 RTX50) + PTX for newer.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0;10.0;12.0+PTX"
ARG MAX_JOBS=8
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its CUDA index; the rest comes from pyproject.toml's dependencies (plain PyPI). Only the
# runtime dependencies and the report/tensorboard extras go into the image: no pytest, no test tools.
RUN pip install --upgrade pip setuptools wheel \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml setup.py README.md /src/
COPY csrc /src/csrc
COPY pgrpo /src/pgrpo
WORKDIR /src
# FORCE_CUDA=1: there is no GPU during `docker build`, so setup.py must not probe for one.
RUN FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
    pip wheel . --no-build-isolation --no-deps -w /wheels \
 && whl=$(ls /wheels/projected_grpo-*.whl) && pip install "${whl}[report,tensorboard]" \
 && python -c "import pgrpo.ops as o; print('pgrpo extension:', o.HAVE_EXTENSION); assert o.HAVE_EXTENSION" \
 && ! python -c "import pytest" 2>/dev/null

# ---------------------------------------------------------------------------------------------------------
FROM ${GRADER_IMAGE} AS grader
ARG APP_UID
# The container is the sandbox here: compose runs it with no network, read-only root, no capabilities and
# pid/memory limits. bubblewrap is deliberately absent (user namespaces are blocked by the default seccomp
# profile anyway), so the sandbox runs in its flat mode: each execution gets rlimits, its own process group and
# private dir, a seccomp filter (no signals to other processes, no ptrace, no Unix sockets, no SysV IPC, keys,
# message queues, namespaces, metadata changes or locks) and Landlock (reads only the interpreter's files and
# its own dir, writes only its own dir); it may not create processes, and its dir is wiped after it.
# No problem data in this image (no .jsonl, no pairs.json): the trainer sends each problem row over the socket,
# and what is not here cannot be read by a response.
RUN groupadd --gid "${APP_UID}" pgrpo \
 && useradd --uid "${APP_UID}" --gid "${APP_UID}" --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pgrpo \
 && mkdir -p /sock && chown "${APP_UID}:${APP_UID}" /sock
WORKDIR /app
# Only the torch-free part of the package: the CLI dispatcher imports subcommands lazily.
COPY pgrpo/__init__.py pgrpo/__main__.py pgrpo/errors.py pgrpo/files.py pgrpo/cli.py /app/pgrpo/
COPY pgrpo/grader /app/pgrpo/grader
COPY pgrpo/data/__init__.py pgrpo/data/problems.py pgrpo/data/prompts.py /app/pgrpo/data/
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/pgrpo-healthcheck
ENV PYTHONPATH=/app PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
USER ${APP_UID}:${APP_UID}
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "/usr/local/bin/pgrpo-healthcheck", "grader", "/sock/grader.sock"]
ENTRYPOINT ["python", "-m", "pgrpo", "grader", "serve"]
CMD ["--socket", "/sock/grader.sock", "--workers", "4"]

# ---------------------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
ARG APP_UID
ENV DEBIAN_FRONTEND=noninteractive
# Same Ubuntu release as the build stage, so the venv's python3 symlink and the wheel's ABI match.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# /app/runs and /app/.cache point at the volumes, so the presets' relative paths (runs/..., .cache/svd) land there.
# A fresh named volume copies the ownership of its mount point, so the non-root user can write it.
RUN groupadd --gid "${APP_UID}" pgrpo \
 && useradd --uid "${APP_UID}" --gid "${APP_UID}" --create-home --home-dir /home/pgrpo --shell /bin/bash pgrpo \
 && mkdir -p /runs /cache/huggingface /vhack /sock /app \
 && chown -R "${APP_UID}:${APP_UID}" /runs /cache /vhack /sock \
 && ln -s /runs /app/runs && ln -s /cache /app/.cache
COPY --from=build /opt/venv /opt/venv
COPY jobs /app/jobs
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/pgrpo-healthcheck
COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/pgrpo-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    PGRPO_RUNS_DIR=/runs \
    PGRPO_METRICS_PORT=9400 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app
USER ${APP_UID}:${APP_UID}
EXPOSE 9400
# Healthy = the trainer's Prometheus endpoint answers (model download + SVD can take minutes at start).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
  CMD ["python3", "/usr/local/bin/pgrpo-healthcheck", "metrics"]
ENTRYPOINT ["pgrpo-entrypoint"]
CMD ["train"]
