import json

import pytest
import torch
from click.testing import CliRunner
from tiny import tiny_model, word_tokenizer

from factedit.cli import main
from factedit.models import ModelLoadError, load, weights_fingerprint
from factedit.trace.runs import prepare


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


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
