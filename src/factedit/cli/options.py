"""What the commands share for reading their command line: the option sets (model, key statistics,
cluster), the checked counts, the help texts, choosing an editing method's settings before the model
loads, and applying saved edits. The command modules import from here and never from one another."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import click

from ..errors import FacteditError
from ..models import SEED_MAX


class CommandError(FacteditError):
    """A command failed for a reason the user can act on (e.g. an output path that cannot be written);
    shown as one line, like the other user errors."""


# Counts on the command line: a count of 0 or less is refused by click (exit code 2) before anything runs.
COUNT = click.IntRange(min=1)
INDEX = click.IntRange(min=0)  # a layer (its upper bound depends on the model) or a number of records to skip
SEED = click.IntRange(0, SEED_MAX)  # what torch, numpy and random all take (models.check_seed)

OCCURRENCE_HELP = ("which occurrence of the subject in the prompt is the subject, counted from 0 (default: the first "
                   "that is a whole word, with a warning when the subject occurs more than once or only inside a word)")


@dataclass(frozen=True)
class ModelChoice:
    """What the model options of a command name: which model, where, in which precision."""

    name: str
    device: str
    dtype: str
    threads: int | None
    device_map: str | None

    def check(self) -> "ModelChoice":
        """Refuse a device this machine lacks, or cannot compute in the dtype on, before anything runs."""
        from ..models import check_device, resolve_dtype

        check_device(self.device, resolve_dtype(self.dtype))
        return self

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


def model_options(command):
    """--model, --device, --device-map, --dtype, --threads, handed to the command as one ModelChoice `model`."""

    @functools.wraps(command)
    def with_choice(*args, model, device, dtype, threads, device_map, **kwargs):
        return command(*args, model=ModelChoice(model, device, dtype, threads, device_map).check(), **kwargs)

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


def load_edits(lm, paths, history=None):
    """Apply the batches saved in the `history` folder (if any), then the edit files `paths`."""
    from ..edit import EditDelta, EditHistory, EditStack

    if history is not None:
        replayed = EditHistory.load(lm, history)
        click.echo(f"replayed the history {history}: {len(replayed)} batch(es)", err=True)
    stack = EditStack(lm)
    for path in paths:
        delta = EditDelta.load(path)
        stack.apply(delta, probe=True)  # a file from elsewhere: refused if the model breaks under it
        click.echo(f"applied {path}: {delta.method}, {len(delta.requests)} request(s)", err=True)
    return stack


def stats_options(command):
    """--corpus and --tokens: where the key statistics come from, handed over as `corpus`, `stats_tokens`."""
    command = click.option("--tokens", "stats_tokens", type=COUNT, default=100_000, show_default=True,
                           help="corpus tokens for the key statistics")(command)
    command = click.option("--corpus", default=None,
                           help="text/.jsonl file or folder for the key statistics, or 'wikitext' (online); "
                                "default $FACTEDIT_STATS_CORPUS, else text sampled from the model")(command)
    return command


SETTINGS_HELP = ("named settings ('default', or 'paper': the reference implementation's protocol, e.g. ROME's "
                 "20 value steps) or a settings JSON file (as written next to results; checked before the model "
                 "loads; --corpus, --tokens and --seed given with it replace its fields)")

# The command-line options that set a settings field: (click parameter, settings field).
_OPTION_FIELDS = (("corpus", "stats_corpus"), ("stats_tokens", "stats_tokens"), ("seed", "prefix_seed"))


@dataclass(frozen=True)
class ChosenSettings:
    """What --settings chose, checked as far as it can be without the model: a preset name with the
    options (`from_file` None), or the contents of a settings file."""

    spec: object  # the method (factedit.edit.registry.Method)
    preset: str
    layer: int | None
    options: dict
    from_file: object | None = None
    path: str | None = None

    def for_model(self, lm):
        """The settings on the loaded model: the preset's per-model defaults, or the file's settings
        with their layers checked against the model."""
        if self.from_file is None:
            return self.spec.settings_with(lm, self.layer, preset=self.preset, **self.options)
        self.spec.check_settings(lm, self.from_file, source=self.path)
        return self.from_file


def choose_settings(spec, name_or_file: str | None, layer: int | None, **options) -> ChosenSettings:
    """The method's settings as far as they can be chosen before the model loads: a named preset, or a
    JSON file, read and checked now (types, ranges, choices) so that a bad file costs no model load.
    `options` (settings field: value) come from the command line; with a file, those given
    explicitly replace the file's fields (said on stderr), --layer is refused."""
    import dataclasses
    from pathlib import Path

    from click.core import ParameterSource

    from ..settings import SettingsError, check_values

    if name_or_file is None or name_or_file in spec.preset_names():
        check_values(spec.settings_type, options)  # e.g. a negative --seed, before the model loads
        return ChosenSettings(spec, name_or_file or "default", layer, options)
    if not Path(name_or_file).is_file():
        raise SettingsError(f"--settings {name_or_file!r} is neither a settings file nor a name for method "
                            f"{spec.name} ({', '.join(spec.preset_names())})")
    if layer is not None:  # the file's layer would silently win
        raise SettingsError(f"--layer {layer} and the settings file {name_or_file} both choose the layer; "
                            "give one of them (the file's layer field, or --layer with a preset)")
    settings = spec.read_settings(name_or_file)
    ctx = click.get_current_context(silent=True)
    names = {f.name for f in dataclasses.fields(settings)}
    given = {}
    for parameter, name in _OPTION_FIELDS:
        if ctx is None or name not in options or name not in names:  # as with presets: another method's option
            continue
        if ctx.get_parameter_source(parameter) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            flag = next(p.opts[0] for p in ctx.command.params if p.name == parameter)
            check_values(spec.settings_type, {name: options[name]}, source=flag)
            click.echo(f"note: {flag} {options[name]} replaces {name} {getattr(settings, name)!r} of the settings "
                       f"file {name_or_file}", err=True)
            given[name] = options[name]
    return ChosenSettings(spec, preset="", layer=None, options={}, from_file=dataclasses.replace(settings, **given),
                          path=name_or_file)


def cluster_options(command):
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


def cluster_run(cluster, model):
    """The command's cluster (factedit.cluster.ClusterRun) as a context, or a null one without
    --cluster: then Ray is never imported."""
    from contextlib import nullcontext

    if cluster is None:
        return nullcontext()
    from ..cluster import ClusterRun

    return ClusterRun(cluster, model)


def lifelong_inputs(held_out: str | None, corpus: str | None, known: str | None):
    """Held-out text (the last documents of --held-out, else of the statistics corpus) and the known
    facts (--known, else $FACTEDIT_DATA_DIR/known_1000.json where present) for sequential runs
    and guards (history edit --guard)."""
    import os

    from ..data.known import data_dir, load_known_facts
    from ..stats import held_out_corpus

    source = held_out or corpus or os.environ.get("FACTEDIT_STATS_CORPUS")
    text = held_out_corpus(source) if source else None
    if known is None and data_dir() is not None and (data_dir() / "known_1000.json").exists():
        known = str(data_dir() / "known_1000.json")
    return text, load_known_facts(known) if known else None
