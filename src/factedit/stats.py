"""Second-moment statistics C = E[k k^T] of the MLP keys at one layer, over a text corpus.

The keys are the inputs of the MLP output projection. The forward pass stops right after that
projection in the requested layer, text is streamed in fixed-length chunks (never the model's
maximum context), products are accumulated in float64, and the result is cached on disk keyed by
model fingerprint, layer, corpus and token count. Every editor (and the `stats` command) reads them
through `key_statistics` / `key_statistics_at`, which turn a StatisticsSettings into a corpus.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError
from .hooks import Hook, Hooks
from .cache_files import file_digest, read_cached, write_atomic
from .models import LoadedModel, cache_root, check_seed, weights_fingerprint
from .progress import SAMPLING, STATISTICS, Phases, on_first_step, start_phase
from .settings import JsonSettings, bounded


@dataclass(kw_only=True)
class StatisticsSettings(JsonSettings):
    """Where the key statistics C come from, one set for every editor that reads them."""

    stats_corpus: str | None = None  # text/JSONL/folder/"wikitext"; None: $FACTEDIT_STATS_CORPUS or model text
    stats_tokens: int = bounded(100_000, at_least=1)


@dataclass
class SecondMoment:
    """Running uncentred second moment: sum of k k^T and the number of keys; mergeable."""

    sum_outer: torch.Tensor  # (d, d) float64
    count: int = 0

    @classmethod
    def empty(cls, dim: int) -> "SecondMoment":
        return cls(torch.zeros(dim, dim, dtype=torch.float64))

    def add(self, keys: torch.Tensor) -> None:
        keys = keys.reshape(-1, keys.shape[-1]).float()
        # float32 products per batch, float64 running sum: fast and accurate enough.
        self.sum_outer += (keys.T @ keys).double().cpu()
        self.count += keys.shape[0]

    def merge(self, other: "SecondMoment") -> None:
        if other.sum_outer.shape != self.sum_outer.shape:
            raise ValueError(f"cannot merge statistics of shape {tuple(other.sum_outer.shape)} "
                             f"into {tuple(self.sum_outer.shape)}")
        self.sum_outer += other.sum_outer
        self.count += other.count

    @property
    def matrix(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no keys accumulated")
        return self.sum_outer / self.count

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        meta = {"count": str(self.count), "info": json.dumps(metadata or {})}
        write_atomic(Path(path), lambda partial: save_file({"sum_outer": self.sum_outer.contiguous()}, str(partial),
                                                           metadata=meta))

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None) -> "SecondMoment":
        """The statistics saved at `path`; with `dim`, checked to be a layer's with `dim` keys
        (a ValueError says why not: a cache reader then computes them again)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            count = int(f.metadata()["count"])
        loaded = cls(load_file(str(path))["sum_outer"], count)
        return loaded if dim is None else loaded.checked(dim)

    def checked(self, dim: int) -> "SecondMoment":
        """self, in float64, if it can be the key statistics of a layer with `dim` keys: some keys
        counted, a finite (dim x dim) sum of k k^T (whose diagonal, sums of squares, is not negative)."""
        if self.count <= 0:
            raise ValueError(f"statistics of {self.count} keys")
        if tuple(self.sum_outer.shape) != (dim, dim):
            raise ValueError(f"statistics of shape {tuple(self.sum_outer.shape)}, not ({dim}, {dim})")
        if not self.sum_outer.is_floating_point() or not bool(torch.isfinite(self.sum_outer).all()):
            raise ValueError("statistics with values that are not finite numbers")
        if bool((torch.diagonal(self.sum_outer) < 0).any()):
            raise ValueError("statistics with a negative sum of squares")
        self.sum_outer = self.sum_outer.double()
        return self


# ---------------------------------------------------------------------------------------- corpora

@dataclass
class Corpus:
    """A text source: a name for cache keys and a function yielding documents."""

    name: str
    texts: Callable[[], Iterator[str]]
    identity: str  # what determines the content (path, size, content hash; dataset name)


