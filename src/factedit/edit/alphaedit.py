"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of what to keep.

MEMIT's targets (targets.py) and its spreading over layers (mass_edit.spread_over_layers), with
another solve per layer: with K the batch's keys, R their residuals, P the projector onto the null
space of the preserved keys (directions the keys of ordinary text hardly use, from the cached
statistics C) and H = sum of K_p K_p^T over the keys of the earlier edits in the history,

    Delta W = R (A^-1 P K)^T,   A = P (K K^T + H) + l2 I.

Delta W k = 0 for any key with P k = 0, so text whose keys live outside the null space is left
alone, and the H term keeps the outputs at the earlier edits' keys. With P = U U^T (U: an orthonormal
basis of the null space), A^-1 P K = U (U^T (K K^T + H) U + l2 I)^-1 U^T K exactly, which is how it is
computed: a solve of the null space's size, and no round-off of P leaking into the directions the
update must not touch (l2 / the null space's energy would amplify it). Each batch carries its keys
(EditDelta.keys, read after the update, as the reference does), so H belongs to the editing history
(history.py): it survives a restart and leaves with a reverted batch. Facts that no edit wrote can
be preserved the same way: `protection` makes a batch that carries their keys and changes nothing.

Where the reference uses absolute numbers that depend on the scale of a model's keys (eigenvalues
of C below 2e-2, l2 = 10), the defaults here are relative (see AlphaEditSettings); "paper" keeps the
reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache_files import read_cached, write_atomic
from ..errors import InputError
from ..hooks import Hook, Hooks
from ..models import LoadedModel, cache_root
from ..progress import Phases
from ..request import EditRequest
from ..tokens import check_prompt_length
from ..settings import bounded, one_of
from ..stats import key_statistics_at
from .delta import EditDelta
from .mass_edit import MassEditSettings, earlier_edits, spread_over_layers
from .prompts import prompt_batch, request_texts
from .value import optimisation_lines

NULL_SPACE_RULES = ("trace_share", "absolute")
L2_RULES = ("key_energy", "absolute")


@dataclass(kw_only=True)
class AlphaEditSettings(MassEditSettings):
    # "trace_share": keep the eigenvectors of C with the smallest eigenvalues, as many as hold at most
    # null_space_threshold of C's trace: a key of the statistics' text then has, on average, that share
    # of its energy where the update acts. "absolute": eigenvalues below null_space_threshold (the
    # reference's 2e-2, which keeps 70% of SmolLM2's directions and 20-75% of Gemma 3's).
    null_space_rule: str = one_of("trace_share", NULL_SPACE_RULES)
    null_space_threshold: float = bounded(0.1, above=0)  # one batch of 100 SmolLM2 edits: 0.05 writes ES 81, 0.1 ES 91 (docs/results.md#null-space-rule)
    # "key_energy": l2 x the mean energy of a key of the statistics (trace of C), so that the penalty on
    # the update's size means the same on every model; "absolute": l2 as it is (reference: 10, which
    # is 0.33 x the key energy at SmolLM2's layer 5).
    l2_rule: str = one_of("key_energy", L2_RULES)
    l2: float = bounded(0.3, above=0)  # the reduced system is singular without it (alphaedit_delta)
    # Weight of H (the preserved keys of earlier edits and protected facts) in the solve; the reference
    # weighs it 1, like the batch's own keys. How much H protects depends on its size beside l2: a
    # preserved key with energy e in the null space keeps about l2 / (l2 + w e) of the change it would
    # get otherwise (docs/results.md#protected-facts).
    preserve_weight: float = bounded(1.0, at_least=0)

    @classmethod
    def defaults_for(cls, lm: LoadedModel, layer: int | None = None, **overrides) -> "AlphaEditSettings":
        layers, rule = cls.default_layers(lm, layer)
        return cls(**{"layers": layers, "layer_rule": rule if "layers" not in overrides else "given", **overrides})


# Named settings beside the per-model defaults (preset name -> field values; the registry's presets).
# "paper": the reference's (hparams/AlphaEdit/gpt2-xl.json; Llama3-8B and GPT-J use the same
# null-space threshold and l2).
PRESETS = {"paper": {"v_lr": 0.5, "v_steps": 20, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75, "kl_factor": 0.0625,
                     "early_stop_loss": 0.05, "early_stop_on": "total", "prefix_lengths": [[10, 5]],
                     "prefix_context": "", "null_space_rule": "absolute", "null_space_threshold": 2e-2,
                     "l2_rule": "absolute", "l2": 10.0}}


