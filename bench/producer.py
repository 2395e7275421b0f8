"""The one stdout producer every throughput contender runs: a static C program built here."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("producer.c")
IN_CONTAINER = "/rune-bench-produce"  # the root exists in every image


class ProducerUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Producer:
    """Where the binary is on the host (process instances, ssh, the local pipe)."""

    host_path: Path | None
    name: str = "static C producer (1 MiB writes)"

    def argv(self, size: int) -> list[str]:
        if self.host_path is None:
            return ["head", "-c", str(size), "/dev/zero"]
        return [str(self.host_path), str(size)]

    def container_argv(self, size: int) -> list[str]:
        return [IN_CONTAINER, str(size)]


# Without a C compiler the host's rows still measure, all with GNU head; the container's
# rows are skipped, since busybox head there would not be the same producer.
HOST_HEAD = Producer(None, "GNU head -c on the host (no static producer)")


def build(workdir: Path) -> Producer:
    """Compiles producer.c with `cc -static -O2` into WORKDIR; checks it runs."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ProducerUnavailable("no C compiler (cc) on PATH: apt-get install -y gcc libc6-dev")
    binary = workdir / "rune-bench-produce"
    built = subprocess.run([cc, "-O2", "-static", "-o", str(binary), str(SOURCE)],
                           capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    if built.returncode != 0:
        raise ProducerUnavailable(f"cc -static failed: {built.stderr.decode()[-300:]}")
    check = subprocess.run([str(binary), "5"], capture_output=True, timeout=30)
    if check.returncode != 0 or check.stdout != b"\0" * 5:
        raise ProducerUnavailable("the static producer does not run on this host")
    binary.chmod(0o755)
    return Producer(binary)
