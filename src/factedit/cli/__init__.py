"""The `factedit` command: the group, shared options and helpers; commands live in the modules
beside this one, grouped by what they do (trace, edit, evaluate, serve)."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import click

from ..errors import FacteditError


class CommandError(FacteditError):
    """A command failed for a reason the user can act on (e.g. an output path that cannot be written);
    shown as one line, like the other user errors."""


# Counts on the command line: a count of 0 or less is refused by click (exit code 2) before anything runs.
COUNT = click.IntRange(min=1)
INDEX = click.IntRange(min=0)  # a layer (its upper bound depends on the model) or a number of records to skip


@dataclass(frozen=True)
class ModelChoice:
    """What the model options of a command name: which model, where, in which precision."""

    name: str
    device: str
    dtype: str
    threads: int | None
    device_map: str | None

    def load(self):
        import torch

        from ..models import load

        if self.threads:
            torch.set_num_threads(self.threads)
        click.echo(f"loading {self.name} ...", err=True)
        lm = load(self.name, device=self.device, dtype=self.dtype, device_map=self.device_map)
        placed = f", split over {', '.join(str(d) for d in lm.devices)}" if len(lm.devices) > 1 else ""
        click.echo(f"{lm.name}: {lm.n_layers} layers, d_model {lm.arch.d_model}, d_mlp {lm.arch.d_mlp}, "
                   f"{self.dtype}{placed}, fingerprint {lm.fingerprint}", err=True)
        return lm


def _model_options(command):
    """--model, --device, --device-map, --dtype, --threads, handed to the command as one ModelChoice `model`."""

    @functools.wraps(command)
    def with_choice(*args, model, device, dtype, threads, device_map, **kwargs):
        return command(*args, model=ModelChoice(model, device, dtype, threads, device_map), **kwargs)

    options = [
        click.option("--model", "-m", default="smollm2-135m", show_default=True,
                     help="bundled name (smollm2-135m, gemma3-270m), model folder, .gguf file or hub id"),
        click.option("--threads", type=COUNT, default=None, help="torch CPU threads (default: torch's choice)"),
        click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda:0, mps"),
        click.option("--device-map", default=None,
                     help="split the model over devices with accelerate: auto, balanced, sequential "
                          "(replaces --device)"),
        click.option("--dtype", default="float32", show_default=True,
                     type=click.Choice(["float32", "bfloat16", "float16", "float64", "fp32", "bf16", "fp16"]),
                     help="precision of the forward passes; statistics, solves and optimised values stay float32 "
                          "or float64"),
    ]
    for option in reversed(options):
        with_choice = option(with_choice)
    return with_choice


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


def _load_edits(lm, paths, history=None):
    """Apply the batches saved in the `history` folder (if any), then the edit files `paths`."""
    from ..edit import EditDelta, EditHistory, EditStack

    if history is not None:
        replayed = EditHistory.load(lm, history)
        click.echo(f"replayed the history {history}: {len(replayed)} batch(es)", err=True)
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


def _cluster_options(command):
    """--cluster, --workers, --gpus-per-worker, handed to the command as `cluster`: a
    factedit.cluster.ClusterSpec, or None without --cluster (then nothing imports Ray)."""

    @functools.wraps(command)
    def with_cluster(*args, cluster, workers, gpus_per_worker, **kwargs):
        if cluster is None:
            if workers is not None or gpus_per_worker:
                raise CommandError("--workers and --gpus-per-worker need --cluster (auto or HOST:PORT)")
            return command(*args, cluster=None, **kwargs)
        from ..cluster import ClusterSpec

        return command(*args, cluster=ClusterSpec(cluster, workers, gpus_per_worker), **kwargs)

    options = [
        click.option("--cluster", default=None, metavar="auto|HOST:PORT",
                     help="spread the work over Ray workers (pip install 'factedit[cluster]'): auto joins the "
                          "cluster `ray start` runs here, else starts a local one; HOST:PORT joins that head node"),
        click.option("--workers", type=COUNT, default=None,
                     help="Ray workers, each loading the model once (default: as many as the cluster's CPUs, or "
                          "GPUs, hold)"),
        click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="GPUs Ray gives each worker; workers then load the model on cuda unless --device says "
                          "otherwise"),
    ]
    for option in reversed(options):
        with_cluster = option(with_cluster)
    return with_cluster


def _cluster_run(cluster, model):
    """The command's cluster (factedit.cluster.ClusterRun) as a context, or a null one without
    --cluster: then Ray is never imported."""
    from contextlib import nullcontext

    if cluster is None:
        return nullcontext()
    from ..cluster import ClusterRun

    return ClusterRun(cluster, model)


def _register_commands() -> None:
    # Imported for their @main.command side effect; at the bottom to avoid an import cycle.
    from . import edit_commands, eval_commands, history_commands, serve_command, trace_commands  # noqa: F401


_register_commands()

