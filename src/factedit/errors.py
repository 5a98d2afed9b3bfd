"""The one base class of the errors a user causes and can fix.

Only a FacteditError is shown as a one-line message: the CLI prints "error: ..." and exits with
code 2, the server answers 400 (or a job reports the message). Every other exception is a bug and
keeps its traceback (CLI) or becomes a 500 (server), so that real bugs are never hidden behind a
tidy line. Raise a FacteditError subclass for bad user input: a prompt or subject (PromptError), a
dataset file (DatasetError), an edit file (EditFileError), a settings file (SettingsError), a model
that cannot be loaded (ModelLoadError) or mapped (ArchitectureError), or a bad argument
(InputError). The subclasses that were ValueErrors stay ValueErrors, for code that catches those.
"""

from __future__ import annotations


class FacteditError(Exception):
    """A problem with what the user gave (an argument, a file, a model); the message says what is
    wrong and, where it can, how to fix it."""


class InputError(FacteditError, ValueError):
    """A bad argument or option value: a layer out of range, an unknown method, dataset or preset, a
    count below its minimum, an output folder that holds another run."""


class FacteditWarning(UserWarning):
    """Something factedit guessed or skipped that the user should know about (a subject matched at a
    guessed occurrence, a damaged log line skipped, a stray file ignored); the CLI shows it as one
    line, "warning: ...", as it shows errors."""


def json_type(value) -> str:
    """How a JSON value's type is named in error messages: "a string", "a number", "null", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
