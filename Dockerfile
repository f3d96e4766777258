# corral in a container: the Ollama-compatible load balancer, run as a non-root user.
#
#   docker build -t corral .
#   docker run -d --name corral -p 11434:11434 -v /etc/corral:/etc/corral:ro \
#       --env-file /etc/corral/corral.env --gpus all --stop-timeout 75 corral
#
# Two stages: the first installs corral and its dependencies into a virtual environment, the
# second copies only that environment onto a fresh base, so no build context, pip cache or
# source tree ends up in the image. Both stages use the same base at the same venv path: a venv
# is not relocatable, and its python is a link to the base image's interpreter.
# The base is pinned by tag; pin it by digest too (python:3.12-slim@sha256:...) where builds must
# be reproducible byte for byte.

FROM python:3.12-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/corral

WORKDIR /src
# pyproject names README.md as the package's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY src ./src
# Every dependency ships wheels for CPython 3.12 on x86_64 and aarch64: no compiler needed.
# pip compiles the bytecode here, so the final image never writes any.
RUN /opt/corral/bin/pip install . \
    && /opt/corral/bin/corral --help >/dev/null


FROM python:3.12-slim

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="corral" \
      org.opencontainers.image.description="An Ollama-compatible load balancer for GPU fleets" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"

# A fixed UID/GID (not the next free one) so files on the host can be made readable to it:
# chgrp 10001 a key file, or `docker run --group-add <gid>` for a host group.
# Not --system: useradd warns about a system UID above 999.
RUN groupadd --gid 10001 corral \
    && useradd --uid 10001 --gid corral --no-create-home \
        --home-dir /var/lib/corral --shell /usr/sbin/nologin corral \
    && install -d -o corral -g corral -m 0750 /var/lib/corral \
    && install -d -m 0755 /etc/corral

COPY --from=build /opt/corral /opt/corral

# NVIDIA_DRIVER_CAPABILITIES=utility: corral reads GPUs through NVML only, so with the NVIDIA
# container toolkit (`docker run --gpus all`, or NVIDIA_VISIBLE_DEVICES=all under the nvidia
# runtime) the container gets libnvidia-ml and the /dev/nvidia* nodes, not the CUDA libraries.
# Without the toolkit there is no NVML in the container: corral logs that once and balances with
# its local GPU features (VRAM, heat) off. Remote GPUs via gpu_metrics_url work either way.
ENV PATH=/opt/corral/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=utility

# The config comes from outside: a read-only bind mount of /etc/corral (or a Kubernetes
# ConfigMap, or a derived image that COPYs corral.toml there). No VOLUME: one would create an
# empty anonymous volume whenever the mount is forgotten and would hide a config that a derived
# image adds. Secrets are never in the image: CORRAL_ADMIN_KEY / CORRAL_CLIENT_KEYS from the
# environment (--env-file /etc/corral/corral.env), or files named in [auth] under the mount.
# /var/lib/corral is writable by corral: mount a volume there for server.state_file.
WORKDIR /var/lib/corral

# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001

EXPOSE 11434

# The slim image has no curl or wget; Python's stdlib does the probe. An error or a non-2xx
# answer raises, and the uncaught exception exits 1 (unhealthy). CORRAL_SERVER__PORT, if set,
# overrides the port for corral as well, so the probe follows it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CORRAL_SERVER__PORT', '11434'), timeout=4)"]

# corral drains on SIGTERM: new requests get 503 while in-flight streams finish, for up to
# server.drain_timeout_s (60 s by default). docker stop waits only 10 s before SIGKILL, so run
# with --stop-timeout 75 (Kubernetes: terminationGracePeriodSeconds: 75).
STOPSIGNAL SIGTERM

# Exec form: corral is PID 1 and gets the signal itself (a shell in between would swallow it).
# server.host defaults to 127.0.0.1, which inside a container is the container's own loopback:
# unreachable through a published port. So listen on all interfaces of the container's network
# namespace; what the host exposes is decided by `-p` (e.g. -p 127.0.0.1:11434:11434).
CMD ["corral", "serve", "--config", "/etc/corral/corral.toml", "--host", "0.0.0.0"]
