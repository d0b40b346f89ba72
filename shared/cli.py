"""The click plumbing of the `anomstream` commands.

Each command module defines a click command and keeps a `main(argv) -> int` (what `python -m` and
the tests call) that runs it through `run_command`; a `LazyGroup` names its sub-commands without
importing them, so `anomstream --help` imports none of the services.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click
from click.core import ParameterSource

# argparse's `type=Path`: any path, checked by the command itself.
PATH = click.Path(path_type=Path)
# Every command takes -h as well as --help, as with argparse.
CONTEXT = {"help_option_names": ["-h", "--help"]}


def run_command(command: click.Command, argv: list[str] | None, prog_name: str) -> int:
    """Run a click command on argv (None: sys.argv[1:]) and return its exit code instead of exiting:
    the callback's return value (None: 0), 0 after --help or --version, and for a bad command line
    the message on stderr with click's exit code (2 for a usage error), as in click's standalone mode."""
    try:
        rv = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return int(rv or 0)


def given_arguments(ctx: click.Context) -> list[str]:
    """The arguments and options given on the command line (not those left at their defaults), rebuilt
    from what click parsed: how an output was made, whichever way the command was started."""
    args: list[str] = []
    for param in ctx.command.get_params(ctx):
        if param.name is None or ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params.get(param.name)
        if isinstance(param, click.Option) and param.is_flag:
            args.append((param.opts if value else param.secondary_opts or param.opts)[0])
            continue
        values = list(value) if param.multiple or param.nargs != 1 else [value]
        for v in values:
            args += [param.opts[0], str(v)] if isinstance(param, click.Option) else [str(v)]
    return args


def verbatim(text: str) -> str:
    """Help text whose paragraphs click shows as written (argparse's RawDescriptionHelpFormatter)."""
    paragraphs = [p for p in text.strip().split("\n\n") if p.strip()]
    return "\n\n".join("\b\n" + p for p in paragraphs)


class LazyGroup(click.Group):
    """A group whose sub-commands are given as {name: ("module:attribute", one-line help)}: a module is
    imported only when its command runs or shows its help; the group's help lists the one-liners."""

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy_commands) + [n for n in super().list_commands(ctx) if n not in self.lazy_commands]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy_commands:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = self.lazy_commands[cmd_name][0].partition(":")
        return getattr(importlib.import_module(module), attribute or "command")

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, help_text) in self.lazy_commands.items()]
        rows += [(name, cmd.get_short_help_str()) for name, cmd in self.commands.items()
                 if name not in self.lazy_commands and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
