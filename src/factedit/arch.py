"""Find the parts of a decoder-only transformer by module structure, never by model name.

Every Hugging Face causal LM is a token embedding, a stack of identical blocks, a final norm and an
unembedding. Inside each block we need two linear maps:

* the MLP's output ("down") projection: its input is the MLP key k, its output the MLP's
  contribution to the residual stream (ROME's value v = W k);
* the attention's output projection: its output is the attention's contribution.

Both are found from weight shapes alone (see `_find_mlp_group`), so a new architecture works as long
as it is built from linear layers in the usual way. Restoring or freezing the output of these
projections is equivalent to restoring the whole MLP / attention output, because whatever follows
them inside the block (dropout in eval mode, Gemma's post-feed-forward norm) is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import FacteditError


class ArchitectureError(FacteditError, ValueError):
    """The model's structure does not look like a decoder-only transformer we can map."""


@dataclass(frozen=True)
class LinearDims:
    module: nn.Module
    name: str  # dotted path relative to the block
    d_in: int
    d_out: int


@dataclass
class BlockParts:
    """The modules of one transformer block that tracing and editing touch."""

    block: nn.Module
    mlp: nn.Module  # container of the MLP's linears (the block itself when they sit directly in it)
    mlp_out: nn.Module  # MLP output projection: input = key, output = MLP contribution
    mlp_out_name: str
    attn: nn.Module
    attn_out: nn.Module  # attention output projection
    attn_out_name: str
    d_mlp: int


@dataclass
class ArchMap:
    """Where everything lives in one model. Names are dotted paths from the model root."""

    embed: nn.Module
    embed_name: str
    blocks: list[BlockParts]
    blocks_name: str
    final_norm: nn.Module | None
    final_norm_name: str | None
    unembed: nn.Module
    unembed_name: str
    d_model: int

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_mlp(self) -> int:
        return self.blocks[0].d_mlp

    def module(self, kind: str, layer: int) -> nn.Module:
        """`kind` is one of "hidden" (the block), "mlp" (MLP output projection), "attn"."""
        parts = self.blocks[layer]
        try:
            return {"hidden": parts.block, "mlp": parts.mlp_out, "attn": parts.attn_out}[kind]
        except KeyError:
            raise ValueError(f"unknown module kind {kind!r}; expected hidden, mlp or attn") from None

    def mlp_out_path(self, layer: int) -> str:
        """The dotted name of the MLP output projection of block `layer` (the matrix editors change)."""
        return f"{self.blocks_name}.{layer}.{self.blocks[layer].mlp_out_name}"

    def describe(self) -> dict:
        b0 = self.blocks[0]
        return {
            "embed": self.embed_name,
            "blocks": f"{self.blocks_name}[0..{self.n_layers - 1}]",
            "mlp_out": f"{self.blocks_name}.N.{b0.mlp_out_name}",
            "attn_out": f"{self.blocks_name}.N.{b0.attn_out_name}",
            "final_norm": self.final_norm_name,
            "unembed": self.unembed_name,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "n_layers": self.n_layers,
        }


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear-like layer: nn.Linear, or GPT-2's transposed Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if isinstance(weight, torch.Tensor) and nx is not None and tuple(weight.shape) == (nx, nf):
        return nx, nf
    return None


def _is_norm(module: nn.Module, d_model: int) -> bool:
    """A norm layer: no children, and only 1-D parameters of size d_model (or none)."""
    if list(module.children()):
        return False
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.dim() == 1 and p.shape[0] == d_model for p in params)


def _find_blocks(model: nn.Module, n_layers_hint: int | None) -> tuple[str, nn.ModuleList]:
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            types = {type(m) for m in module}
            if len(types) == 1 and any(p.numel() for p in module.parameters()):
                candidates.append((name, module))
    if n_layers_hint:
        exact = [c for c in candidates if len(c[1]) == n_layers_hint]
        if exact:
            candidates = exact
    if not candidates:
        raise ArchitectureError("could not find the list of transformer blocks (no ModuleList of identical modules)")
    # The block stack holds the most parameters of all such lists.
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def _linears_by_parent(block: nn.Module) -> dict[str, list[LinearDims]]:
    groups: dict[str, list[LinearDims]] = {}
    for name, module in block.named_modules():
        dims = linear_dims(module)
        if dims is None:
            continue
        parent = name.rpartition(".")[0]
        groups.setdefault(parent, []).append(LinearDims(module, name, dims[0], dims[1]))
    return groups


