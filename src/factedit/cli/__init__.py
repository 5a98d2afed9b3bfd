"""The `factedit` command: the group, shared options and helpers; commands live in the modules
beside this one, grouped by what they do (trace, edit, evaluate, serve)."""

from __future__ import annotations

import sys

import click

from ..errors import FacteditError


class CommandError(FacteditError):
    """A command failed for a reason the user can act on (e.g. an output path that cannot be written);
    shown as one line, like the other user errors."""


# Counts on the command line: a count of 0 or less is refused by click (exit code 2) before anything runs.
COUNT = click.IntRange(min=1)
INDEX = click.IntRange(min=0)  # a layer (its upper bound depends on the model) or a number of records to skip


def _model_options(command):
    command = click.option("--dtype", default="float32", show_default=True,
                           type=click.Choice(["float32", "bfloat16", "float16", "float64", "fp32", "bf16", "fp16"]),
                           help="float32, bfloat16 or float16")(command)
    command = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda:0, mps")(command)
    command = click.option("--threads", type=COUNT, default=None, help="torch CPU threads (default: torch's choice)")(command)
    command = click.option("--model", "-m", default="smollm2-135m", show_default=True,
                           help="bundled name (smollm2-135m, gemma3-270m), model folder, .gguf file or hub id")(command)
    return command


def _load(model: str, device: str, dtype: str, threads: int | None):
    import torch

    from ..models import load

    if threads:
        torch.set_num_threads(threads)
    click.echo(f"loading {model} ...", err=True)
    lm = load(model, device=device, dtype=dtype)
    click.echo(f"{lm.name}: {lm.n_layers} layers, d_model {lm.arch.d_model}, d_mlp {lm.arch.d_mlp}, "
               f"fingerprint {lm.fingerprint}", err=True)
    return lm


class FriendlyGroup(click.Group):
    """Turns the errors users cause (bad model name, subject not in prompt, ...: every FacteditError)
    into one line and exit code 2. Any other exception is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FacteditError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=FriendlyGroup)
def main():
    """Locate and edit factual associations in transformer language models."""


def _load_edits(lm, paths):
    from ..edit import EditDelta, EditStack

    stack = EditStack(lm)
    for path in paths:
        delta = EditDelta.load(path)
        stack.apply(delta)
        click.echo(f"applied {path}: {delta.method}, {len(delta.requests)} request(s)", err=True)
    return stack


def _stats_options(command):
    command = click.option("--tokens", "stats_tokens", type=COUNT, default=100_000, show_default=True,
                           help="corpus tokens for the key statistics")(command)
    command = click.option("--corpus", default=None,
                           help="text/.jsonl file or folder for the key statistics, or 'wikitext' (online); "
                                "default $FACTEDIT_STATS_CORPUS, else text sampled from the model")(command)
    return command


SETTINGS_HELP = ("named settings ('default', or 'paper': the reference implementation's protocol, e.g. ROME's "
                 "20 value steps) or a settings JSON file (as written next to results)")


def _settings(spec, lm, name_or_file: str | None, layer: int | None, **options):
    """The method's settings: per-model defaults, a named preset, or a JSON file (type-checked, its
    layers checked against the model)."""
    from pathlib import Path

    from ..settings import SettingsError

    if name_or_file is None or name_or_file in spec.preset_names():
        return spec.settings_with(lm, layer, preset=name_or_file or "default", **options)
    if not Path(name_or_file).is_file():
        raise SettingsError(f"--settings {name_or_file!r} is neither a settings file nor a name for method "
                            f"{spec.name} ({', '.join(spec.preset_names())})")
    if layer is not None:  # the file's layer would silently win
        raise SettingsError(f"--layer {layer} and the settings file {name_or_file} both choose the layer; "
                            "give one of them (the file's layer field, or --layer with a preset)")
    return spec.load_settings(lm, name_or_file)


def _register_commands() -> None:
    # Imported for their @main.command side effect; at the bottom to avoid an import cycle.
    from . import edit_commands, eval_commands, serve_command, trace_commands  # noqa: F401


_register_commands()