@dataclass
class Projector:
    """P = basis basis^T, kept as its basis."""

    basis: torch.Tensor  # (d_mlp, kept) float64 on the CPU: orthonormal eigenvectors of C
    null_energy: float  # mean energy of a statistics key inside the null space (sum of the kept eigenvalues)
    key_energy: float  # mean energy of a statistics key (trace of C)

    @property
    def kept(self) -> int:
        """The null space's dimension."""
        return self.basis.shape[1]

    @property
    def matrix(self) -> torch.Tensor:
        return self.basis @ self.basis.T

    def nbytes(self) -> int:
        return self.basis.numel() * self.basis.element_size()


def null_space_projector(C: torch.Tensor, rule: str, threshold: float) -> Projector:
    """The eigenvectors of C kept by `rule` (see AlphaEditSettings)."""
    if rule not in NULL_SPACE_RULES:
        raise InputError(f"null_space_rule must be one of {', '.join(NULL_SPACE_RULES)}, not {rule!r}")
    eigenvalues, vectors = torch.linalg.eigh(C.double())
    eigenvalues = eigenvalues.clamp(min=0)  # round-off makes the smallest slightly negative
    if rule == "trace_share":
        keep = torch.cumsum(eigenvalues, 0) <= threshold * eigenvalues.sum()
    else:
        keep = eigenvalues < threshold
    return Projector(vectors[:, keep].contiguous(), float(eigenvalues[keep].sum()), float(eigenvalues.sum()))


def projectors(lm: LoadedModel, settings: AlphaEditSettings, cache_dir=None, progress: Phases | None = None
               ) -> dict[int, Projector]:
    """The projector per layer from the cached key statistics, itself cached on disk beside them
    (keyed by the statistics file and the rule). Statistics from fewer keys than d_mlp, or a rule that
    keeps no direction, are errors that say what to change."""
    found = {}
    d_mlp = lm.arch.d_mlp
    for layer, (stats, path, _) in key_statistics_at(lm, settings, cache_dir, progress).items():
        if stats.count < d_mlp:
            raise InputError(f"the key statistics at layer {layer} come from {stats.count:,} keys, fewer than the "
                             f"{d_mlp:,} dimensions of a key: no null space can be estimated from them; collect at "
                             f"least {10 * d_mlp:,} tokens (--tokens / stats_tokens)")
        rule = f"{settings.null_space_rule}-{settings.null_space_threshold:g}"
        cached_at = cache_root(cache_dir) / "nullspace" / path.parent.name / f"{path.stem}_{rule}.pt"
        projector = read_cached(cached_at, lambda p: Projector(**torch.load(p, weights_only=True)))
        if projector is not None and not isinstance(projector.basis, torch.Tensor):  # from another version
            projector = None
        if projector is None:
            projector = null_space_projector(stats.matrix, settings.null_space_rule, settings.null_space_threshold)
            write_atomic(cached_at, lambda partial: torch.save(vars(projector), partial))
        if projector.kept == 0:
            raise InputError(f"the null space at layer {layer} is empty: rule {settings.null_space_rule} with "
                             f"threshold {settings.null_space_threshold:g} keeps no direction of the {d_mlp:,}; "
                             "raise null_space_threshold")
        found[layer] = projector
    return found


def alphaedit_solve(K: torch.Tensor, basis: torch.Tensor, H: torch.Tensor, l2: float) -> torch.Tensor:
    """down (n, d_mlp) with Delta W = R down: (A^-1 P K)^T, A = P (K K^T + H) + l2 I, P = basis basis^T,
    computed in the null space (module docstring), in float64."""
    K = K.double()
    U, H = basis.to(K.device, torch.float64), H.to(K.device, torch.float64)
    KU = U.T @ K  # (kept, n)
    reduced = KU @ KU.T + U.T @ H @ U + l2 * torch.eye(U.shape[1], dtype=torch.float64, device=K.device)
    return (U @ torch.linalg.solve(reduced, KU)).T


PROTECTED_TOKENS = ("subject", "prompt")


