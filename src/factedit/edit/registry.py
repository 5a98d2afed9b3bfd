"""One registry of editing methods: the runner and the CLI look methods up here, never by name.

Every method turns requests into an EditDelta without modifying the model, and has a typed
settings dataclass with per-model defaults. The registry maps each name to its method module's
functions (settings, defaults, compute) and nothing else: what a method does lives in its module."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..models import LoadedModel
from ..progress import Phases
from ..settings import JsonSettings, SettingsError, check_settings_values
from ..tokens import check_prompt_length
from .delta import EditDelta
from . import alphaedit, encore, finetune, kn, memit, rome
from .alphaedit import AlphaEditSettings, alphaedit_delta
from .encore import EncoreSettings, encore_delta
from .finetune import FinetuneSettings, finetune_delta
from .kn import KnSettings, kn_delta
from .memit import MemitSettings, memit_delta
from ..request import EditRequest
from .rome import RomeSettings, rome_edit

DEFAULT_PRESET = "default"


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    settings_type: type
    defaults_for: Callable[..., object]  # the settings type's per-model defaults: (lm, layer=None, **overrides)
    # (lm, requests, settings, cache_dir=, progress=: Phases, history=: EditHistory or None)
    compute: Callable[..., tuple[EditDelta, list[dict]]]
    # Named settings beside the defaults, from the method's module (its PRESETS): preset name -> field
    # values applied on top of the per-model defaults. "paper" is the reference implementation's
    # protocol (e.g. ROME's 20 value steps for GPT-2 XL).
    presets: dict[str, dict] = field(default_factory=dict)
    # Settings fields whose value is this method's, where two methods share a settings type (rome and
    # rome-original: key_mode): set in its defaults, and checked by check_fields. (The values a field
    # may take at all are declared with the field: settings.one_of, bounded.)
    fixed: dict[str, object] = field(default_factory=dict)
    # What to tell a person about an edit beyond its effect (key statistics used, how an optimisation
    # ended, the null space kept): (delta, diagnostics, settings) -> lines; from the method's module.
    report_lines: Callable[[EditDelta, list[dict], object], list[str]] = lambda delta, diagnostics, settings: []

    def edited_layers(self, settings) -> list[int] | None:
        """The layers the settings (a settings object, or the dict an edit file saves) edit: a
        single-layer method's `layer`, a multi-layer one's `layers`; None: every layer (KN without
        a layer chosen)."""
        import dataclasses

        values = settings if isinstance(settings, dict) else dataclasses.asdict(settings)
        if values.get("layer") is not None:
            return [values["layer"]]
        return values.get("layers")

    def where(self, settings) -> str:
        """The edited layers in words, with the rule that chose them where the settings record one:
        "layers [3, 4, 5] (...)", "every layer"."""
        layers = self.edited_layers(settings)
        rule = settings.get("layer_rule") if isinstance(settings, dict) else getattr(settings, "layer_rule", "")
        named = "every layer" if layers is None else f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers}"
        return named + (f" ({rule})" if rule else "")

    def defaults(self, lm: LoadedModel, layer: int | None = None, **overrides):
        """Per-model defaults (the settings type's defaults_for) with this method's fixed fields."""
        return self.defaults_for(lm, layer, **self.fixed, **overrides)

    def settings_with(self, lm: LoadedModel, layer: int | None = None, preset: str = DEFAULT_PRESET, **options):
        """Per-model defaults (or the named `preset`) with those `options` that this method's settings
        have (e.g. a statistics corpus, which fine-tuning does not use). An option that no method's
        settings have is a misspelling and is refused, not dropped."""
        import dataclasses

        known = {f.name for method in METHODS.values() for f in dataclasses.fields(method.settings_type)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SettingsError(f"no editing method has the setting(s) {', '.join(unknown)}")
        if layer is not None:
            lm.check_layer(layer)
        names = {f.name for f in dataclasses.fields(self.settings_type)}
        if preset != DEFAULT_PRESET and preset not in self.presets:
            choices = ", ".join([DEFAULT_PRESET, *self.presets])
            raise SettingsError(f"method {self.name} has no settings named {preset!r}; choose from {choices} "
                                "or give a settings JSON file")
        overrides = {**self.presets.get(preset, {}), **{k: v for k, v in options.items() if k in names}}
        if "preset" in names:
            overrides["preset"] = preset
        return self.defaults(lm, layer, **overrides)

    def read_settings(self, path: str | Path):
        """Settings from a JSON file (as `save` writes them), with all checked that needs no model:
        types, ranges, choices (the CLI reads a settings file before it loads the model)."""
        settings = self.settings_type.load(path)
        self.check_fields(settings, source=path)
        return settings

    def load_settings(self, lm: LoadedModel, path: str | Path):
        """Settings from a JSON file (as `save` writes them), with types, ranges, layers and choices checked."""
        settings = self.read_settings(path)
        self.check_settings(lm, settings, source=path)
        return settings

    def check_fields(self, settings, source: str | Path | None = None) -> None:
        """A SettingsError if a field of `settings` is outside its declared range or choices, differs
        from this method's fixed value (e.g. rome's key_mode), or a list of layers is empty: all but
        the model's layer count."""
        where = f"{source}: " if source is not None else ""
        check_settings_values(settings, source)  # again: a field may have changed since the settings were made
        if getattr(settings, "layers", None) is not None and not settings.layers:
            raise SettingsError(f"{where}layers is empty; give at least one layer (or null where allowed)")
        for name, value in self.fixed.items():
            if getattr(settings, name) != value:
                raise SettingsError(f"{where}{name} must be {value!r} for method {self.name}, "
                                    f"not {getattr(settings, name)!r}")

    def check_settings(self, lm: LoadedModel, settings, source: str | Path | None = None) -> None:
        """A SettingsError if `settings` do not fit this method on `lm`: check_fields, and a layer the
        model lacks."""
        where = f"{source}: " if source is not None else ""
        self.check_fields(settings, source)
        layers = ([settings.layer] if hasattr(settings, "layer") else []) + (getattr(settings, "layers", None) or [])
        for layer in layers:
            if not 0 <= layer < lm.n_layers:
                raise SettingsError(f"{where}layer {layer} out of range: the model has {lm.n_layers} layers "
                                    f"(0..{lm.n_layers - 1})")

    def preset_names(self) -> list[str]:
        return [DEFAULT_PRESET, *self.presets]


