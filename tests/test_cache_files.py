"""Caches are shortcuts: statistics computed on edited weights never stand in for the model's, and a
truncated or corrupt cache file is recomputed instead of failing every run."""

import json

import numpy as np
import pytest
import torch
from tiny import tiny_model, word_tokenizer

from factedit.cache_files import read_cached, write_atomic
from factedit.edit import EditDelta, EditRequest, EditStack, RomeSettings
from factedit.edit.memit import MemitSettings
from factedit.edit.prefixes import context_templates
from factedit.edit.targets import TargetCache
from factedit.models import from_model
from factedit.stats import collect_second_moment, corpus_from, second_moment

TEXT = "The Eiffel Tower is located in the city of Paris . The Space Needle is in the city of Seattle . " * 20


def tiny():
    return from_model(tiny_model("llama"), word_tokenizer(), name="tiny-llama")


def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return corpus_from(str(path))


def an_edit(lm) -> EditDelta:
    name = f"{lm.arch.blocks_name}.1.{lm.arch.blocks[1].mlp_out_name}"
    up = torch.randn(lm.arch.d_model, 1)
    down = torch.randn(1, lm.arch.d_mlp)
    return EditDelta("rome", lm.fingerprint, {name: {"up": up, "down": down}}, {}, [])


def test_statistics_on_edited_weights_are_kept_apart(tmp_path):
    lm, text = tiny(), corpus(tmp_path)
    stack = EditStack(lm)
    stack.apply(an_edit(lm))
    edited, edited_path, hit = second_moment(lm, 2, text, 100, cache_dir=tmp_path)
    assert not hit and "-edited-" in edited_path.parent.name
    stack.revert()
    clean, clean_path, hit = second_moment(lm, 2, text, 100, cache_dir=tmp_path)
    assert not hit and clean_path.parent.name == lm.fingerprint  # not the edited weights' statistics
    assert torch.allclose(clean.sum_outer, collect_second_moment(lm, 2, text, 100).sum_outer)
    assert not torch.allclose(clean.sum_outer, edited.sum_outer)
    # With edits applied again, the unedited model's statistics are used, as for sequential edits.
    stack.apply(an_edit(lm))
    again, again_path, hit = second_moment(lm, 2, text, 100, cache_dir=tmp_path)
    assert hit and again_path == clean_path and torch.equal(again.sum_outer, clean.sum_outer)


def test_a_truncated_statistics_file_is_recomputed(tmp_path):
    lm, text = tiny(), corpus(tmp_path)
    first, path, _ = second_moment(lm, 1, text, 100, cache_dir=tmp_path)
    path.write_bytes(path.read_bytes()[:50])
    again, path2, hit = second_moment(lm, 1, text, 100, cache_dir=tmp_path)
    assert not hit and path2 == path and torch.equal(again.sum_outer, first.sum_outer)
    assert second_moment(lm, 1, text, 100, cache_dir=tmp_path)[2]  # rewritten whole


def test_a_corrupt_prefix_cache_is_resampled(tmp_path):
    lm = tiny()
    settings = RomeSettings.defaults_for(lm, 1, prefix_lengths=[[3, 5]])
    templates = context_templates(lm, settings, cache_dir=tmp_path)
    (path,) = (tmp_path / "prefixes").iterdir()
    for broken in ('["The cat. {}", ', '{"not": "a list"}', "\x00\x01"):
        path.write_text(broken)
        assert context_templates(lm, settings, cache_dir=tmp_path) == templates
        assert json.loads(path.read_text()) == templates


def test_a_corrupt_memit_target_counts_as_missing(tmp_path):
    lm = tiny()
    cache = TargetCache(lm, MemitSettings.defaults_for(lm, 2), 2, tmp_path)
    request = EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    cache.put(request, {"z": torch.ones(3)})
    assert torch.equal(cache.get(request)["z"], torch.ones(3))
    cache._path(request).write_bytes(b"truncated")
    assert cache.get(request) is None


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "cache.json"
    write_atomic(path, lambda p: p.write_text("old"))

    def failing(partial):
        partial.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # the writer's error reaches the caller
        write_atomic(path, failing)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["cache.json"]
    assert read_cached(tmp_path / "absent.json", lambda p: p.read_text()) is None


def test_a_corpus_is_known_by_its_content_not_its_modification_time(tmp_path):
    """A data folder copied or mounted again must keep its statistics caches and resumable runs."""
    import os

    path = tmp_path / "corpus.txt"
    path.write_text("one two three")
    before = corpus_from(str(path)).identity
    os.utime(path, (1_000_000, 1_000_000))
    assert corpus_from(str(path)).identity == before
    path.write_text("one two four!")  # same size, other bytes
    assert corpus_from(str(path)).identity != before


