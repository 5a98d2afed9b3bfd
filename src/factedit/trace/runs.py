"""The clean and corrupted runs that every causal-tracing heatmap starts from.

Corruption (paper section 2): Gaussian noise added to the token embeddings of the subject, i.e. to
the output of the embedding module, which is what the first block receives (Gemma's sqrt(d) scale
is applied inside that module); or the subject's tokens replaced by another subject's (corrupt.py).
The same `samples` corruptions are used for every restoration, as in the paper's code, which is what
lets restorations reuse the corrupted run's activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import InputError
from ..hooks import Hook, Hooks
from ..kv_cache import forward
from ..models import LoadedModel, check_seed
from ..tokens import PromptError, TokenizedPrompt, prompt_token_limit, token_label, tokenize_prompt
from .corrupt import check_corruption, choose_replacements, corruption_hook
from .metric import Metric, check_metric, contrast_from_corrupted

KINDS = ("hidden", "mlp", "attn")


@dataclass
class TraceRun:
    """Everything recorded from one prompt's clean and corrupted runs."""

    lm: LoadedModel
    prompt: str
    subject: str
    tokenized: TokenizedPrompt
    answer_id: int
    answer: str
    p_clean: float  # the metric's value in the clean run (p(answer) unless metric says otherwise)
    p_corrupt: float  # its mean over the corrupted runs
    noise_std: float  # 0 for token replacement
    noise: torch.Tensor  # (samples, n_subject_tokens, d_model): noise added, or replacement embeddings
    seed: int
    clean: dict[tuple[str, int], torch.Tensor]  # (kind, layer) -> (T, d)
    corrupt: dict[tuple[str, int], torch.Tensor]  # (kind, layer) -> (samples, T, d)
    corrupt_cache: object | None  # the corrupted run's key/value cache, reused for prefixes
    block_returns_tuple: bool
    metric: Metric = None  # set by prepare
    corruption: str = "gaussian"
    replacements: list[str] = field(default_factory=list)  # the replacement subjects, one per sample

    @property
    def samples(self) -> int:
        return self.noise.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.tokenized.n_tokens

    def corruption_hook(self, *, offset: int = 0, rows_per_sample: int = 1) -> Hook:
        """The hook that corrupts the subject in a run of this prompt (or its suffix from `offset`)."""
        return corruption_hook(self.lm.arch.embed, self.noise, self.tokenized.subject_range,
                               replace=self.corruption == "replace", offset=offset, rows_per_sample=rows_per_sample)

    def metric_of(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric per row of last-position logits, rows sample-major (see Metric.values)."""
        return self.metric.values(logits.to(self.lm.device), self.samples)


def last_token_logits(lm: LoadedModel, input_ids: torch.Tensor, *, cache=None, use_cache: bool = False
                      ) -> tuple[torch.Tensor, object]:
    """Logits at the last position, at least float32 (computing logits only there when the model
    allows it), after `cache` if given; returns the cache too when `use_cache` (see kv_cache.forward)."""
    logits, cache = forward(lm.model, input_ids, cache=cache, use_cache=use_cache, last_only=True)
    last = logits[:, -1]
    return last.to(lm.device, torch.promote_types(last.dtype, torch.float32)), cache  # the unembedding may sit elsewhere


def last_token_probs(lm: LoadedModel, input_ids: torch.Tensor, *, cache=None, use_cache: bool = False
                     ) -> tuple[torch.Tensor, object]:
    """Softmax at the last position; see last_token_logits."""
    logits, cache = last_token_logits(lm, input_ids, cache=cache, use_cache=use_cache)
    return torch.softmax(logits, dim=-1), cache


def embedding_std(lm: LoadedModel, texts: list[str] | None = None, chunk: int = 8192) -> float:
    """Standard deviation of what the embedding module outputs, over the tokens of `texts`
    (the paper used the subjects of its known facts) or, when none are given, the whole vocabulary."""
    embed = lm.arch.embed
    with torch.no_grad():
        if texts:
            ids = [i for text in texts for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
            if not ids:
                raise PromptError("no tokens to measure the embedding standard deviation on")
            values = embed(torch.tensor(ids, device=lm.device)).float()
            return float(values.std())
        vocab = embed.weight.shape[0]
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, vocab, chunk):
            v = embed(torch.arange(start, min(vocab, start + chunk), device=lm.device)).double()
            total += float(v.sum())
            total_sq += float((v * v).sum())
            count += v.numel()
        mean = total / count
        return (total_sq / count - mean * mean) ** 0.5


def as_batch_seq(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, seq, d) view of a module output; some models (OPT) flatten tokens to (batch*seq, d)."""
    return tensor.view(batch, -1, tensor.shape[-1]) if tensor.dim() == 2 else tensor


def _recording_hooks(lm: LoadedModel) -> dict[tuple[str, int], Hook]:
    return {(kind, layer): Hook(lm.arch.module(kind, layer), keep_output=True)
            for kind in KINDS for layer in range(lm.n_layers)}


def prepare(lm: LoadedModel, prompt: str, subject: str, *, samples: int = 10, noise: float | None = None,
            noise_multiplier: float = 3.0, seed: int = 0, answer: str | None = None,
            max_tokens: int | None = None, corrupt: str = "gaussian",
            replacements: Sequence[tuple[str, str]] | None = None, metric: str = "prob",
            occurrence: int | None = None) -> TraceRun:
    """Run the clean and corrupted passes and record every block, MLP and attention output.

    noise: absolute standard deviation; by default `noise_multiplier` x the embedding std (vocabulary).
    answer: trace this continuation's first token instead of the clean top token.
    corrupt: "gaussian" (noise on the subject's embeddings) or "replace" (the subject's tokens
    swapped for those of up to `samples` subjects from `replacements`, (subject, answer) pairs such
    as the known facts; see corrupt.py).
    metric: "prob" (p(answer)) or "logit-diff" (see metric.py).
    occurrence: which occurrence of the subject in the prompt to corrupt, counted from 0 (default: the
    first whole-word one, with a SubjectWarning when that is a guess; see tokens.find_subject).
    """
    if samples < 1:
        raise InputError(f"samples must be at least 1, not {samples}")
    check_seed(seed)
    check_corruption(corrupt, noise)
    check_metric(metric)
    limit = prompt_token_limit(lm.model)
    tokenized = tokenize_prompt(lm.tokenizer, prompt, subject, occurrence=occurrence,
                                max_tokens=min(limit, max_tokens or limit), device=lm.device)
    ids = tokenized.input_ids
    clean_logits, clean = _clean_run(lm, ids)
    answer_id = _answer_id(lm, answer, clean_logits)
    if corrupt == "replace":
        chosen = _replacements(lm, prompt, subject, tokenized, answer_id, replacements, samples, seed)
        noise_std, values = 0.0, _replacement_embeddings(lm, chosen)
    else:
        chosen = []
        noise_std = float(noise) if noise is not None else noise_multiplier * embedding_std(lm)
        values = _gaussian_noise(lm, tokenized, samples, noise_std, seed)
    n_samples = values.shape[0]
    corrupt_logits, cache, corrupt_states, block_returns_tuple = _corrupted_run(
        lm, ids, values, tokenized.subject_range, replace=corrupt == "replace")
    measure = _metric(metric, answer_id, chosen, corrupt_logits)
    p_clean = float(measure.values(clean_logits.expand(n_samples, -1), n_samples).mean())
    p_corrupt = float(measure.values(corrupt_logits, n_samples).mean())
    return TraceRun(
        lm=lm, prompt=prompt, subject=subject, tokenized=tokenized, answer_id=answer_id,
        answer=token_label(lm.tokenizer, answer_id), p_clean=p_clean, p_corrupt=p_corrupt,
        noise_std=noise_std, noise=values, seed=seed, clean=clean, corrupt=corrupt_states, corrupt_cache=cache,
        block_returns_tuple=block_returns_tuple, metric=measure, corruption=corrupt,
        replacements=[r.subject for r in chosen],
    )


def _clean_run(lm: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, dict[tuple[str, int], torch.Tensor]]:
    """The clean run's last-position logits and every recorded output ((kind, layer) -> (T, d))."""
    with torch.no_grad():
        hooks = _recording_hooks(lm)
        with Hooks(hooks):
            clean_logits, _ = last_token_logits(lm, ids, use_cache=False)
        return clean_logits, {key: as_batch_seq(h.output, 1)[0] for key, h in hooks.items()}


def _answer_id(lm: LoadedModel, answer: str | None, clean_logits: torch.Tensor) -> int:
    """The token traced: the first of `answer`, or the clean run's top token."""
    if answer is None:
        return int(clean_logits[0].argmax())
    answer_ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise PromptError("the answer is empty")
    return answer_ids[0]


def _replacements(lm: LoadedModel, prompt: str, subject: str, tokenized: TokenizedPrompt, answer_id: int,
                  pool: Sequence[tuple[str, str]] | None, samples: int, seed: int) -> list:
    """Up to `samples` subjects of `pool` that can take the subject's place (corrupt.choose_replacements)."""
    if not pool:
        raise InputError("--corrupt replace needs a pool of other subjects (the known facts) to draw from")
    return choose_replacements(lm.tokenizer, prompt, subject, tokenized, answer_id, pool, samples, seed)


def _replacement_embeddings(lm: LoadedModel, chosen: list) -> torch.Tensor:
    """(samples, n_subject_tokens, d_model): the replacement subjects' token embeddings."""
    with torch.no_grad():
        values = lm.arch.embed(torch.tensor([r.token_ids for r in chosen], device=lm.device))
    return values.to(lm.device)


def _gaussian_noise(lm: LoadedModel, tokenized: TokenizedPrompt, samples: int, noise_std: float,
                    seed: int) -> torch.Tensor:
    """(samples, n_subject_tokens, d_model): the noise added to the subject's embeddings, drawn on the
    CPU from `seed` (the same on every device)."""
    if not noise_std >= 0:
        raise InputError(f"the noise standard deviation must be 0 or more, not {noise_std}")
    start, end = tokenized.subject_range
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(samples, end - start, lm.arch.d_model, generator=generator) * noise_std).to(lm.device)


