"""MEMIT step 2's residuals, moved from the block's output to the MLP output projection's output.

MEMIT asks each layer's MLP to add r to the residual stream. In GPT-2 or Llama the MLP output
projection's output m is added to the stream as is, so m must change by r. Where something follows
the projection (Gemma's post-feed-forward RMSNorm) it must change by some other x with
f(m + x) = f(m) + r, f being the block's output as a function of m. Which case holds is measured,
not looked up: if f(m + r) - f(m) = r the residual is returned unchanged; otherwise x is found by
Levenberg-Marquardt (damped Gauss-Newton) on f's Jacobian. A norm's output has a fixed size, so r may be out of reach; x is
then the least-squares best, and `reached` reports the share of r achieved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as forward_ad

from ..hooks import Hook, Hooks
from ..models import LoadedModel
from ..request import EditRequest
from .prompts import prompt_batch, request_texts


@dataclass
class MlpChange:
    change: torch.Tensor  # (n, d): what to add to the MLP output projection's output
    passthrough: bool  # the block adds the projection's output to its output unchanged
    reached: torch.Tensor  # (n,): 1 - |f(m + x) - f(m) - r| / |r|


class BlockOfMlp:
    """f: the block's output at each prompt's subject token, given the MLP projection's output there.
    The model is causal, so a forward reads the prompts only up to the last subject token."""

    def __init__(self, lm: LoadedModel, layer: int, requests: list[EditRequest], template: str):
        self.lm, self.layer = lm, layer
        self.batch = prompt_batch(lm, [request_texts(r, [template])[0] for r in requests])
        self.positions = torch.tensor(self.batch.subject_last, device=lm.device)
        self.rows = torch.arange(len(requests), device=lm.device)

    def __call__(self, m: torch.Tensor | None = None, rows: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(m as it is, block output) for the prompts `rows` (default: all), with the projection's
        output at each one's subject replaced by the row of `m`."""
        rows = self.rows if rows is None else rows.to(self.lm.device)
        positions = self.positions[rows]
        input_ids = self.batch.input_ids[rows, :int(positions.max()) + 1]
        n, width = input_ids.shape
        index = torch.arange(n, device=self.lm.device)
        seen = {}

        def replace(output: torch.Tensor) -> torch.Tensor:
            view = output.reshape(n, width, -1)  # OPT flattens the batch
            at, where = index.to(view.device), positions.to(view.device)  # device maps
            seen["m"] = view[at, where].detach()
            if m is None:
                return output
            view = view.clone()
            view[at, where] = m.to(view.device, view.dtype)
            return view.reshape(output.shape)

        hooks = Hooks({"mlp": Hook(self.lm.arch.module("mlp", self.layer), edit_output=replace),
                       "block": Hook(self.lm.arch.module("hidden", self.layer), keep_output=True, detach=False,
                                     stop=True)})
        with hooks:
            self.lm.model(input_ids=input_ids, use_cache=False)
        out = hooks["block"].output.reshape(n, width, -1)
        out = out[index.to(out.device), positions.to(out.device)]
        return seen["m"].float().to(self.lm.device), out.float().to(self.lm.device)


