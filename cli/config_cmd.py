"""`rune config`: named contexts (api server, token file, CA, namespace), kubectl-style."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rune.cli.common import PlainUsage, current, fail
from rune.cli.settings import CONNECTION_KEYS, Context, load_user_config, save_user_config

config_app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                         help="Named contexts: which apiserver, token and CA to use.")
ContextName = Annotated[str, typer.Argument(metavar="NAME", help="context name",
                                            show_default=False)]


def _load():  # noqa: ANN202
    inv = current()
    try:
        return inv, load_user_config(inv.env, inv.cwd)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None


@config_app.command("get-contexts", cls=PlainUsage)
def get_contexts() -> None:
    """List the contexts; the current one is marked with *."""
    inv, config = _load()
    rows = [("CURRENT", "NAME", "API SERVER", "TOKEN FILE", "CA FILE", "NAMESPACE")]
    for name, ctx in sorted(config.contexts.items()):
        rows.append(("*" if name == config.current_context else "", name,
                     *(getattr(ctx, k) or "" for k in CONNECTION_KEYS)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        inv.out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
                      .rstrip() + "\n")


@config_app.command("current-context", cls=PlainUsage)
def current_context() -> None:
    """Print the current context's name."""
    inv, config = _load()
    if not config.current_context:
        raise fail("no current context is set (rune config use-context NAME)", 1)
    inv.out.write(config.current_context + "\n")


@config_app.command("use-context", cls=PlainUsage)
def use_context(name: ContextName) -> None:
    """Make NAME the context commands use (flags and $RUNE_CONTEXT still win)."""
    inv, config = _load()
    if name not in config.contexts:
        known = ", ".join(sorted(config.contexts)) or "none"
        raise fail(f"no context {name!r} in the config (known: {known}); "
                   "add it with rune config set-context", 1)
    config.current_context = name
    save_user_config(config, inv.env, inv.cwd)
    inv.out.write(f'Switched to context "{name}".\n')


@config_app.command("set-context", cls=PlainUsage)
def set_context(
    name: ContextName,
    api_server: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--api-server", metavar="HOST:PORT", help="apiserver address")] = None,
    token_file: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--token-file", metavar="FILE", help="bearer token file")] = None,
    ca_file: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--ca-file", metavar="FILE", help="CA bundle for the apiserver's certificate")] = None,
    namespace: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--namespace", "-n", metavar="NS", help="default namespace")] = None,
) -> None:
    """Create context NAME, or change the settings given."""
    inv, config = _load()
    found = config.contexts.get(name) or Context()
    for key, value in (("api_server", api_server), ("token_file", token_file),
                       ("ca_file", ca_file), ("namespace", namespace)):
        if value is not None:
            setattr(found, key, value)
    config.contexts[name] = found
    path = save_user_config(config, inv.env, inv.cwd)
    inv.out.write(f'Context "{name}" set in {path}.\n')


@config_app.command("delete-context", cls=PlainUsage)
def delete_context(name: ContextName) -> None:
    """Remove context NAME (and unset it if it was the current one)."""
    inv, config = _load()
    if config.contexts.pop(name, None) is None:
        raise fail(f"no context {name!r} in the config", 1)
    if config.current_context == name:
        config.current_context = None
    save_user_config(config, inv.env, inv.cwd)
    inv.out.write(f'Deleted context "{name}".\n')