def _corrupted_run(lm: LoadedModel, ids: torch.Tensor, values: torch.Tensor, subject_range: tuple[int, int], *,
                   replace: bool) -> tuple[torch.Tensor, object, dict[tuple[str, int], torch.Tensor], bool]:
    """The corrupted runs, one batch row per sample: their last-position logits, key/value cache and
    recorded outputs ((kind, layer) -> (samples, T, d)), and whether the blocks return tuples."""
    n_samples = values.shape[0]
    with torch.no_grad():
        hooks = _recording_hooks(lm)
        raw_outputs = []  # only to learn whether blocks return tuples
        hook = corruption_hook(lm.arch.embed, values, subject_range, replace=replace)
        with Hooks(hooks), hook:
            handle = lm.arch.blocks[0].block.register_forward_hook(lambda m, a, out: raw_outputs.append(out))
            try:
                corrupt_logits, cache = last_token_logits(lm, ids.expand(n_samples, -1), use_cache=True)
            finally:
                handle.remove()
        states = {key: as_batch_seq(h.output, n_samples) for key, h in hooks.items()}
    return corrupt_logits, cache, states, isinstance(raw_outputs[0], tuple)


def _metric(metric: str, answer_id: int, chosen: list, corrupt_logits: torch.Tensor) -> Metric:
    """The trace's metric: p(answer), or the logit difference to the replacements' answers (or, with
    noise, to the corrupted run's top other token)."""
    if metric == "prob":
        return Metric("prob", answer_id)
    if chosen:
        return Metric("logit-diff", answer_id, tuple(r.answer_id for r in chosen))
    return Metric("logit-diff", answer_id, contrast_from_corrupted(corrupt_logits, answer_id))
