"""`rune exec` into a container vs plain `docker exec` on the same container, in one run.

    python bench/docker_vs_rune.py [--runs 10] [--size-mib 1024] [--tty]

Starts a local stack (nats-server, apiserver, an agent with the Docker runner) and one
labelled container of rune-test-busybox, then times, alternating the two tools:
setup (`true`, whole client process, wall clock) and stdout throughput (`head -c SIZE
/dev/zero`, counted by this script). Removes the container and stops the stack at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.devstack import Stack, free_port, wait_until  # noqa: E402

IMAGE = "rune-test-busybox:latest"


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   env=env, cwd=ROOT)
    return time.perf_counter() - start


def throughput(argv: list[str], env: dict, size: int) -> float:
    """MiB/s of the command's stdout as read here; checks that every byte arrived."""
    buf = bytearray(1 << 20)
    got = 0
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
                            cwd=ROOT, bufsize=0)
    while n := proc.stdout.readinto(buf):
        got += n
    code = proc.wait()
    elapsed = time.perf_counter() - start
    if code != 0 or got < size:  # a TTY may add bytes (none for /dev/zero), never lose any
        raise SystemExit(f"{argv[:3]}: exit {code}, {got} of {size} bytes")
    return size / elapsed / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2, help="throughput runs per tool")
    parser.add_argument("--tty", action="store_true", help="also measure with a remote TTY")
    args = parser.parse_args()

    import docker

    client = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
    run_id = f"docker-bench-{os.getpid()}"
    labels = {"rune.namespace": "default", "rune.service": "bench",
              "rune.instance": "bench-instance-0", "rune.bench": run_id}
    container = client.create_container(
        IMAGE, ["sh", "-c", "exec sleep 2147483647"], labels=labels, name=f"rune-{run_id}",
        host_config=client.create_host_config(network_mode="none"))["Id"]
    client.start(container)
    stack = Stack(Path(tempfile.mkdtemp(prefix="rune-docker-bench-")), nats_port=free_port(),
                  api_port=free_port())
    env = {**os.environ, "RUNE_CONFIG": str(stack.state_dir / "none.yaml")}
    try:
        stack.start_nats()
        stack.start_apiserver()
        stack.start_agent("bench", [], {"docker": {"enabled": True,
                                                   "match_labels": {"rune.bench": run_id}}},
                          wait_running=1)
        wait_until(lambda: stack.running_instances("bench") >= 1, "container adopted")
        def docker_cmd(*flags: str) -> list[str]:
            return ["docker", "exec", *flags, container[:12]]

        def rune_cmd(*flags: str) -> list[str]:
            return [sys.executable, "-m", "cli.main", "exec", "--api-server",
                    stack.api_address, *flags, "bench-instance-0"]

        python_cmd = [sys.executable, "-c", "pass"]

        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        times: dict[str, list[float]] = {"docker exec": [], "rune exec": [], "python -c pass": []}
        timed([*rune_cmd(), "true"], env)  # warm caches once
        for _ in range(args.runs):
            times["docker exec"].append(timed([*docker_cmd(), "true"], env))
            times["rune exec"].append(timed([*rune_cmd(), "true"], env))
            times["python -c pass"].append(timed(python_cmd, env))
        print(f"\nsetup: `true`, whole client process, {args.runs} runs each")
        for name, values in times.items():
            print(f"  {name:15} median {statistics.median(values) * 1000:7.1f} ms"
                  f"   min {min(values) * 1000:7.1f} ms")

        size = args.size_mib * 2**20
        payload = ["head", "-c", str(size), "/dev/zero"]
        print(f"\nthroughput: `{' '.join(payload)}` to this script's pipe")
        for flags in [(), *([("-t",)] if args.tty else [])]:
            label = " ".join(flags)
            rates: dict[str, list[float]] = {"docker exec": [], "rune exec": []}
            for _ in range(args.rounds):
                rates["docker exec"].append(throughput([*docker_cmd(*flags), *payload], env, size))
                rates["rune exec"].append(throughput([*rune_cmd(*flags), *payload], env, size))
            for name, values in rates.items():
                print(f"  {name + (' ' + label if label else ''):15} best {max(values):7.1f} "
                      f"MiB/s   median {statistics.median(values):7.1f} MiB/s")
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    finally:
        stack.stop()
        client.remove_container(container, force=True)


if __name__ == "__main__":
    main()
