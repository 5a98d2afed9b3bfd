"""Restoration runs: which states a heatmap cell puts back, and two ways to compute them.

A cell (token t, layer l) of a heatmap is a list of patches: module outputs at token t overwritten
with their clean value (restoration) or their corrupted value (severing freezes a module).

`restored_probs` computes many cells at once and exactly, using two facts:
* patches at token t leave every earlier position as in the corrupted run, at every layer, so the
  corrupted run's key/value cache serves as the prefix and only tokens t.. are run;
* a block below the lowest restored layer sees only corrupted inputs, so its output is taken from
  the corrupted run instead of being computed.
`restored_probs_naive` is the obviously-correct reference: one full forward pass per cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError
from ..hooks import Hook, Hooks
from ..kv_cache import keep_rows, prefix
from .runs import TraceRun, as_batch_seq, last_token_logits

HEATMAP_KINDS = ("hidden", "mlp", "attn", "hidden_no_mlp", "hidden_no_attn")


@dataclass(frozen=True)
class Patch:
    kind: str  # "hidden" (block output), "mlp" or "attn"
    layer: int
    source: str  # "clean" (restore) or "corrupt" (freeze)


@dataclass(frozen=True)
class Cell:
    token: int
    layer: int
    patches: tuple[Patch, ...]

    @property
    def first_computed_block(self) -> int:
        """Lowest block whose computation differs from the corrupted run."""
        restored = [p for p in self.patches if p.source == "clean"]
        # A restored block output only changes what comes after it; a restored MLP/attention output
        # changes its own block's output.
        return min(p.layer + 1 if p.kind == "hidden" else p.layer for p in restored)


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The paper's window: `window` consecutive layers centred on `layer`, clipped to the model."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def heatmap_cells(kind: str, n_tokens: int, n_layers: int, window: int = 10) -> list[Cell]:
    if kind not in HEATMAP_KINDS:
        raise InputError(f"unknown trace kind {kind!r}; choose from {', '.join(HEATMAP_KINDS)}")
    if window < 1:
        raise InputError(f"window must be at least 1, not {window}")
    cells = []
    for t in range(n_tokens):
        for l in range(n_layers):
            if kind in ("mlp", "attn"):
                patches = tuple(Patch(kind, j, "clean") for j in window_layers(l, window, n_layers))
            else:
                patches = (Patch("hidden", l, "clean"),)
                if kind != "hidden":  # severing: later MLPs / attentions at this token stay corrupted
                    frozen = kind.removeprefix("hidden_no_")
                    patches += tuple(Patch(frozen, j, "corrupt") for j in range(l + 1, n_layers))
            cells.append(Cell(t, l, patches))
    return cells


def _patch_value(run: TraceRun, patch: Patch, token: int) -> torch.Tensor:
    """(samples, d) values to write for this patch at this token."""
    key = (patch.kind, patch.layer)
    if patch.source == "clean":
        return run.clean[key][token].expand(run.samples, -1)
    return run.corrupt[key][:, token]


def _select_rows(value, rows: torch.Tensor, batch: int):
    """Keep `rows` of every batch-shaped tensor in a block's arguments (hidden states, masks)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return value[rows.to(value.device)]
    if isinstance(value, (tuple, list)):
        return type(value)(_select_rows(v, rows, batch) for v in value)
    return value


def _partial_block(run: TraceRun, layer: int, offset: int, active: torch.Tensor, n_cells: int, cache):
    """A replacement forward for block `layer` that computes only the `active` batch rows; every
    other row has seen nothing but corrupted inputs so far, so its output is the corrupted run's."""
    block = run.lm.arch.blocks[layer].block
    original = block.forward
    corrupted = run.corrupt[("hidden", layer)][:, offset:].repeat_interleave(n_cells, dim=0)

    here = active.to(corrupted.device)  # the block may sit on another device than the inputs (device map)

    def forward(*args, **kwargs):
        out = corrupted.clone()  # fresh: patch hooks write into it
        if len(here):
            batch = out.shape[0]
            if cache is not None:  # this block's cache layer is read by this block only
                keep_rows(cache, layer, here)
            result = original(*_select_rows(args, here, batch),
                              **{key: _select_rows(value, here, batch) for key, value in kwargs.items()})
            out[here] = (result[0] if isinstance(result, tuple) else result).to(out.dtype)
        return (out,) if run.block_returns_tuple else out

    return forward


