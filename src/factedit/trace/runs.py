"""The clean and corrupted runs that every causal-tracing heatmap starts from.

Corruption (paper section 2): Gaussian noise added to the token embeddings of the subject, i.e. to
the output of the embedding module, which is what the first block receives (Gemma's sqrt(d) scale
is applied inside that module). The same `samples` noise draws are used for every restoration, as in
the paper's code, which is what lets restorations reuse the corrupted run's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..hooks import Hook, Hooks
from ..kv_cache import forward
from ..models import LoadedModel
from ..tokens import PromptError, TokenizedPrompt, prompt_token_limit, tokenize_prompt

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
    p_clean: float
    p_corrupt: float
    noise_std: float
    noise: torch.Tensor  # (samples, n_subject_tokens, d_model)
    seed: int
    clean: dict[tuple[str, int], torch.Tensor]  # (kind, layer) -> (T, d)
    corrupt: dict[tuple[str, int], torch.Tensor]  # (kind, layer) -> (samples, T, d)
    corrupt_cache: object | None  # the corrupted run's key/value cache, reused for prefixes
    block_returns_tuple: bool

    @property
    def samples(self) -> int:
        return self.noise.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.tokenized.n_tokens


def last_token_probs(lm: LoadedModel, input_ids: torch.Tensor, *, cache=None, use_cache: bool = False
                     ) -> tuple[torch.Tensor, object]:
    """Softmax at the last position (computing logits only there when the model allows it), after
    `cache` if given; returns the cache too when `use_cache` (see kv_cache.forward)."""
    logits, cache = forward(lm.model, input_ids, cache=cache, use_cache=use_cache, last_only=True)
    return torch.softmax(logits[:, -1].float(), dim=-1).to(lm.device), cache  # the unembedding may sit elsewhere


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


def noise_hook(lm: LoadedModel, noise: torch.Tensor, subject_range: tuple[int, int],
               offset: int = 0, rows_per_sample: int = 1) -> Hook:
    """Add noise to the subject's token embeddings.

    `offset`: absolute position of the first input token (inputs may be a suffix after a cache).
    `rows_per_sample`: batch rows are ordered sample-major, each sample repeated this many times."""
    start, end = subject_range
    lo, hi = max(start, offset), end  # absolute positions of the subject present in this input

    def add(embedded: torch.Tensor) -> torch.Tensor:
        if hi <= lo:
            return embedded
        embedded = embedded.clone()
        draws = noise[:, lo - start:hi - start].to(embedded.dtype)
        embedded[:, lo - offset:hi - offset] += draws.repeat_interleave(rows_per_sample, dim=0)
        return embedded

    return Hook(lm.arch.embed, edit_output=add)


def as_batch_seq(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, seq, d) view of a module output; some models (OPT) flatten tokens to (batch*seq, d)."""
    return tensor.view(batch, -1, tensor.shape[-1]) if tensor.dim() == 2 else tensor


def _recording_hooks(lm: LoadedModel) -> dict[tuple[str, int], Hook]:
    return {(kind, layer): Hook(lm.arch.module(kind, layer), keep_output=True)
            for kind in KINDS for layer in range(lm.n_layers)}


def prepare(lm: LoadedModel, prompt: str, subject: str, *, samples: int = 10, noise: float | None = None,
            noise_multiplier: float = 3.0, seed: int = 0, answer: str | None = None,
            max_tokens: int | None = None) -> TraceRun:
    """Run the clean and corrupted passes and record every block, MLP and attention output.

    noise: absolute standard deviation; by default `noise_multiplier` x the embedding std (vocabulary).
    answer: trace the probability of this continuation's first token instead of the clean top token.
    """
    if samples < 1:
        raise InputError(f"samples must be at least 1, not {samples}")
    limit = prompt_token_limit(lm.model)
    tokenized = tokenize_prompt(lm.tokenizer, prompt, subject, max_tokens=min(limit, max_tokens or limit),
                                device=lm.device)
    noise_std = float(noise) if noise is not None else noise_multiplier * embedding_std(lm)
    if not noise_std >= 0:
        raise InputError(f"the noise standard deviation must be 0 or more, not {noise_std}")
    generator = torch.Generator().manual_seed(seed)
    start, end = tokenized.subject_range
    draws = torch.randn(samples, end - start, lm.arch.d_model, generator=generator) * noise_std
    draws = draws.to(lm.device)

    ids = tokenized.input_ids
    with torch.no_grad():
        hooks = _recording_hooks(lm)
        with Hooks(hooks):
            probs, _ = last_token_probs(lm, ids, use_cache=False)
        clean = {key: as_batch_seq(h.output, 1)[0] for key, h in hooks.items()}
        if answer is not None:
            answer_ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
            if not answer_ids:
                raise PromptError("the answer is empty")
            answer_id = answer_ids[0]
        else:
            answer_id = int(probs[0].argmax())
        p_clean = float(probs[0, answer_id])

        hooks = _recording_hooks(lm)
        raw_outputs = []  # only to learn whether blocks return tuples
        with Hooks(hooks), noise_hook(lm, draws, tokenized.subject_range):
            handle = lm.arch.blocks[0].block.register_forward_hook(lambda m, a, out: raw_outputs.append(out))
            try:
                probs, cache = last_token_probs(lm, ids.expand(samples, -1), use_cache=True)
            finally:
                handle.remove()
        corrupt = {key: as_batch_seq(h.output, samples) for key, h in hooks.items()}
    return TraceRun(
        lm=lm, prompt=prompt, subject=subject, tokenized=tokenized, answer_id=answer_id,
        answer=lm.tokenizer.decode([answer_id]), p_clean=p_clean, p_corrupt=float(probs[:, answer_id].mean()),
        noise_std=noise_std, noise=draws, seed=seed, clean=clean, corrupt=corrupt, corrupt_cache=cache,
        block_returns_tuple=isinstance(raw_outputs[0], tuple),
    )
