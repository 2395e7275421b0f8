"""The `rune` program: hands the command to the multiplexer when one can serve it.

Standard library only until it is known that the command runs here: a warm
`rune exec` pays for the interpreter and this module, not for grpc, asyncio or typer.
"""

from __future__ import annotations

import os
import sys

# Commands that talk to an apiserver: these gain from warm channels. Everything else
# (dev, config, completion, mux itself) runs in this process.
MUX_COMMANDS = frozenset({"exec", "instances", "audit", "sessions"})


def _config_says_off(environ: dict[str, str] | os._Environ) -> bool:
    """`mux: off` in the user's config (read as text: no YAML parser on the fast path)."""
    explicit = environ.get("RUNE_CONFIG")
    if explicit:
        path = os.path.expanduser(explicit)
    else:
        home = environ.get("HOME") or os.path.expanduser("~")
        base = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        path = os.path.join(base, "rune", "config.yaml")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return False
    for line in text.splitlines():  # a top-level `mux:` key (no re: it costs an import)
        key, sep, value = line.partition(":")
        if sep and key.rstrip() == "mux":
            word = value.split("#", 1)[0].strip().strip("'\"").lower()
            return word in ("off", "false", "no")
    return False


def use_mux(argv: list[str], environ: dict[str, str] | os._Environ) -> bool:
    if not argv or argv[0] not in MUX_COMMANDS:
        return False
    if environ.get("RUNE_MUX", "auto").lower() in ("off", "0", "false", "no"):
        return False
    if environ.get("_RUNE_COMPLETE"):
        return False
    return not _config_says_off(environ)


def main() -> None:
    argv = sys.argv[1:]
    if argv == ["--version"]:
        from rune.cli.version import VERSION

        sys.stdout.write(f"rune {VERSION}\n")
        sys.stdout.flush()
        os._exit(0)
    code = None
    if use_mux(argv, os.environ):
        from rune.cli.muxclient import run_through_mux

        code = run_through_mux(argv)
    if code is None:
        from rune.cli.dispatch import run_here

        code = run_here(argv)
    # Skips the interpreter's and gRPC's slow teardown: everything is written already.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