def _run_group(run: TraceRun, cells: list[Cell], token: int) -> torch.Tensor:
    """The metric for cells that all patch `token`, in one batch.

    Batch row n * V + v is noise sample n of cell v. At block j only the rows of cells whose first
    restored layer is at or below j are computed (`_partial_block`)."""
    n_cells, device = len(cells), run.lm.device
    batch = run.samples * n_cells
    first_block = torch.tensor([cell.first_computed_block for cell in cells], device=device)
    cell_of_row = torch.arange(batch, device=device) % n_cells
    cache = prefix(run.corrupt_cache, token, run.n_tokens, repeats=n_cells)  # None: run the whole prompt
    offset = token if cache is not None else 0  # absolute position of the first input token
    suffix = run.tokenized.input_ids[:, offset:].expand(batch, -1)

    hooks = [run.corruption_hook(offset=offset, rows_per_sample=n_cells)]
    active_rows = []
    for layer in range(run.lm.n_layers):
        active = (first_block[cell_of_row] <= layer).nonzero().squeeze(1)
        active_rows.append(active)
        if len(active) < batch:
            hooks.append(Hook(run.lm.arch.blocks[layer].block,
                              skip=_partial_block(run, layer, offset, active, n_cells, cache)))

    entries: dict[tuple[str, int], list] = {}
    for v, cell in enumerate(cells):
        rows = torch.arange(run.samples, device=device) * n_cells + v
        for patch in cell.patches:
            if patch.kind != "hidden":
                # MLP / attention run inside a block that may compute only its active rows.
                if first_block[v] > patch.layer:
                    continue  # not computed for this cell: its output is the corrupted one already
                rows_here = torch.searchsorted(active_rows[patch.layer], rows)
            else:
                rows_here = rows
            entries.setdefault((patch.kind, patch.layer), []).append((rows_here, _patch_value(run, patch, token)))
    for (kind, layer), items in entries.items():
        rows, values = torch.cat([r for r, _ in items]), torch.cat([v for _, v in items])

        def write(output, rows=rows, values=values):
            # rows may be a subset of the batch when the block is partial
            as_batch_seq(output, output.shape[0] // suffix.shape[1] if output.dim() == 2 else 0)[
                rows.to(output.device), token - offset] = values.to(output.device, output.dtype)
            return output

        hooks.append(Hook(run.lm.arch.module(kind, layer), edit_output=write))

    with Hooks(hooks):
        logits, _ = last_token_logits(run.lm, suffix, cache=cache, use_cache=True)
    return run.metric_of(logits).view(run.samples, n_cells).mean(0)


def restored_probs(run: TraceRun, cells: list[Cell], *, max_batch_tokens: int = 2048,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The metric (p(answer) by default) for each cell, averaged over the noise samples. Exact (same
    as the naive loop)."""
    result = torch.empty(len(cells))
    order = sorted(range(len(cells)), key=lambda i: (cells[i].token, cells[i].first_computed_block))
    start, subject_start = 0, run.tokenized.subject_range[0]
    with torch.no_grad():
        while start < len(order):
            token = cells[order[start]].token
            if token < subject_start:
                # Nothing before the subject was corrupted: restoring it changes nothing.
                end = start
                while end < len(order) and cells[order[end]].token == token:
                    end += 1
                result[order[start:end]] = run.p_corrupt
            else:
                per_cell = run.samples * (run.n_tokens - token)
                limit = max(1, max_batch_tokens // per_cell)
                end = start
                while end < len(order) and end - start < limit and cells[order[end]].token == token:
                    end += 1
                group = [cells[i] for i in order[start:end]]
                result[order[start:end]] = _run_group(run, group, token).float().cpu()
            if progress:
                progress(end - start)
            start = end
    return result


def restored_probs_naive(run: TraceRun, cells: list[Cell],
                         progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Reference: for each cell, one full forward pass of all noise samples with its patches."""
    result = torch.empty(len(cells))
    ids = run.tokenized.input_ids.expand(run.samples, -1)
    with torch.no_grad():
        for i, cell in enumerate(cells):
            hooks = [run.corruption_hook()]
            for patch in cell.patches:
                value = _patch_value(run, patch, cell.token)

                def write(output, value=value, token=cell.token):
                    output = output.clone()
                    as_batch_seq(output, run.samples)[:, token] = value.to(output.dtype)
                    return output

                hooks.append(Hook(run.lm.arch.module(patch.kind, patch.layer), edit_output=write))
            with Hooks(hooks):
                out = run.lm.model(input_ids=ids, use_cache=False)
            result[i] = run.metric_of(out.logits[:, -1]).mean()
            if progress:
                progress(1)
    return result

