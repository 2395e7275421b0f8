"""`rune completion bash|zsh|fish`: the shell code that completes rune's commands and flags."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rune.cli.common import current

COMPLETE_VAR = "_RUNE_COMPLETE"


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completion_command(
    shell: Annotated[Shell, typer.Argument(metavar="SHELL", help="bash, zsh or fish",
                                           show_default=False)],
) -> None:
    """Print shell completion code: add `source <(rune completion bash)` to ~/.bashrc."""
    from typer._completion_shared import get_completion_script

    script = get_completion_script(prog_name="rune", complete_var=COMPLETE_VAR,
                                   shell=shell.value)
    current().out.write(script + "\n")


def complete_now() -> None:
    """Answers a completion request from the shell (typer's own completion classes)."""
    from typer._completion_classes import completion_init

    completion_init()
