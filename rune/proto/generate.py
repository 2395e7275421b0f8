"""Regenerates the gRPC stubs next to exec.proto: `python -m rune.proto.generate`."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def generate(out_dir: Path = HERE) -> None:
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(HERE / "exec.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc mirrors the source tree (rune/proto/...); flatten it into out_dir.
    nested = out_dir / "rune" / "proto"
    for name in ("exec_pb2.py", "exec_pb2_grpc.py"):
        (nested / name).replace(out_dir / name)
    for d in (nested, out_dir / "rune"):
        d.rmdir()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