@dataclass
class NoSettings(JsonSettings):
    """The unedited model has nothing to set: its settings file is an empty JSON object."""


def _none_compute(lm, requests, settings, cache_dir=None, progress=None, history=None):
    return EditDelta("none", lm.fingerprint, {}, {}, [r.to_dict() for r in requests]), [{} for _ in requests]


METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    METHODS[method.name] = method


register(Method("none", "the unedited model (baseline)", NoSettings, lambda lm, layer=None, **kw: NoSettings(),
                _none_compute))
register(Method("rome", "ROME with consistent keys (the averaged key in every step)", RomeSettings,
                RomeSettings.defaults_for, rome_edit, presets=rome.PRESETS, fixed={"key_mode": "consistent"},
                report_lines=rome.report_lines))
register(Method("rome-original", "ROME as in the reference code (plain-prompt key in the solve)", RomeSettings,
                RomeSettings.defaults_for, rome_edit, presets=rome.PRESETS, fixed={"key_mode": "original"},
                report_lines=rome.report_lines))
register(Method("ft", "fine-tune one MLP output matrix", FinetuneSettings,
                partial(FinetuneSettings.defaults_for, constrained=False), partial(finetune_delta, method="ft"),
                presets=finetune.FT_PRESETS, report_lines=finetune.report_lines))
register(Method("ft-l", "fine-tune one MLP output matrix under an L-infinity constraint (FT+L), relative to its scale",
                FinetuneSettings, partial(FinetuneSettings.defaults_for, constrained=True),
                partial(finetune_delta, method="ft-l"), presets=finetune.FT_L_PRESETS,
                report_lines=finetune.report_lines))

register(Method("memit", "MEMIT: all requests at once, spread over a range of layers", MemitSettings,
                MemitSettings.defaults_for, memit_delta, presets=memit.PRESETS, report_lines=memit.report_lines))
register(Method("alphaedit", "AlphaEdit: MEMIT projected onto the null space of the preserved keys and earlier edits",
                AlphaEditSettings, AlphaEditSettings.defaults_for, alphaedit_delta, presets=alphaedit.PRESETS,
                report_lines=alphaedit.report_lines))

register(Method("encore", "ENCORE: MEMIT keeping the earlier edits' keys, with a norm ridge and early-stopped targets",
                EncoreSettings, EncoreSettings.defaults_for, encore_delta, presets=encore.PRESETS,
                report_lines=encore.report_lines))

register(Method("kn", "knowledge neurons: integrated-gradients attribution, then rewrite their value vectors",
                KnSettings, KnSettings.defaults_for, kn_delta, presets=kn.PRESETS, report_lines=kn.report_lines))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def edit(lm: LoadedModel, requests: EditRequest | list[EditRequest], method: str = "rome", settings=None, *,
         cache_dir: Path | None = None, progress: Phases | None = None,
         history=None) -> tuple[EditDelta, list[dict]]:
    """Compute the edit for `requests` with `method` and return it with per-request diagnostics.
    `progress` hears of each phase that can take long, with its total, as it starts (factedit.progress).
    The model is left exactly as it was, also when something fails; apply the result with
    EditStack(lm).apply(delta). Prompts longer than the prompt limit (tokens.MAX_PROMPT_TOKENS) and
    settings that do not fit the method or the model are refused before any work. `history`: the
    EditHistory of the edits applied before, for methods that preserve them (alphaedit); to edit on
    top of earlier edits, use EditHistory.edit, which passes itself."""
    spec = get_method(method)
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not requests:
        raise InputError("no edit requests given")
    if settings is None:
        settings = spec.defaults(lm)
    elif not isinstance(settings, spec.settings_type):
        raise ValueError(f"method {method} takes {spec.settings_type.__name__}, not {type(settings).__name__}")
    spec.check_settings(lm, settings)
    for i, request in enumerate(requests):
        check_prompt_length(lm, request.text, "the prompt" if len(requests) == 1 else f"the prompt of request {i}")
    return spec.compute(lm, requests, settings, cache_dir=cache_dir, progress=progress, history=history)
