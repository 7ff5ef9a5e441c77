# nexus-authz container image: the policy engine (`nexus-authz serve`) and, with another command, the mock
# OpenAI/Anthropic upstream of the demo. Envoy runs in its own container from the official
# envoyproxy/envoy image (see docker-compose.yml and deploy/kubernetes/).
#
#   docker build -t nexus-authz:0.1.0 .
#   docker run --rm -v $PWD/nexus.yaml:/etc/nexus-authz/nexus.yaml:ro ... nexus-authz:0.1.0
#   docker run --rm nexus-authz:0.1.0 python -m nexus_authz.demo.mock_upstream --host 0.0.0.0
#
# Two stages: the first builds a virtualenv (every dependency ships manylinux wheels; gcc only compiles
# nexus-authz's own Cython fast path, nexus_authz/native/), the second copies it onto a clean
# python:3.11-slim (no compiler) and runs as an unprivileged user (uid/gid 10001; the Envoy container runs
# as the same user so both can use the Unix sockets in /run/nexus-authz).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/nexus-authz
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY nexus_authz ./nexus_authz
# pip compiles the bytecode here, so a read-only root filesystem costs nothing at start-up. The runtime
# dependencies go in first: the build (in pip's isolated environment, which fetches Cython, pyproject's
# build-system, and never ships it) trains its profile-guided build of the fast path with the venv's
# Python, which needs them (setup.py). The check fails the image if the fast path did not build, or not
# profile-guided (the pure-Python fallback is for machines without a compiler, not for the image).
RUN /opt/nexus-authz/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/nexus-authz/bin/pip install -r /tmp/requirements.txt \
 && /opt/nexus-authz/bin/pip install . \
 && cd / && /opt/nexus-authz/bin/python -c "from nexus_authz import native; assert native.PATH == 'compiled', native.WHY_PURE; assert native.BUILD == 'PGO', native.BUILD"

FROM python:3.11-slim
LABEL org.opencontainers.image.title="nexus-authz" \
      org.opencontainers.image.description="Policy engine of the Nexus LLM API gateway (Envoy ext_authz / nginx auth_request)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/nexus-authz/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NEXUS_CONFIG=/etc/nexus-authz/nexus.yaml \
    NEXUS_HEALTH_URL=http://127.0.0.1:9090/healthz
RUN groupadd --system --gid 10001 nexus \
 && useradd --system --uid 10001 --gid nexus --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nexus \
 && mkdir -p /etc/nexus-authz /run/nexus-authz /var/lib/nexus-authz \
 && chown nexus:nexus /run/nexus-authz /var/lib/nexus-authz
COPY --from=build /opt/nexus-authz /opt/nexus-authz
# The Envoy configs, for `nexus-authz demo` inside the image (it looks for /app/envoy/envoy.yaml).
COPY envoy /app/envoy
USER 10001:10001
WORKDIR /var/lib/nexus-authz
# fast path: Unix socket in /run/nexus-authz (a shared volume); admin: /healthz /readyz /metrics
EXPOSE 9090
# Liveness of whatever this container runs: nexus-authz's admin /healthz by default; the mock upstream's
# service sets NEXUS_HEALTH_URL=http://127.0.0.1:8000/healthz. No curl in the slim image: Python does it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['NEXUS_HEALTH_URL'], timeout=2)"]
# SIGTERM: nexus-authz drains (server.shutdown_grace) and flushes the ledger, then exits 0.
CMD ["nexus-authz", "serve"]
