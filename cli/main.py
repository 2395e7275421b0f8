"""`rune`: run commands inside running service instances, anywhere in the fleet.

This module only registers the commands; `rune.cli.entry` is the program's entry
point and `rune.cli.dispatch` runs a command, in this process or in the multiplexer.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing: `python -m rune.cli.main` is a fast path too

if TYPE_CHECKING:
    import typer

HELP = "Run commands inside running service instances, anywhere in the fleet."
CONTEXT = {"help_option_names": ["-h", "--help"]}


def build_app(full: bool = True) -> typer.Typer:
    """The command tree; `full=False` registers only `exec` (what most runs need)."""
    import typer
    from rune.cli.common import PlainUsage, root_options
    from rune.cli.exec_cmd import exec_command

    app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP,
                      rich_markup_mode=None, pretty_exceptions_enable=False,
                      context_settings=CONTEXT)

    app.callback()(root_options)
    app.command("exec", cls=PlainUsage,
                context_settings={**CONTEXT, "ignore_unknown_options": False})(
        exec_command)
    if not full:
        return app
    from rune.cli.audit_cmd import audit_command
    from rune.cli.completion_cmd import completion_command
    from rune.cli.config_cmd import config_app
    from rune.cli.cp_cmd import cp_command
    from rune.cli.dev import dev_app
    from rune.cli.instances_cmd import instances_command
    from rune.cli.mux_cmd import mux_app
    from rune.cli.sessions_cmd import kill_command, list_command, replay_command

    app.command("instances", cls=PlainUsage)(instances_command)
    app.command("audit", cls=PlainUsage)(audit_command)
    app.command("cp", cls=PlainUsage)(cp_command)
    sessions = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                           help="List, replay and kill sessions (verbs audit / admin).")
    sessions.command("list", cls=PlainUsage)(list_command)
    sessions.command("replay", cls=PlainUsage)(replay_command)
    sessions.command("kill", cls=PlainUsage)(kill_command)
    app.add_typer(sessions, name="sessions")
    app.add_typer(config_app, name="config")
    app.add_typer(mux_app, name="mux")
    app.add_typer(dev_app, name="dev")
    app.command("completion", cls=PlainUsage)(completion_command)
    return app


def main() -> None:
    from rune.cli.entry import main as entry_main

    entry_main()


if __name__ == "__main__":
    main()
