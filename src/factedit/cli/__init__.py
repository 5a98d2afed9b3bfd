"""The `factedit` command: the group `main` and how it shows users' errors and warnings. The commands
live in the modules beside this one, grouped by what they do (trace, edit, evaluate, history, serve),
and are registered here; what they share is in `options` (parsing, settings) and `progress_bars`.
Imports go one way: this module imports the command modules, they import only the shared ones."""

from __future__ import annotations

import contextlib
import sys
import warnings

import click

from ..errors import FacteditError, FacteditWarning
from . import edit_commands, eval_commands, history_commands, serve_command, trace_commands


@contextlib.contextmanager
def warnings_as_lines():
    """Show each FacteditWarning (a guessed subject occurrence, a skipped damaged log line, an ignored
    stray file) as one line on stderr, "warning: ...", as errors are shown, instead of Python's
    "file:line: ...Warning: ..." and the source line; other warnings as Python shows them."""
    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        python_shows = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, FacteditWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                python_shows(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always", FacteditWarning)  # every prompt's, not only the first per code line
        yield


class FriendlyGroup(click.Group):
    """Turns the errors users cause (bad model name, subject not in prompt, ...: every FacteditError)
    into one line and exit code 2, and factedit's warnings into one line each. Any other exception
    is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            with warnings_as_lines():
                return super().invoke(ctx)
        except FacteditError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=FriendlyGroup)
def main():
    """Locate and edit factual associations in transformer language models."""


# In the order of their names, as `factedit --help` lists them (it sorts them whatever the order here).
main.add_command(edit_commands.edit_command)
main.add_command(eval_commands.eval_command)
main.add_command(edit_commands.export)
main.add_command(edit_commands.generate)
main.add_command(history_commands.history)
main.add_command(edit_commands.methods)
main.add_command(eval_commands.sequential)
main.add_command(serve_command.serve)
main.add_command(edit_commands.stats)
main.add_command(edit_commands.suggest_layer)
main.add_command(eval_commands.summarize)
main.add_command(trace_commands.trace)
main.add_command(trace_commands.trace_avg)
main.add_command(trace_commands.trace_compare)
