"""`rune cp` beside `scp` and `docker cp`: one big file and a tree of small files, each way.

    python bench/cp.py [--size-mib 1024] [--files 10000] [--quick]

Into a process instance (the host's file system) rune is set against scp to the
bench's own sshd; into the bench's busybox container (adopted by an agent with the
Docker runner) against `docker cp`. Every copy is checked: the destination's SHA-256
(file) or its file count (tree) must match, or the row is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/cp.py`: the repo root holds bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import rows  # noqa: E402
from bench.context import BenchContext, Sizes  # noqa: E402
from bench.dockerbox import SERVICE  # noqa: E402

SECTION = "extra: rune cp vs scp and docker cp"
SIZE = "cp_bytes"
FILES = "cp_files"
ONLY = "cp_only"
QUICK_SIZE, QUICK_FILES = 16 << 20, 200  # --quick: a smoke test of every row
PROCESS = "into a process instance"
SCP = "scp over the bench's sshd"
DOCKER_CP = "docker cp, same container"


def _timed(argv: list[str], env: dict | None = None) -> float:
    # Untimed: what the copy before left dirty (docker cp does not fsync; 1 GiB flushing
    # meanwhile would slow whichever copy comes next) is written out first.
    os.sync()
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, env=env, stdin=subprocess.DEVNULL,
                          timeout=1800)
    took = time.monotonic() - began
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-300:]}")
    return took


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _count(top: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(top))


def _make(work: Path, size: int, files: int) -> tuple[Path, str, Path]:
    big = work / "big.bin"
    with open(big, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 << 20))
            f.write(block)
            left -= len(block)
    tree = work / "tree"
    for i in range(files):
        d = tree / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:05d}.txt").write_bytes(os.urandom(512 + i % 1024))
    return big, _sha(big), tree


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run(ctx: BenchContext) -> list[dict]:
    size = ctx.extra.get(SIZE, QUICK_SIZE if ctx.quick else (1 << 30))
    files = ctx.extra.get(FILES, QUICK_FILES if ctx.quick else 10_000)
    work = ctx.workdir / "cp"
    big, want, tree = _make(_fresh(work / "src"), size, files)
    label = f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"
    cp = [sys.executable, "-m", "rune.cli.main", "cp", "--api-server", ctx.api_address,
          "--no-progress"]
    instance = f"{ctx.target}-instance-{ctx.agent_id}-0"
    dst = work / "dst"
    out: list[dict] = []

    def file_row(row_id: str, name: str, copy: callable, check: Path, ref: str | None) -> None:
        def measure() -> dict:
            took = copy()
            if _sha(check) != want:
                raise RuntimeError("the copy's SHA-256 differs from the source's")
            return rows.throughput(row_id, SECTION, name, size, took, ref=ref)
        out.append(rows.guarded(row_id, SECTION, name, measure))

    def tree_row(row_id: str, name: str, copy: callable, check: Path, ref: str | None) -> None:
        def measure() -> dict:
            took = copy()
            if _count(check) != files:
                raise RuntimeError(f"{_count(check)} files arrived, not {files}")
            return rows.figure(row_id, SECTION, name, files / took, "files/s",
                               better="higher", ref=ref, seconds=took)
        out.append(rows.guarded(row_id, SECTION, name, measure))

    # --- into a process instance, beside scp -------------------------------------------
    ssh = ctx.sshd
    scp = (["scp", "-O", "-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-i", str(ssh.dir / "user_key"),
            "-P", str(ssh.port)] if ssh else [])
    remote_dir = dst / "remote"

    def argv(tool: str, way: str, what: str, into: Path) -> list[str]:
        """One copy command: `what` ("file" or "tree") up into `into`, or down into it."""
        flags = ["-r"] if what == "tree" else []
        local = str(big if what == "file" else tree)
        name = "big.bin" if what == "file" else "tree"
        if tool == "rune":
            ends = ([local, f"{instance}:{into}/"] if way == "up"
                    else [f"{instance}:{remote_dir}/{name}", f"{into}/"])
            return [*cp, *flags, *ends]
        host = f"{ssh.user}@127.0.0.1:"
        ends = ([local, f"{host}{into}/"] if way == "up"
                else [f"{host}{remote_dir}/{name}", f"{into}/"])
        return [*scp, *flags, *ends]

    only = ctx.extra.get(ONLY, "")
    for way in ("up", "down") if only != "docker" else ():
        for what in ("file", "tree"):
            add_row = file_row if what == "file" else tree_row
            name = "big.bin" if what == "file" else "tree"
            shown = f"{label} file" if what == "file" else f"{files} small files"
            rune_id = f"cp.{way}.{what}.rune"
            into = dst / ("remote-up" if way == "up" else "local")
            add_row(rune_id, f"rune cp, {shown}, {way}load {PROCESS}",
                    lambda a=argv("rune", way, what, into), d=into:
                    (_fresh(d), _timed(a, ctx.env))[1], into / name, None)
            if not ssh:
                out.append(rows.absent(f"cp.{way}.{what}.scp", SECTION,
                                       f"{SCP}, {shown}, {way}load", rows.SKIPPED,
                                       ctx.sshd_reason or "no sshd"))
            else:
                into = dst / "scp"
                add_row(f"cp.{way}.{what}.scp", f"{SCP}, {shown}, {way}load (vs rune "
                        f"cp {PROCESS})",
                        lambda a=argv("scp", way, what, into), d=into:
                        (_fresh(d), _timed(a))[1], into / name, rune_id)
        if way == "up":  # the download rows read what this puts in place
            _fresh(remote_dir)
            _timed([*cp, "-r", str(tree), str(big), f"{instance}:{remote_dir}/"], ctx.env)
    if only != "process":
        out += _docker_rows(ctx, cp, big, tree, want, size, files, label)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _docker_rows(ctx: BenchContext, cp: list[str], big: Path, tree: Path, want: str,
                 size: int, files: int, label: str) -> list[dict]:
    names = [(f"cp.{way}.{what}.crune", f"cp.{way}.{what}.dockercp")
             for way in ("up", "down") for what in ("file", "tree")]
    if not ctx.docker:
        return [rows.absent(i, SECTION, i, rows.SKIPPED, ctx.docker_reason or "no Docker")
                for pair in names for i in pair]
    box = ctx.docker
    out: list[dict] = []
    import docker

    client = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
    try:
        instance = next(i.instance_id for i in __import__("asyncio").run(ctx.stack._list())
                        if i.service == SERVICE)
        pid = client.inspect_container(box.name)["State"]["Pid"]
        inside = Path(f"/proc/{pid}/root/tmp")
        local = ctx.workdir / "cp" / "dst" / "docker-local"

        def check_file(path: Path) -> None:
            if path.name == "tree":
                if _count(path) != files:
                    raise RuntimeError(f"{_count(path)} files arrived, not {files}")
            elif _sha(path) != want:
                raise RuntimeError("the copy's SHA-256 differs from the source's")

        def add(row_id: str, name: str, argv: list[str], env: dict | None, check: Path,
                ref: str | None, before: callable) -> None:
            def measure() -> dict:
                before()
                took = _timed(argv, env)
                check_file(check)
                if check.name == "tree":
                    return rows.figure(row_id, SECTION, name, files / took, "files/s",
                                       better="higher", ref=ref, seconds=took)
                return rows.throughput(row_id, SECTION, name, size, took, ref=ref)
            out.append(rows.guarded(row_id, SECTION, name, measure))

        def clear_inside() -> None:
            (inside / "big.bin").unlink(missing_ok=True)
            shutil.rmtree(inside / "tree", ignore_errors=True)

        add("cp.up.file.crune", f"rune cp, {label} file, upload into the container",
            [*cp, str(big), f"{instance}:/tmp/"], ctx.env, inside / "big.bin", None,
            clear_inside)
        add("cp.up.file.dockercp", f"{DOCKER_CP}, {label} file, upload (vs rune cp into it)",
            ["docker", "cp", str(big), f"{box.name}:/tmp/big.bin"], None, inside / "big.bin",
            "cp.up.file.crune", clear_inside)
        # rune cp fsyncs what it wrote before it renames; docker cp leaves it in the page
        # cache. The same copy followed by `sync` is the like-for-like durable one.
        add("cp.up.file.dockercp_sync", f"{DOCKER_CP}, then `sync`, {label} file, upload "
            "(durable, as rune cp is)",
            _then_sync("docker", "cp", str(big), f"{box.name}:/tmp/big.bin"), None,
            inside / "big.bin", "cp.up.file.crune", clear_inside)
        add("cp.down.file.crune", f"rune cp, {label} file, download into the container",
            [*cp, f"{instance}:/tmp/big.bin", f"{local}/"], ctx.env, local / "big.bin",
            None, lambda: _fresh(local))
        add("cp.down.file.dockercp", f"{DOCKER_CP}, {label} file, download (vs rune cp from it)",
            ["docker", "cp", f"{box.name}:/tmp/big.bin", f"{local}/"], None,
            local / "big.bin", "cp.down.file.crune", lambda: _fresh(local))
        add("cp.down.file.dockercp_sync", f"{DOCKER_CP}, then `sync`, {label} file, download "
            "(durable, as rune cp is)",
            _then_sync("docker", "cp", f"{box.name}:/tmp/big.bin", f"{local}/"), None,
            local / "big.bin", "cp.down.file.crune", lambda: _fresh(local))
        shown = f"{files} small files"
        add("cp.up.tree.crune", f"rune cp -r, {shown}, upload into the container",
            [*cp, "-r", str(tree), f"{instance}:/tmp/"], ctx.env, inside / "tree", None,
            clear_inside)
        add("cp.up.tree.dockercp", f"{DOCKER_CP}, {shown}, upload (vs rune cp -r into it)",
            ["docker", "cp", str(tree), f"{box.name}:/tmp/"], None, inside / "tree",
            "cp.up.tree.crune", clear_inside)
        add("cp.down.tree.crune", f"rune cp -r, {shown}, download into the container",
            [*cp, "-r", f"{instance}:/tmp/tree", f"{local}/"], ctx.env, local / "tree",
            None, lambda: _fresh(local))
        add("cp.down.tree.dockercp", f"{DOCKER_CP}, {shown}, download (vs rune cp -r from it)",
            ["docker", "cp", f"{box.name}:/tmp/tree", f"{local}/"], None,
            local / "tree", "cp.down.tree.crune", lambda: _fresh(local))
        clear_inside()
    finally:
        client.close()
    return out


def _then_sync(*argv: str) -> list[str]:
    """ARGV, then `sync` once it succeeded: timed as one command."""
    return ["sh", "-c", '"$@" && sync', "sh", *argv]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/cp.py", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("process", "docker"), default="",
                        help="just the rows beside scp (process) or docker cp (docker)")
    args = parser.parse_args()
    from bench.harness import standalone

    sizes = Sizes.quick() if args.quick else Sizes()

    def section(ctx: BenchContext) -> list[dict]:
        ctx.extra.update({SIZE: QUICK_SIZE, FILES: QUICK_FILES} if args.quick else
                         {SIZE: args.size_mib << 20, FILES: args.files})
        ctx.extra[ONLY] = args.only
        return run(ctx)

    standalone(section, sizes)


if __name__ == "__main__":
    main()
