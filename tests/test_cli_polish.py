"""What users of kubectl and docker expect of a CLI: version, completion, help, contexts."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest
import typer.main
from conftest import ROOT, Rune
from rune.cli.devstack import free_port
from rune.cli.main import build_app
from rune.cli.version import VERSION
from typer.core import TyperGroup as Group
from typer.core import TyperOption as Option


def cli(*args: str, env: dict | None = None, cwd: object = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rune.cli.main", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


def test_version_matches_the_distribution():
    """`rune --version` prints the installed distribution's version."""
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"rune {importlib.metadata.version('rune-exec')}\n"
    assert VERSION == importlib.metadata.version("rune-exec")


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o default -F"),
                                           ("zsh", "compdef"), ("fish", "complete --command")])
def test_completion_scripts(shell, marker):
    """`rune completion SHELL` prints a script for that shell."""
    result = cli("completion", shell)
    assert result.returncode == 0 and marker in result.stdout
    assert "_RUNE_COMPLETE" in result.stdout


def test_completion_completes_commands_and_flags():
    """The script's request (as bash sends it) gets rune's commands and exec's flags."""
    commands = cli(env={"_RUNE_COMPLETE": "complete_bash", "COMP_WORDS": "rune ex",
                        "COMP_CWORD": "1"})
    assert "exec" in commands.stdout.split()
    flags = cli(env={"_RUNE_COMPLETE": "complete_bash", "COMP_WORDS": "rune exec --ti",
                     "COMP_CWORD": "2"})
    assert "--timeout" in flags.stdout.split()


def test_bad_shell_is_a_usage_error():
    result = cli("completion", "tcsh")
    assert result.returncode == 2 and "tcsh" in result.stderr


def _commands(group: Group, path: str = "rune") -> list[tuple[str, object]]:
    found = [(path, group)]
    for name, command in group.commands.items():
        if isinstance(command, Group):
            found += _commands(command, f"{path} {name}")
        else:
            found.append((f"{path} {name}", command))
    return found


def test_every_option_has_help():
    """No option of any command is left without a help text (`-n` had none)."""
    missing = [f"{path} {'/'.join(p.opts)}"
               for path, command in _commands(typer.main.get_command(build_app()))
               for p in command.params if isinstance(p, Option) and not (p.help or "").strip()]
    assert missing == []
    shouting = [opt for _, command in _commands(typer.main.get_command(build_app()))
                for p in command.params if isinstance(p, Option) for opt in p.opts
                if opt.startswith("--") and opt != opt.lower()]
    assert shouting == []


def test_exec_help_reads_like_docker():
    """Usage `TARGET COMMAND...`, `--prefix / --no-prefix`, every flag explained."""
    result = cli("exec", "--help")
    assert result.returncode == 0
    assert "Usage: rune exec [OPTIONS] TARGET COMMAND...\n" in result.stdout
    assert "{" not in result.stdout
    assert "--prefix / --no-prefix" in result.stdout and "--no-no-prefix" not in result.stdout
    assert "-n, --namespace NS" in result.stdout


def test_connection_failure_ends_with_a_hint(tmp_path):
    """Nothing listens: exit 255 and a hint to start a local apiserver."""
    result = cli("--no-mux", "exec", "--api-server", f"127.0.0.1:{free_port()}", "api", "true",
                 env={"RUNE_CONFIG": str(tmp_path / "none.yaml")})
    assert result.returncode == 255
    assert "is the apiserver running? `rune dev up` starts a local one" in result.stderr
    assert result.stderr.count("Error:") == 1


def test_contexts_choose_the_apiserver(stack, tmp_path):
    """set-context / use-context / get-contexts; --context and RUNE_CONTEXT choose too."""
    env = {"RUNE_CONFIG": str(tmp_path / "config.yaml")}
    dead = f"127.0.0.1:{free_port()}"
    assert cli("config", "set-context", "local", "--api-server", stack.api_address,
               env=env).returncode == 0
    assert cli("config", "set-context", "nowhere", "--api-server", dead, "-n", "prod",
               env=env).returncode == 0
    assert cli("config", "current-context", env=env).returncode == 1
    assert cli("config", "use-context", "local", env=env).stdout == \
        'Switched to context "local".\n'
    assert cli("config", "current-context", env=env).stdout == "local\n"
    listing = cli("config", "get-contexts", env=env).stdout.splitlines()
    assert listing[0].split()[:3] == ["CURRENT", "NAME", "API"]
    assert any(line.startswith("*") and "local" in line for line in listing)

    rune = Rune(stack, env=env)
    ran = rune.bare("exec", "api", "echo", "via-context")
    assert (ran.returncode, ran.stdout) == (0, b"via-context\n")
    other = rune.bare("exec", "--context", "nowhere", "api", "true")
    assert other.returncode == 255 and dead.encode() in other.stderr
    by_env = rune.bare("exec", "api", "true", env={"RUNE_CONTEXT": "nowhere"})
    assert by_env.returncode == 255 and dead.encode() in by_env.stderr
    unknown = rune.bare("exec", "--context", "prod", "api", "true")
    assert unknown.returncode == 255
    assert b"no context 'prod' in the config (known: local, nowhere)" in unknown.stderr
    assert cli("config", "use-context", "prod", env=env).returncode == 1
    assert cli("config", "delete-context", "local", env=env).returncode == 0
    assert cli("config", "current-context", env=env).returncode == 1


def test_a_broken_config_is_one_error_line(stack, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("- just\n- a list\n")
    result = Rune(stack, env={"RUNE_CONFIG": str(config)}).bare("exec", "api", "true")
    assert result.returncode == 255
    assert result.stderr.decode() == f"Error: {config}: expected a mapping\n"