def _file_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open() as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise InputError(f"{path}:{line_number}: not a JSON record ({err.msg})") from None
                    if not isinstance(record, dict) or "text" not in record:
                        raise InputError(f"{path}:{line_number}: JSONL records need a 'text' field")
                    yield record["text"]
    else:
        yield path.read_text(errors="replace")


def corpus_from(source: str) -> Corpus:
    """A text file, a .jsonl file with a `text` field, a folder of .txt/.jsonl files, or
    `wikitext` (wikitext-103 through the `datasets` library, for users who are online)."""
    if source in ("wikitext", "wikitext-103"):
        def wikitext():
            try:
                from datasets import load_dataset
            except ImportError:
                raise InputError("the wikitext corpus needs the `datasets` package (pip install datasets) and "
                                 "network access; or give a local text or .jsonl file") from None

            for record in load_dataset("wikitext", "wikitext-103-raw-v1", split="train", streaming=True):
                if record["text"].strip():
                    yield record["text"]

        return Corpus("wikitext-103", wikitext, "wikitext-103-raw-v1/train")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise InputError(f"{path} holds no .txt or .jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"corpus {source!r} not found (give a text file, a .jsonl file, a folder or 'wikitext')")
    identity = ";".join(f"{p.resolve()}:{p.stat().st_size}:{file_digest(p)}" for p in files)
    return Corpus(path.stem or "corpus", lambda: (t for p in files for t in _file_texts(p)), identity)


def held_out_corpus(source: str, last_docs: int = 3) -> Corpus:
    """The last `last_docs` documents of a corpus: text that statistics (taken from the start of the
    same corpus) never saw."""
    base = corpus_from(source)

    def texts():
        yield from list(base.texts())[-last_docs:]

    return Corpus(f"{base.name}-last{last_docs}", texts, f"{base.identity}:last{last_docs}")


def model_sampled_corpus(lm: LoadedModel, seed: int = 0, n_texts: int = 512, length: int = 128, *,
                         progress: Phases | None = None) -> Corpus:
    """Fallback when no text is given and no network exists: text sampled from the model itself
    (slow: n_texts x length tokens generated; phase progress.SAMPLING when its texts are read)."""
    from .generate import sample_texts, sampled_tokens

    check_seed(seed)
    starts = ["The", "In", "A", "It", "This", "He", "She", "When"]
    per_start = max(1, n_texts // len(starts))

    def texts():
        step = start_phase(progress, SAMPLING, sampled_tokens(lm, starts, per_start, length), "tok")
        yield from sample_texts(lm, starts, per_start, length, top_k=40, seed=seed, progress=step)

    return Corpus(f"model-sampled-seed{seed}", texts, f"model-sampled:{lm.fingerprint}:{seed}:{n_texts}:{length}")


def token_chunks(lm: LoadedModel, corpus: Corpus, n_tokens: int, chunk_len: int) -> Iterator[list[int]]:
    """Concatenate the corpus's token stream (documents separated by EOS) and cut it into chunks of
    `chunk_len` tokens; each chunk starts with BOS when the tokenizer adds one."""
    tok = lm.tokenizer
    probe = tok("a")["input_ids"]
    bos = [probe[0]] if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id else []
    body = chunk_len - len(bos)
    buffer: list[int] = []
    produced = 0
    for text in corpus.texts():
        buffer += list(tok(text, add_special_tokens=False)["input_ids"])
        if tok.eos_token_id is not None:
            buffer.append(tok.eos_token_id)
        while len(buffer) >= body and produced < n_tokens:
            take = min(body, n_tokens - produced)
            yield bos + buffer[:take]
            buffer = buffer[take:]
            produced += take
        if produced >= n_tokens:
            return
    if produced < n_tokens and buffer:
        yield bos + buffer[: n_tokens - produced]


def collect_second_moments(lm: LoadedModel, layers: list[int], corpus: Corpus, n_tokens: int, *, chunk_len: int = 256,
                           batch_size: int = 8, progress: Callable[[int], None] | None = None,
                           sum_chunks: Callable[..., dict[int, SecondMoment]] | None = None) -> dict[int, SecondMoment]:
    """Accumulate k k^T at each of `layers` over about `n_tokens` corpus tokens in one pass that stops
    after the highest layer (the BOS position excluded). `sum_chunks`: what sums over the token
    chunks, with moments_of_chunks' arguments (default: that function, here; factedit.cluster passes
    one that shards the chunks over workers)."""
    for layer in layers:
        lm.check_layer(layer)
    stats = (sum_chunks or moments_of_chunks)(lm, layers, token_chunks(lm, corpus, n_tokens, chunk_len),
                                              batch_size=batch_size, progress=progress)
    if stats[max(layers)].count == 0:
        raise InputError(f"corpus {corpus.name!r} produced no tokens")
    return stats


@torch.no_grad()
def moments_of_chunks(lm: LoadedModel, layers: list[int], chunks: Iterable[list[int]], *, batch_size: int = 8,
                      progress: Callable[[int], None] | None = None) -> dict[int, SecondMoment]:
    """The sums of k k^T at `layers` over token chunks, taken `batch_size` chunks at a time in order:
    the pass of collect_second_moments, apart so that a sharded run (factedit.cluster), handing each
    worker whole batches of the same chunks, forms the same batches and merges to the same sums."""
    stats = {layer: SecondMoment.empty(lm.arch.d_mlp) for layer in layers}
    top = max(layers)
    batch: list[list[int]] = []

    def flush():
        for length in sorted({len(c) for c in batch}):  # only the last chunk can be shorter
            group = [c for c in batch if len(c) == length]
            ids = torch.tensor(group, device=lm.device)
            hooks = {layer: Hook(lm.arch.blocks[layer].mlp_out, keep_input=True, stop=layer == top) for layer in layers}
            with Hooks(hooks):
                lm.model(input_ids=ids, use_cache=False)
            skip = 1 if lm.tokenizer.bos_token_id is not None and group[0][0] == lm.tokenizer.bos_token_id else 0
            for layer, hook in hooks.items():
                stats[layer].add(hook.input.reshape(len(group), -1, lm.arch.d_mlp)[:, skip:])
            if progress:
                progress(len(group) * (length - skip))
        batch.clear()

    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return stats


def collect_second_moment(lm: LoadedModel, layer: int, corpus: Corpus, n_tokens: int, **kwargs) -> SecondMoment:
    return collect_second_moments(lm, [layer], corpus, n_tokens, **kwargs)[layer]


def stats_cache_path(lm: LoadedModel, layer: int, corpus: Corpus, n_tokens: int, cache_dir: Path | None = None,
                     weights: str | None = None) -> Path:
    """Keyed by the weights the statistics are computed on (`weights`: their fingerprint, measured
    when not given): the model as loaded, or, while edits are applied to it (the workbench after an
    upload), those edited weights, in a folder of their own so that they never stand in for the
    unedited model's statistics."""
    digest = hashlib.sha256(corpus.identity.encode()).hexdigest()[:10]
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in corpus.name)[:40]
    weights = weights or weights_fingerprint(lm.model)
    folder = lm.fingerprint if weights == lm.fingerprint else f"{lm.fingerprint}-edited-{weights}"
    return cache_root(cache_dir) / "stats" / folder / f"layer{layer}_{slug}-{digest}_{n_tokens}tok.safetensors"


def second_moments(lm: LoadedModel, layers: list[int], corpus: Corpus, n_tokens: int = 100_000, *,
                   cache_dir: Path | None = None, progress: Phases | None = None,
                   chunk_len: int = 256, batch_size: int = 8,
                   sum_chunks: Callable[..., dict[int, SecondMoment]] | None = None
                   ) -> dict[int, tuple[SecondMoment, Path, bool]]:
    """C for each layer, from the disk cache where present; the missing layers in one pass, reported
    as phase progress.STATISTICS (n_tokens tokens). Returns {layer: (stats, cache path, cache hit)}.
    `sum_chunks`: passed to collect_second_moments (e.g. sharded over workers), so that either way
    the same cache file is written with the same metadata.

    While edits are applied (edits on top of earlier ones, the workbench after an upload), the
    unedited model's statistics are used where cached, as the reference does for sequential edits;
    statistics computed on edited weights are cached under those weights, never the model's."""
    weights = weights_fingerprint(lm.model)
    unedited = {layer: stats_cache_path(lm, layer, corpus, n_tokens, cache_dir, lm.fingerprint) for layer in layers}
    paths = {layer: stats_cache_path(lm, layer, corpus, n_tokens, cache_dir, weights) for layer in layers}
    result = {}
    for layer in layers:
        for path in dict.fromkeys([unedited[layer], paths[layer]]):
            stats = read_cached(path, lambda p: SecondMoment.load(p, lm.arch.d_mlp))  # damaged: recomputed
            if stats is not None:
                result[layer] = (stats, path, True)
                break
    missing = [layer for layer in layers if layer not in result]
    if missing:
        step = on_first_step(progress, STATISTICS, n_tokens, "tok")  # after any text sampling the corpus needs
        computed = collect_second_moments(lm, missing, corpus, n_tokens, chunk_len=chunk_len, batch_size=batch_size,
                                          progress=step, sum_chunks=sum_chunks)
        for layer, stats in computed.items():
            stats.save(paths[layer], {"model": lm.name, "fingerprint": lm.fingerprint, "layer": layer,
                                      "corpus": corpus.name, "corpus_identity": corpus.identity,
                                      "tokens_requested": n_tokens})
            result[layer] = (stats, paths[layer], False)
    return result


def second_moment(lm: LoadedModel, layer: int, corpus: Corpus, n_tokens: int = 100_000, **kwargs
                  ) -> tuple[SecondMoment, Path, bool]:
    """C for `layer` over `corpus`, from the disk cache when present. Returns (stats, path, cache_hit)."""
    return second_moments(lm, [layer], corpus, n_tokens, **kwargs)[layer]


# ----------------------------------------------------------------- the statistics an editor reads

def statistics_corpus(lm: LoadedModel, settings: StatisticsSettings, progress: Phases | None = None) -> Corpus:
    """The corpus for the key statistics: the settings' source, else $FACTEDIT_STATS_CORPUS, else
    text sampled from the model itself (its name says so: model-sampled-seedN; `progress` hears of
    the sampling). Its seed is the settings' prefix_seed where they have one (an editor samples its
    context prefixes and this text with one seed), else 0."""
    import os

    source = settings.stats_corpus or os.environ.get("FACTEDIT_STATS_CORPUS")
    if source:
        return corpus_from(source)
    return model_sampled_corpus(lm, seed=getattr(settings, "prefix_seed", 0), progress=progress)


def key_statistics(lm: LoadedModel, settings: StatisticsSettings, *, layer: int | None = None,
                   cache_dir: Path | None = None, progress: Phases | None = None, sum_chunks=None
                   ) -> tuple[SecondMoment, Path, bool]:
    """C at `layer` (default: the settings' layer) over the settings' corpus (statistics_corpus), from
    the disk cache or computed (phases progress.SAMPLING where the model's own text is the corpus,
    then progress.STATISTICS). Returns (stats, path, cache hit). `sum_chunks`: what sums k k^T when
    not cached (collect_second_moments; e.g. sharded over workers)."""
    corpus = statistics_corpus(lm, settings, progress)
    return second_moment(lm, settings.layer if layer is None else layer, corpus, settings.stats_tokens,
                         cache_dir=cache_dir, progress=progress, sum_chunks=sum_chunks)


def key_statistics_at(lm: LoadedModel, settings: StatisticsSettings, cache_dir: Path | None = None,
                      progress: Phases | None = None) -> dict[int, tuple[SecondMoment, Path, bool]]:
    """{layer: (SecondMoment, cache path, cache hit)} for every layer of the settings' `layers`, over
    the settings' corpus (statistics_corpus), in one pass for the layers not cached."""
    corpus = statistics_corpus(lm, settings, progress)
    return second_moments(lm, settings.layers, corpus, settings.stats_tokens, cache_dir=cache_dir, progress=progress)