def _find_mlp_group(groups: dict[str, list[LinearDims]], d_model: int) -> tuple[str, LinearDims, int]:
    """The MLP is the group of sibling linears shaped d -> m (once, or twice when gated, or once
    fused to 2m) and m -> d. Attention never fits: its input maps are q, k, v (three of them, or
    one fused map of another width, or widths that differ under grouped-query attention)."""
    found = []
    for parent, linears in groups.items():
        downs = [lin for lin in linears if lin.d_out == d_model and lin.d_in != d_model]
        ups = [lin for lin in linears if lin.d_in == d_model and lin not in downs]
        if len(downs) != 1 or len(linears) != len(ups) + 1 or not 1 <= len(ups) <= 2:
            continue
        m = downs[0].d_in
        widths = {lin.d_out for lin in ups}
        if widths == {m} or (len(ups) == 1 and widths == {2 * m}):
            found.append((parent, downs[0], m))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} candidate"
        raise ArchitectureError(
            f"could not find the MLP output projection: {what} groups of linear layers shaped "
            f"d_model -> d_mlp -> d_model (d_model={d_model})"
        )
    return found[0]


def _find_attn_out(groups: dict[str, list[LinearDims]], mlp_parent: str, d_model: int) -> tuple[str, LinearDims]:
    found = []
    for parent, linears in groups.items():
        outs = [lin for lin in linears if lin.d_out == d_model]
        ins = [lin for lin in linears if lin.d_in == d_model]
        if parent == mlp_parent:
            # The MLP's linears may sit directly in the block beside the attention's (OPT's fc1/fc2
            # do); only consider what is not the MLP there.
            continue
        if outs and ins:
            # q/k/v all map d_model -> something; the output projection is the one registered last.
            found.append((parent, outs[-1]))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} candidate"
        raise ArchitectureError(f"could not find the attention output projection: {what} attention-shaped groups")
    return found[0]


def _get(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted) if dotted else root


def map_architecture(model: nn.Module) -> ArchMap:
    """Locate embeddings, blocks, MLP/attention output projections, final norm and unembedding."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embed is None:
        raise ArchitectureError("could not find the token embedding (model.get_input_embeddings() is None)")
    if unembed is None:
        raise ArchitectureError("could not find the unembedding (model.get_output_embeddings() is None); "
                                "load the model with AutoModelForCausalLM")
    d_model = embed.weight.shape[1]
    names = {module: name for name, module in model.named_modules(remove_duplicate=False)}

    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_hint = getattr(text_config, "num_hidden_layers", None)
    blocks_name, block_list = _find_blocks(model, n_hint)

    blocks = []
    for i, block in enumerate(block_list):
        groups = _linears_by_parent(block)
        mlp_parent, mlp_out, d_mlp = _find_mlp_group(groups, d_model)
        attn_parent, attn_out = _find_attn_out(groups, mlp_parent, d_model)
        blocks.append(BlockParts(
            block=block, mlp=_get(block, mlp_parent), mlp_out=mlp_out.module, mlp_out_name=mlp_out.name,
            attn=_get(block, attn_parent), attn_out=attn_out.module, attn_out_name=attn_out.name, d_mlp=d_mlp,
        ))

    # The final norm is a norm layer beside the block list (a sibling in the same parent module).
    parent_name = blocks_name.rpartition(".")[0]
    parent = _get(model, parent_name)
    final_norm, final_norm_name = None, None
    for child_name, child in parent.named_children():
        if _is_norm(child, d_model):
            final_norm, final_norm_name = child, f"{parent_name}.{child_name}".lstrip(".")
    return ArchMap(
        embed=embed, embed_name=names.get(embed, "?"), blocks=blocks, blocks_name=blocks_name,
        final_norm=final_norm, final_norm_name=final_norm_name,
        unembed=unembed, unembed_name=names.get(unembed, "?"), d_model=d_model,
    )
