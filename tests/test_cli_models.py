import json
import re

import pytest
import torch
from click.testing import CliRunner
from tiny import tiny_model, word_tokenizer

from factedit.cli import main
from factedit.models import ModelLoadError, load, weights_fingerprint
from factedit.trace.runs import prepare


def test_load_model_folder_and_fingerprint(tiny_folder):
    lm = load(str(tiny_folder))
    again = load(str(tiny_folder))
    assert lm.fingerprint == again.fingerprint and lm.n_layers == 3
    with torch.no_grad():
        lm.arch.blocks[1].mlp_out.weight[0, 0] += 1e-3
    assert weights_fingerprint(lm.model) != again.fingerprint


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="not a bundled model"):
        load("no-such-model-anywhere", local_files_only=True)
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(str(tmp_path))


def test_cli_trace_writes_json_and_images(tiny_folder, tmp_path):
    out = tmp_path / "trace"
    result = CliRunner().invoke(main, ["trace", "--model", str(tiny_folder), "--prompt",
                                       "The Eiffel Tower is located in the city of", "--subject", "The Eiffel Tower",
                                       "--kind", "all", "--samples", "2", "--window", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "p_clean" in result.output and "peak at token" in result.output
    for kind in ("hidden", "mlp", "attn"):
        data = json.loads((out / f"trace_{kind}.json").read_text())
        assert len(data["scores"]) == 9 and len(data["scores"][0]) == 3
        assert (out / f"trace_{kind}.png").stat().st_size > 1000 and (out / f"trace_{kind}.svg").exists()


def test_cli_bad_input_is_one_clear_line(tiny_folder, tmp_path):
    result = CliRunner().invoke(main, ["trace", "--model", str(tiny_folder), "--prompt", "The city of",
                                       "--subject", "Paris", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "error: subject 'Paris' does not occur in the prompt" in result.output
    assert "Traceback" not in result.output


def test_cli_trace_avg(tiny_folder, tmp_path):
    prompt = "The Eiffel Tower is located in the city of"
    answer = prepare(load(str(tiny_folder)), prompt, "The Eiffel Tower", samples=1).answer.strip()
    facts = tmp_path / "facts.json"

    def run(attributes, out):
        facts.write_text(json.dumps([{"known_id": i, "subject": "The Eiffel Tower", "attribute": a, "prompt": prompt}
                                     for i, a in enumerate(attributes)]))
        return CliRunner().invoke(main, ["trace-avg", "--model", str(tiny_folder), "--facts", str(facts), "--n", "2",
                                         "--kind", "hidden", "--samples", "2", "--out", str(tmp_path / out)])

    result = run([answer, "zzz", answer], "avg")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "avg" / "average.json").read_text())
    assert (summary["n_facts"], summary["n_correct"], summary["n_skipped_wrong"]) == (3, 2, 1)
    assert (tmp_path / "avg" / "average.png").exists() and "1 skipped" in result.output
    result = run(["zzz"], "none")
    assert result.exit_code == 2 and "predicted none of the 1 facts" in result.output


def test_cli_edit_generate_export_stats(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The Eiffel Tower is located in the city of Paris . " * 30)
    runner = CliRunner()
    result = runner.invoke(main, ["stats", "--model", str(tiny_folder), "--layer", "1", "--corpus", str(corpus),
                                  "--tokens", "300"])
    assert result.exit_code == 0, result.output
    assert "computed C at layer 1: 300 keys" in result.output
    again = runner.invoke(main, ["stats", "--model", str(tiny_folder), "--layer", "1", "--corpus", str(corpus),
                                 "--tokens", "300"])
    assert "loaded C at layer 1" in again.output

    edit_file = tmp_path / "e.safetensors"
    result = runner.invoke(main, ["edit", "--model", str(tiny_folder), "--prompt", "{} is located in the city of",
                                  "--subject", "The Eiffel Tower", "--target", "Rome", "--layer", "1",
                                  "--corpus", str(corpus), "--tokens", "300", "--save", str(edit_file)])
    assert result.exit_code == 0, result.output
    assert "p(Rome)" in result.output and "before:" in result.output and "after:" in result.output
    assert edit_file.exists()
    result = runner.invoke(main, ["generate", "--model", str(tiny_folder), "--edits", str(edit_file),
                                  "--prompt", "The Eiffel Tower is located in the city of", "--max-new", "3"])
    assert result.exit_code == 0 and "applied" in result.output
    out = tmp_path / "exported"
    result = runner.invoke(main, ["export", "--model", str(tiny_folder), "--edits", str(edit_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load(str(out)).fingerprint != load(str(tiny_folder)).fingerprint

    other = tmp_path / "other-model"
    tiny_model("llama", seed=1).save_pretrained(other)
    word_tokenizer().save_pretrained(other)
    result = runner.invoke(main, ["generate", "--model", str(other), "--edits", str(edit_file), "--prompt", "The"])
    assert result.exit_code == 2 and "refusing to apply it" in result.output


def test_cli_suggest_layer(tiny_folder, tmp_path, monkeypatch):
    """The suggestion is the traced site's layer nearest the default rule's: with the rule moved to
    a layer outside the site, the suggestion stays in the site (any layer < 3 would pass a range check)."""
    import factedit.edit.layers

    prompt = "The Eiffel Tower is located in the city of"
    answer = prepare(load(str(tiny_folder)), prompt, "The Eiffel Tower", samples=1).answer.strip()
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"known_id": 0, "subject": "The Eiffel Tower", "attribute": answer, "prompt": prompt}]))

    def suggest() -> tuple[list[int], int, int]:
        """(site layers, default layer, suggested layer) from the command's output."""
        result = CliRunner().invoke(main, ["suggest-layer", "--model", str(tiny_folder), "--facts", str(facts),
                                           "--n", "1", "--samples", "2", "--window", "1"])
        assert result.exit_code == 0 and "over 1 facts" in result.output, result.output
        low, high = map(int, re.search(r"site: layers (\d+)-(\d+)", result.output).groups())
        default = int(re.search(r"default layer (\d+)", result.output).group(1))
        return list(range(low, high + 1)), default, int(re.search(r"suggested layer (\d+):", result.output).group(1))

    site, default, layer = suggest()
    assert default == 0 and layer == min(site, key=lambda candidate: abs(candidate - 0))  # the rule: 3 // 6
    monkeypatch.setattr(factedit.edit.layers, "edit_layer", lambda lm: (2, "moved by the test"))
    site, default, layer = suggest()
    assert default == 2 not in site and layer == min(site, key=lambda candidate: abs(candidate - 2)) != 2


@pytest.mark.slow  # about 11 s on 2 shared cores: two methods, each run in full
def test_cli_sequential_editing_restores_the_model(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"The city of {c} is in France . " * 10})
                                for c in ("Paris", "Rome", "Berlin", "Seattle")))
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{"case_id": i, "requested_rewrite": {
        "prompt": "{} is located in the city of", "subject": s, "target_new": {"str": "Rome"},
        "target_true": {"str": "Paris"}}} for i, s in enumerate(["The Eiffel Tower", "The Space Needle", "Michael Jordan"])]))
    result = CliRunner().invoke(main, ["sequential", "--model", str(tiny_folder), "--data", str(data), "--n", "3",
                                       "--measure-every", "2", "--layer", "1", "--corpus", str(corpus), "--tokens",
                                       "200", "--known", str(tmp_path / "none.json"), "--out", str(tmp_path / "seq")])
    assert result.exit_code != 0 and "known-facts file not found" in result.output
    result = CliRunner().invoke(main, ["sequential", "--model", str(tiny_folder), "--data", str(data), "--n", "3",
                                       "--measure-every", "2", "--layer", "1", "--corpus", str(corpus), "--tokens",
                                       "200", "--out", str(tmp_path / "seq")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "seq" / "lifelong.json").read_text())
    assert [p["n_edits"] for p in summary["rome"]] == [0, 2, 3] and set(summary) == {"rome", "rome-original"}
    # Every run starts from the unedited model: the baseline perplexity is the same for both methods.
    assert summary["rome"][0]["perplexity"] == pytest.approx(summary["rome-original"][0]["perplexity"], rel=1e-6)
    assert (tmp_path / "seq" / "lifelong.png").exists() and (tmp_path / "seq" / "rome" / "cases" / "2.json").exists()
    assert "| rome | 3 | 3 |" in result.output
    # The statistics (computed once, then cached for the second method) show their total.
    assert re.search(r"key statistics: 100%.*200/200", result.output)


def test_counterfact_loader(data_dir, tmp_path):
    from factedit.data import DatasetError, load_counterfact

    dev = load_counterfact(data_dir / "counterfact" / "counterfact_dev.json")
    assert len(dev) == 300 and len(dev[0].neighborhood_prompts) == 10 and dev[0].request.target_new.startswith(" ")
    lite = load_counterfact(data_dir / "counterfact" / "counterfact_lite.json", n=5)
    assert len(lite) == 5 and len(lite[0].paraphrase_prompts) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"case_id": 1, "requested_rewrite": {"prompt": "{} is", "subject": "x"}}]))
    with pytest.raises(DatasetError, match="lacks 'target_new'"):
        load_counterfact(bad)
