# One image recipe for every agentbus service: planner, executor, sandbox, memory, gateway.
#
#   docker build -f infra/docker/service.Dockerfile --build-arg SERVICE=planner \
#       -t agentbus-service-planner .
#
# The build context is the repository root (infra/compose.yaml uses `context: ..`).
# There is no .dockerignore, so every COPY below names exactly the paths it needs;
# build with BuildKit (the default of `docker build` and `docker compose`), which
# only transfers those paths, not .venv or the rest of the tree.
#
# memory needs torch, installed before the memory package. PyPI's Linux wheel is
# the multi-GB CUDA build; to get the CPU build, set PIP_EXTRA_INDEX_URL to
# PyTorch's CPU wheel index when building memory, e.g.
#   docker build ... --build-arg SERVICE=memory --build-arg PIP_EXTRA_INDEX_URL=<cpu index>
# (compose passes PIP_EXTRA_INDEX_URL through from your shell). Without it, the
# default PyPI wheel is installed.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A real home: libraries the memory service loads (sentence-transformers) cache there.
RUN useradd --system --uid 10001 --create-home --home-dir /home/agentbus \
        --shell /usr/sbin/nologin agentbus

WORKDIR /build
# The shared libraries first, before any build ARG: this layer is the same for all
# four services, so it is built once and reused.
COPY libs/contracts/pyproject.toml libs/contracts/
COPY libs/contracts/src libs/contracts/src
COPY libs/core/pyproject.toml libs/core/
COPY libs/core/src libs/core/src
RUN pip install ./libs/contracts ./libs/core

ARG SERVICE
RUN case "$SERVICE" in \
        planner|executor|sandbox|memory|gateway) ;; \
        *) echo "build with --build-arg SERVICE=planner|executor|sandbox|memory|gateway (got '$SERVICE')" >&2; exit 1 ;; \
    esac

# No default on purpose: unset means PyPI only (see the top of this file).
ARG PIP_EXTRA_INDEX_URL
ARG TORCH_VERSION=2.13.0
# torch before the memory package, pinned, so its model package finds it installed
# rather than resolving one itself. The other services do not use torch.
RUN if [ "$SERVICE" = memory ]; then pip install "torch==${TORCH_VERSION}"; fi

COPY services/${SERVICE}/pyproject.toml services/${SERVICE}/
COPY services/${SERVICE}/src services/${SERVICE}/src
RUN pip install "./services/${SERVICE}"

# Unprivileged by default. The sandbox service is the exception and compose runs
# it as root (`user: root`): it talks to the Docker socket, which is root-equivalent
# on the host whatever the user inside this container, and it chowns each task's
# workspace to the sandbox uid 65534, which needs root. Untrusted code never runs
# here: it runs in the locked-down containers the sandbox service creates.
USER 10001:10001
WORKDIR /home/agentbus

ENV SERVICE=${SERVICE} \
    AGENTBUS_HTTP_HOST=0.0.0.0 \
    AGENTBUS_HTTP_PORT=9464
EXPOSE 9464

# Readiness is the health that matters to compose: broker connected, and the
# service's own dependency (Postgres for memory, Docker for sandbox) reachable.
# python:3.11-slim has no curl; urlopen raises on any non-2xx answer.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('AGENTBUS_HTTP_PORT', '9464')}/readyz\", timeout=4)"]

# Shell form so $SERVICE expands; exec replaces the shell so signals reach Python.
CMD exec "agentbus-$SERVICE"