def _jacobians(f: BlockOfMlp, m: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(m) and the per-row Jacobians (n, d_out, d_in) for the prompts `rows` (m: one row each).
    Rows never interact, so one batched backward pass per output coordinate serves several rows;
    rows are taken together by subject position, so that no row pays for another's longer prompt
    (the backward passes cost in proportion to the tokens read)."""
    ys, jacobians = [None] * len(rows), [None] * len(rows)
    positions = f.positions[rows]
    for position in positions.unique().tolist():
        group = (positions == position).nonzero().squeeze(1)
        leaf = m[group].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            _, y = f(leaf, rows[group])
            d_out = y.shape[1]
            basis = torch.eye(d_out, device=y.device).unsqueeze(1).expand(d_out, y.shape[0], d_out)
            (grads,) = torch.autograd.grad(y, leaf, grad_outputs=basis, is_grads_batched=True)
        for i, row in enumerate(group.tolist()):
            ys[row], jacobians[row] = y[i].detach(), grads[:, i]  # grads: (d_out, n, d_in)
    return torch.stack(ys), torch.stack(jacobians)


def mlp_change(lm: LoadedModel, layer: int, requests: list[EditRequest], residuals: torch.Tensor, template: str,
               *, iterations: int = 8, tolerance: float = 1e-3) -> MlpChange:
    """The changes x of the MLP projection's output (n, d) that move block `layer`'s output at each
    request's subject token (prompt filled into `template`) by `residuals` (n, d). Each row is
    solved on its own (a row stops once within `tolerance`), so rows may be batched in any way."""
    f = BlockOfMlp(lm, layer, requests, template)
    residuals = residuals.to(lm.device).float()
    with torch.no_grad():
        m0, y0 = f()
        _, y1 = f(m0 + residuals)
    r_norm = residuals.norm(dim=1).clamp(min=1e-12)
    if ((y1 - y0 - residuals).norm(dim=1) / r_norm).max() < tolerance:
        return MlpChange(residuals, True, torch.ones(len(requests)))
    target = y0 + residuals
    # Levenberg-Marquardt per row: a step that lowers the error is taken and the damping relaxed,
    # one that does not is refused and the damping raised.
    m, error = m0.clone(), residuals.clone()
    damping = floor = None
    for _ in range(iterations):
        active = ((error.norm(dim=1) / r_norm) >= tolerance).nonzero().squeeze(1)
        if len(active) == 0:
            break
        y, J = _jacobians(f, m[active], active)
        J = J.double()  # a norm's Jacobian is singular along its input: keep the damped system accurate
        JtJ = J.transpose(1, 2) @ J
        if damping is None:  # every row that is ever active is active in the first iteration
            scale = JtJ.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)
            damping = torch.zeros(len(requests), dtype=JtJ.dtype, device=JtJ.device)
            floor = torch.zeros_like(damping)
            damping[active], floor[active] = 1e-3 * scale, 1e-9 * scale
        eye = torch.eye(JtJ.shape[1], device=JtJ.device, dtype=JtJ.dtype)
        # The damped system is symmetric positive definite: Cholesky (batched LU in MKL 2.13 with two
        # threads failed on exactly these matrices, "Pivots given to lu_solve must all be >= 1").
        factor = torch.linalg.cholesky(JtJ + damping[active][:, None, None] * eye)
        step = torch.cholesky_solve(J.transpose(1, 2) @ (target[active] - y).double().unsqueeze(2),
                                    factor).squeeze(2).float()
        with torch.no_grad():
            _, y_new = f(m[active] + step, active)
        new_error = target[active] - y_new
        better = new_error.norm(dim=1) < error[active].norm(dim=1)
        taken = active[better]
        m[taken], error[taken] = m[taken] + step[better], new_error[better]
        damping[active] = torch.where(better, (damping[active] / 3).clamp(min=floor[active]), damping[active] * 4)
    return MlpChange((m - m0).detach(), False, (1 - error.norm(dim=1) / r_norm).cpu())


# A fixed, ordinary sentence for the probe below: only the structure of the block is being measured.
PROBE_REQUEST = EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Paris")


def block_response(lm: LoadedModel, layer: int, factors: list[float], *, directions: int = 8, seed: int = 0,
                   ) -> list[float]:
    """How much of a change of the MLP projection's output the block passes on, against its
    linearised response, for changes of size c x ||m|| (c in `factors`) orthogonal to the output m
    (mean over random directions). 1 at every size where the block adds m to its output as it is
    (GPT-2, Llama); falling with c where a norm follows the MLP (Gemma: the direction of m counts,
    not its size, so a change c x ||m|| turns the contribution by atan(c) and passes on
    2 sin(atan(c) / 2) / c of itself: 0.77 at c = 1, 0.31 at c = 4)."""
    f = BlockOfMlp(lm, layer, [PROBE_REQUEST] * directions, "{}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m, y = f()
        u = torch.randn(m.shape, generator=generator).to(m.device)
        u = u - (u * m).sum(1, keepdim=True) / (m * m).sum(1, keepdim=True) * m  # orthogonal to m
        u = u / u.norm(dim=1, keepdim=True) * m.norm(dim=1, keepdim=True)
        # The linearised response J u by forward-mode differentiation: a finite difference is lost
        # in half precision's rounding (bfloat16 keeps 3 significant digits of a block's output).
        with forward_ad.dual_level():
            linear = forward_ad.unpack_dual(f(forward_ad.make_dual(m, u))[1]).tangent.norm(dim=1)
        return [float(((f(m + c * u)[1] - y).norm(dim=1) / (c * linear)).mean()) for c in factors]


def response_clamp(lm: LoadedModel, layer: int, ceiling: float, keep: float = 0.75) -> float:
    """The largest norm clamp factor c <= `ceiling` at which the block still passes on `keep` of a
    change's linearised effect (block_response), to 0.05 by bisection. An edit beyond it saturates
    at the subject while a neighbour, which receives a small share of the change, stays in the
    linear range: the share of the edit reaching the neighbours grows by 1 / response."""
    if block_response(lm, layer, [ceiling])[0] >= keep:
        return ceiling
    low, high = 0.0, ceiling
    while high - low > 0.05:
        middle = (low + high) / 2
        low, high = (middle, high) if block_response(lm, layer, [middle])[0] >= keep else (low, middle)
    return round(low, 2)