def test_a_statistics_file_that_cannot_be_the_layers_is_recomputed(tmp_path):
    """A cache file that reads fine but holds no keys, another shape, or non-finite values is not used:
    the statistics are computed again, equal to a fresh computation, and the file is rewritten."""
    from factedit.stats import SecondMoment

    lm, text = tiny(), corpus(tmp_path)
    fresh = collect_second_moment(lm, 1, text, 100)
    _, path, _ = second_moment(lm, 1, text, 100, cache_dir=tmp_path)
    d = lm.arch.d_mlp
    nan = fresh.sum_outer.clone()
    nan[0, 1] = float("nan")
    negative = fresh.sum_outer.clone()
    negative[2, 2] = -1.0
    for broken in (SecondMoment(fresh.sum_outer.clone(), 0), SecondMoment(fresh.sum_outer.clone(), -5),
                   SecondMoment(torch.eye(d + 1, dtype=torch.float64), fresh.count),
                   SecondMoment(torch.ones(d, dtype=torch.float64)[:, None].expand(d, 2).contiguous(), fresh.count),
                   SecondMoment(nan, fresh.count), SecondMoment(fresh.sum_outer * float("inf"), fresh.count),
                   SecondMoment(negative, fresh.count)):
        broken.save(path)
        again, path2, hit = second_moment(lm, 1, text, 100, cache_dir=tmp_path)
        assert not hit and path2 == path
        assert again.count == fresh.count and torch.equal(again.sum_outer, fresh.sum_outer)
        reread, _, hit = second_moment(lm, 1, text, 100, cache_dir=tmp_path)
        assert hit and torch.equal(reread.sum_outer, fresh.sum_outer)  # the file was rewritten whole


def test_a_valid_statistics_file_is_read_as_float64(tmp_path):
    from factedit.stats import SecondMoment

    lm, text = tiny(), corpus(tmp_path)
    fresh, path, _ = second_moment(lm, 1, text, 100, cache_dir=tmp_path)
    SecondMoment(fresh.sum_outer.float(), fresh.count).save(path)  # e.g. written by hand in float32
    read, _, hit = second_moment(lm, 1, text, 100, cache_dir=tmp_path)
    assert hit and read.sum_outer.dtype == torch.float64
    assert torch.allclose(read.sum_outer, fresh.sum_outer, rtol=1e-6)


def test_a_prefix_cache_of_the_wrong_length_or_form_is_resampled(tmp_path):
    lm = tiny()
    settings = RomeSettings.defaults_for(lm, 1, prefix_lengths=[[3, 5]])
    templates = context_templates(lm, settings, cache_dir=tmp_path)
    assert len(templates) == 6 and templates[0] == "{}"
    (path,) = (tmp_path / "prefixes").iterdir()
    for broken in (templates[:3], templates[1:] + ["{}"], templates[:-1] + ["A {} and {}. {}"],
                   templates + ["More. {}"]):
        path.write_text(json.dumps(broken))
        assert context_templates(lm, settings, cache_dir=tmp_path) == templates
        assert json.loads(path.read_text()) == templates


def test_a_running_mean_state_that_cannot_be_one_is_refused():
    from factedit.stats_running import RunningMean

    good = RunningMean()
    for row in ([1.0, 2.0], [3.0, 5.0]):
        good.add(row)
    state = good.state()
    assert np.allclose(RunningMean.from_state(state).mean, [2.0, 3.5])
    for broken in ({**state, "count": -1}, {**state, "count": 2.5}, {**state, "m2": [1.0]},
                   {**state, "mean": [float("nan"), 1.0]}, {**state, "m2": [-1.0, 0.0]}):
        with pytest.raises(ValueError):
            RunningMean.from_state(broken)


def test_processes_loading_one_gguf_together_dequantise_it_once(tmp_path, monkeypatch):
    """Ray workers on a fresh node (or parallel test processes) loading the same GGUF file: the first
    dequantises and writes the cache entry, the others wait for its lock and load the entry."""
    import threading
    import time

    from factedit import models

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF test bytes")
    dequantised, loaded = [], []

    def slow_dequantise(path, cached, dtype, **kwargs):
        dequantised.append(threading.get_ident())
        time.sleep(0.5)  # the others arrive meanwhile
        (cached).mkdir(parents=True)
        (cached / "config.json").write_text("{}")
        return "dequantised"

    monkeypatch.setattr(models, "_dequantize_into", slow_dequantise)
    monkeypatch.setattr(models, "_load_hf", lambda source, dtype, **kwargs: loaded.append(source) or "from cache")
    results = []
    threads = [threading.Thread(target=lambda: results.append(models._load_gguf_cached(gguf, None, tmp_path / "c")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(dequantised) == 1 and sorted(results) == ["dequantised", "from cache", "from cache"]
