"""A throwaway container for the `docker exec` baselines, when a Docker Engine answers."""

from __future__ import annotations

import os
import shutil
import subprocess

from bench.producer import IN_CONTAINER, Producer

IMAGE = "rune-test-busybox:latest"
SERVICE = "dockerbox"  # the container's service name for rune


class DockerUnavailable(RuntimeError):
    pass


class DockerBox:
    def __init__(self, image: str = IMAGE) -> None:
        self.image = image
        self.name = f"rune-bench-{os.getpid()}"
        # Lets an agent with the Docker runner adopt this very container (docker_vs_rune).
        self.labels = {"rune.namespace": "default", "rune.service": SERVICE,
                       "rune.bench": self.name}
        self.started = False

    def start(self) -> None:
        if not shutil.which("docker"):
            raise DockerUnavailable("no docker CLI on PATH")
        try:
            info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                                  capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DockerUnavailable("the Docker Engine did not answer within 20 s") from None
        if info.returncode != 0:
            raise DockerUnavailable("no Docker Engine answers (docker info failed)")
        run = subprocess.run(["docker", "run", "-d", "--rm", "--name", self.name,
                              "--network", "none",
                              *(f"--label={k}={v}" for k, v in self.labels.items()),
                              self.image, "sleep", "2147483647"],
                             capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        if run.returncode != 0:
            raise DockerUnavailable(f"docker run {self.image} failed: "
                                    f"{run.stderr.decode().strip()[-300:]}")
        self.started = True

    def install(self, producer: Producer) -> None:
        """Copies the static producer into the container: docker exec runs the same code."""
        done = subprocess.run(["docker", "cp", str(producer.host_path),
                               f"{self.name}:{IN_CONTAINER}"], capture_output=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise DockerUnavailable(f"docker cp of the producer failed: "
                                    f"{done.stderr.decode().strip()[-300:]}")

    def argv(self, *command: str, tty: bool = False) -> list[str]:
        return ["docker", "exec", *(["-t"] if tty else []), self.name, *command]

    def stop(self) -> None:
        if self.started:
            subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL)
            self.started = False