@torch.no_grad()
def protection(lm: LoadedModel, facts: list[EditRequest], settings: MassEditSettings, tokens: str = "subject"
               ) -> EditDelta:
    """An edit that changes nothing and carries the keys of `facts` (each fact's prompt and subject,
    with its answer as target_new) at the layers `settings` edit: applied to an EditHistory, it makes
    every later AlphaEdit batch leave these facts alone, as it leaves the earlier edits (H holds their
    keys, weighted by preserve_weight). The keys are the MLP inputs, on the model as it is now, at the
    subject's last token of each fact's own prompt (`tokens="subject"`, as AlphaEdit keeps an edit's
    key) or at every token of it ("prompt")."""
    if not facts:
        raise InputError("no facts to protect")
    if tokens not in PROTECTED_TOKENS:
        raise InputError(f"tokens must be one of {', '.join(PROTECTED_TOKENS)}, not {tokens!r}")
    layers = sorted(settings.layers)
    found: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for fact in facts:  # one forward per fact records every edited layer, stopping after the deepest
        if tokens == "subject":
            batch = prompt_batch(lm, request_texts(fact, ["{}"]))
            ids, positions = batch.input_ids, batch.subject_last
        else:
            ids = torch.tensor([check_prompt_length(lm, fact.text)], device=lm.device)
            positions = list(range(ids.shape[1]))
        hooks = {layer: Hook(lm.arch.module("mlp", layer), keep_input=True, stop=layer == layers[-1])
                 for layer in layers}
        with Hooks(hooks):
            lm.model(input_ids=ids, use_cache=False)
        for layer in layers:
            found[layer].append(hooks[layer].input.reshape(ids.shape[1], -1)[positions].float().cpu())
    keys = {lm.arch.mlp_out_path(layer): torch.cat(found[layer]).T for layer in layers}
    return EditDelta("protect", lm.fingerprint, {}, settings.to_dict(), [f.to_dict() for f in facts],
                     {"protected": len(facts), "tokens": tokens}, keys)


def alphaedit_delta(lm: LoadedModel, requests: list[EditRequest], settings: AlphaEditSettings, *, cache_dir=None,
                    progress: Phases | None = None, history=None) -> tuple[EditDelta, list[dict]]:
    """The AlphaEdit update for `requests` on the model as it is, preserving the keys of the batches in
    `history` (an EditHistory; None: nothing edited before). The model is not modified."""
    layers = sorted(settings.layers)
    earlier = earlier_edits(lm, history, layers, settings.preserve_weight)
    found = projectors(lm, settings, cache_dir, progress)

    def solve(layer: int, K: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        projector = found[layer]
        l2 = settings.l2 * projector.key_energy if settings.l2_rule == "key_energy" else settings.l2
        return alphaedit_solve(K, projector.basis, earlier.H[layer], l2)

    delta, diagnostics = spread_over_layers(lm, requests, settings, solve, "alphaedit", cache_dir=cache_dir,
                                            progress=progress, record_keys=True)
    delta.info.update({
        "unpreserved_batches": earlier.unpreserved_batches,
        "null_space_dims": {layer: found[layer].kept for layer in layers},
        "projector_bytes": sum(p.nbytes() for p in found.values()),
        "history_bytes": sum(h.numel() * h.element_size() for h in earlier.H.values()),
        "preserved_keys": earlier.preserved_keys})
    return delta, diagnostics


def report_lines(delta: EditDelta, diagnostics: list[dict], settings: AlphaEditSettings) -> list[str]:
    """What to tell a person about an AlphaEdit edit beyond its effect: the null space it kept, the
    earlier batches it could not preserve, how the target optimisations ended."""
    info, lines = delta.info, []
    if "null_space_dims" in info:
        lines.append(f"null space kept per layer: {info['null_space_dims']}; projectors "
                     f"{info['projector_bytes'] / 2**20:.1f} MiB and history H {info['history_bytes'] / 2**20:.1f} "
                     "MiB, on the CPU (moved to the device one layer at a time)")
    if info.get("unpreserved_batches"):
        lines.append(f"note: {info['unpreserved_batches']} earlier batch(es) of other methods changed these layers "
                     "without recording keys; AlphaEdit could not preserve what they wrote")
    return lines + optimisation_lines(diagnostics, settings)
