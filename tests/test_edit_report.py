"""One before/after report around an edit for the command line and the workbench (issue 12, item 14),
and progress with a total for every long phase of an edit (item 15); on the tiny Llama."""

import re
import time

import pytest
from click.testing import CliRunner

from factedit.cli import main
from factedit.cli.edit_commands import report_lines
from factedit.edit import EditRequest, EditStack, edit, get_method
from factedit.models import load
from factedit.progress import OPTIMISATION, PREFIXES, SAMPLING, STATISTICS
from factedit.report import checks_for, report_around
from factedit.server.workbench import Workbench
from factedit.stats import model_sampled_corpus, second_moment

TEMPLATE, SUBJECT = "{} is located in the city of", "The Eiffel Tower"
PARAPHRASE = "The Space Needle . The Eiffel Tower is in the city of"


def wait(job, timeout=120):
    deadline = time.time() + timeout
    while job.status not in ("done", "error"):
        assert time.time() < deadline, "job did not finish"
        time.sleep(0.05)
    assert job.status == "done", job.error
    return job.result


def test_cli_and_workbench_show_the_same_report(tiny_folder, word_corpus):
    request = EditRequest.create(TEMPLATE, SUBJECT, "Rome", "Paris")
    lm = load(str(tiny_folder))

    def make_edit():
        delta, _ = edit(lm, request, "ft", get_method("ft").settings_with(lm, 1))
        EditStack(lm).apply(delta)

    expected, _ = report_around(lm, request, checks_for(lm, request, [PARAPHRASE]), make_edit)
    assert [row.label for row in expected.rows] == ["prompt", "paraphrase"] + ["prefixed (sampled)"] * 2
    assert expected.rows[0].new_after > expected.rows[0].new_before
    assert expected.generation_before.startswith(request.text)

    result = CliRunner().invoke(main, ["edit", "--model", str(tiny_folder), "--prompt", TEMPLATE, "--subject", SUBJECT,
                                       "--target", "Rome", "--true", "Paris", "--method", "ft", "--layer", "1",
                                       "--paraphrase", PARAPHRASE])
    assert result.exit_code == 0, result.output
    printed = result.output.splitlines()
    for line in report_lines(expected):
        assert line in printed, (line, result.output)

    bench = Workbench(load(str(tiny_folder)), stats_corpus=str(word_corpus), stats_tokens=500)
    served = wait(bench.edit_job(request, "ft", 1, [PARAPHRASE]))
    reported = {key: served[key] for key in expected.to_dict()}
    wanted = expected.to_dict()
    assert {k: v for k, v in reported.items() if k != "rows"} == {k: v for k, v in wanted.items() if k != "rows"}
    assert len(reported["rows"]) == len(wanted["rows"])
    for got, want in zip(reported["rows"], wanted["rows"]):
        assert got == pytest.approx(want, abs=1e-6)


def phase_lines(output: str) -> dict[str, tuple[int, str]]:
    """Each edit phase's bar in its final state: phase name -> (position of its first appearance,
    'done/total'); other bars (transformers' "Loading weights") are left out."""
    found = {}
    for match in re.finditer(r"([^\r\n]+?): +\d+%\|[^|]*\| (\d+/\d+)", output):
        name = match.group(1).strip()
        if name not in (SAMPLING, STATISTICS, PREFIXES, OPTIMISATION):
            continue
        position = found.get(name, (match.start(), ""))[0]
        found[name] = (position, match.group(2))
    return found


def test_cli_edit_shows_every_long_phase_with_its_total(tiny_folder, word_corpus):
    args = ["edit", "--model", str(tiny_folder), "--prompt", TEMPLATE, "--subject", SUBJECT, "--target", "Rome",
            "--true", "Paris", "--layer", "1", "--corpus", str(word_corpus), "--tokens", "300"]
    result = CliRunner().invoke(main, args)  # no statistics or prefixes cached yet (a fresh cache folder)
    assert result.exit_code == 0, result.output
    phases = phase_lines(result.output)
    assert [STATISTICS, PREFIXES, OPTIMISATION] == sorted(phases, key=lambda name: phases[name][0])
    assert phases[STATISTICS][1] == "300/300"
    done, total = phases[PREFIXES][1].split("/")
    assert done == total and int(total) > 0
    steps = re.search(r"optimisation: (\d+) steps", result.output).group(1)
    assert phases[OPTIMISATION][1] == f"{steps}/100"  # total: the maximum, v_steps

    again = CliRunner().invoke(main, args)  # statistics and prefixes cached: only the optimisation is left
    assert again.exit_code == 0, again.output
    assert list(phase_lines(again.output)) == [OPTIMISATION]


def test_text_sampled_for_statistics_is_a_phase_before_them(tiny_llama, tmp_path):
    """Without a corpus the statistics read text sampled from the model (slow: 512 texts of 128 tokens
    by default), a phase of its own with its total, announced before the statistics' own."""
    announced, counted = [], {}

    def phases(name, total, unit):
        announced.append((name, total, unit))
        counted[name] = 0

        def step(n):
            counted[name] += n

        return step

    corpus = model_sampled_corpus(tiny_llama, n_texts=16, length=12, progress=phases)
    stats, _, hit = second_moment(tiny_llama, 1, corpus, 50, cache_dir=tmp_path, progress=phases)
    sampled = 16 * 11  # each start word is one token of the tiny vocabulary
    assert not hit and announced == [(SAMPLING, sampled, "tok"), (STATISTICS, 50, "tok")]
    assert counted == {SAMPLING: sampled, STATISTICS: 50} and stats.count == 50
    announced.clear()
    assert second_moment(tiny_llama, 1, corpus, 50, cache_dir=tmp_path, progress=phases)[2]  # cached: no phases
    assert announced == []
