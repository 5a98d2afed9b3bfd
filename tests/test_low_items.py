"""Issue 27's low items: a whitespace true target is refused; a subject that occurs twice or only
inside a word is located by a stated rule, with a warning, and can be picked (occurrence); a
--cluster address where a non-Ray server listens fails within seconds; tokens that are fragments of a
UTF-8 character are shown by their bytes instead of U+FFFD."""

import contextlib
import json
import re
import socket
import threading
import time
import warnings

import pytest
import torch
from click.testing import CliRunner

from factedit.cli import main
from factedit.data.known import DatasetError
from factedit.data.requests import load_requests
from factedit.data.zsre import load_zsre
from factedit.edit.delta import EditDelta, EditFileError
from factedit.request import EditRequest
from factedit.tokens import PromptError, SubjectWarning, find_subject, token_label, tokenize_prompt

TWICE = "Paris is located in France Paris is a city of"  # words of the tiny models' vocabulary


@contextlib.contextmanager
def no_subject_warning():
    """A context in which a SubjectWarning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SubjectWarning)
        yield


# ------------------------------------------------------------------- a: whitespace target_true
@pytest.mark.parametrize("blank", [" ", "  ", "\n", "\t "])
def test_a_whitespace_true_target_is_refused_like_a_whitespace_new_one(blank):
    with pytest.raises(PromptError, match="the new target is empty"):
        EditRequest.create("{} is in", "The Eiffel Tower", blank)
    with pytest.raises(PromptError, match="the true target .* is only whitespace"):
        EditRequest.create("{} is in", "The Eiffel Tower", "Rome", blank)
    with pytest.raises(PromptError, match="only whitespace"):
        EditRequest.from_dict({"prompt": "{} is in", "subject": "The Eiffel Tower", "target_new": "Rome",
                               "target_true": blank})


def test_an_empty_or_absent_true_target_still_means_the_current_next_token():
    for unknown in (None, ""):
        assert EditRequest.create("{} is in", "The Eiffel Tower", "Rome", unknown).target_true is None
    assert EditRequest.create("{} is in", "The Eiffel Tower", "Rome", "Paris").target_true == " Paris"
    with pytest.raises(PromptError, match="must be text"):
        EditRequest.from_dict({"prompt": "{} is in", "subject": "S", "target_new": "Rome", "target_true": 5})


def test_the_loaders_refuse_a_whitespace_true_target(tmp_path):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([
        {"prompt": "{} is in", "subject": "The Eiffel Tower", "target_new": "Rome", "target_true": "Paris"},
        {"prompt": "{} is in", "subject": "The Space Needle", "target_new": "Rome", "target_true": "   "}]))
    with pytest.raises(DatasetError, match=r"request 1: the true target '   ' is only whitespace"):
        load_requests(requests)
    zsre = tmp_path / "zsre.json"
    zsre.write_text(json.dumps([{"subject": "Vinson Massif", "src": "Where is Vinson Massif?", "rephrase": "?",
                                 "alt": "Europe", "answers": [" "], "loc": "q", "loc_ans": "a"}]))
    with pytest.raises(DatasetError, match=r"record 0: the true target ' ' is only whitespace"):
        load_zsre(zsre)


# ------------------------------------------------------------------- b: which occurrence
def test_b_a_subject_twice_is_said_and_the_first_used_unless_told():
    match = find_subject(TWICE, "Paris")
    assert (match.start, match.occurrence) == (0, 0)
    assert re.search(r"'Paris' occurs 2 times as a word .* using occurrence 0 .*--occurrence N", match.warning)
    for told in (find_subject(TWICE, "Paris", 1), find_subject(TWICE, " Paris", 0), find_subject(TWICE, " Paris")):
        assert told.start == TWICE.index("Paris", 1) and told.warning is None  # " Paris" occurs once
    with pytest.raises(PromptError, match="no occurrence 2 of subject 'Paris'.*occurs 2 time"):
        find_subject(TWICE, "Paris", 2)
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(PromptError, match="whole number from 0"):
            find_subject(TWICE, "Paris", bad)


def test_b_a_whole_word_is_preferred_and_a_match_inside_a_word_is_said():
    prompt = "Parisian food is best in Paris"
    for (text, subject, occurrence), start in (((prompt, "Paris", None), prompt.rindex("Paris")),  # one whole word
                                               ((prompt, "Paris", 0), 0),  # but "Parisian" can be asked for
                                               (("Audible.com is owned by", "Audible.com", None), 0),
                                               (("Is it (Paris)?", "Paris", None), 7)):
        match = find_subject(text, subject, occurrence)
        assert (match.start, match.warning) == (start, None), text
    match = find_subject("Let us start", "art")
    assert match.start == 9 and re.search(r"'art' occurs only inside a word .*in 'start' at character 9", match.warning)
    with pytest.warns(SubjectWarning, match="occurs only inside a word"):
        EditRequest.create("Let us start", "art", "Rome")


def test_b_tokenize_prompt_takes_the_occurrence(tiny_llama):
    tok = tiny_llama.tokenizer
    with pytest.warns(SubjectWarning, match="occurs 2 times"):
        assert tokenize_prompt(tok, TWICE, "Paris").subject_range == (0, 1)
    with no_subject_warning():
        tokenized = tokenize_prompt(tok, TWICE, "Paris", occurrence=1)
    assert tokenized.subject_range == (5, 6) and tokenized.tokens[5] == "Paris"
    second = TWICE.index("Paris", 1)
    assert tokenized.subject_chars == (second, second + 5)


def test_b_edit_requests_keep_the_occurrence_and_old_ones_load(tmp_path):
    with pytest.warns(SubjectWarning):
        default = EditRequest.create(TWICE, "Paris", "Rome")
    assert default.prompt == "{} is located in France Paris is a city of" and default.occurrence is None
    assert "occurrence" not in default.to_dict()  # saved as before occurrences existed
    with no_subject_warning():
        second = EditRequest.create(TWICE, "Paris", "Rome", "Berlin", occurrence=1)
        template = EditRequest.create("{} is located in France Paris is a city of", "Paris", "Rome")
        assert EditRequest.from_dict(second.to_dict()) == second  # round trip, no warning
        assert EditRequest.from_dict({k: v for k, v in default.to_dict().items()}) == default
    assert second.prompt == "Paris is located in France {} is a city of" and second.text == TWICE
    assert second.to_dict()["occurrence"] == 1 and second.subject_occurrence == 1
    assert template.subject_occurrence == 0 and template.occurrence is None
    with pytest.raises(PromptError, match="occurrence 1 of subject 'Paris' is not where the template"):
        EditRequest.create("{} is located in France Paris is a city of", "Paris", "Rome", occurrence=1)
    with pytest.raises(PromptError, match="no occurrence 3"):
        EditRequest.create(TWICE, "Paris", "Rome", occurrence=3)

    # an edit file stores it and loads it back; one without it (older) loads; a bad one is refused
    change = {"model.layers.0.mlp.down_proj": {"up": torch.ones(4, 1), "down": torch.ones(1, 3)}}
    for request in (second.to_dict(), default.to_dict()):
        path = EditDelta("rome", "f" * 16, change, {}, [request]).save(tmp_path / "e.safetensors")
        loaded = EditDelta.load(path).requests[0]
        assert loaded == request and EditRequest.from_dict(loaded) == EditRequest.from_dict(request)
    for bad in (-1, "1", True, 1.5):
        path = EditDelta("rome", "f" * 16, change, {}, [{**second.to_dict(), "occurrence": bad}]).save(
            tmp_path / "bad.safetensors")
        with pytest.raises(EditFileError, match=r"requests\[0\].occurrence must be a whole number from 0"):
            EditDelta.load(path)
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([second.to_dict(), {**second.to_dict(), "occurrence": None}]))
    assert [r.occurrence for r in load_requests(requests)] == [1, None]
    requests.write_text(json.dumps([{**second.to_dict(), "occurrence": "1"}]))
    with pytest.raises(DatasetError, match="occurrence must be"):
        load_requests(requests)


def test_b_the_cli_warns_in_one_line_and_takes_occurrence(tiny_folder, tmp_path):
    def trace(*extra):
        return CliRunner().invoke(main, ["trace", "--model", str(tiny_folder), "-p", TWICE, "-s", "Paris",
                                         "--kind", "hidden", "--samples", "1", "--out", str(tmp_path / "t"), *extra])

    result = trace()
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "Paris" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: subject 'Paris' occurs 2 times as a word"), \
        result.stderr
    assert "SubjectWarning" not in result.stderr and ".py:" not in result.stderr
    assert "subject tokens 0..0" in result.output
    result = trace("--occurrence", "1")
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert "subject tokens 5..5: ['Paris']" in result.output
    result = trace("--occurrence", "2")
    assert result.exit_code == 2 and "error: there is no occurrence 2 of subject 'Paris'" in result.output
    result = trace("--occurrence", "-1")
    assert result.exit_code == 2 and "Traceback" not in result.output

    result = CliRunner().invoke(main, ["edit", "--model", str(tiny_folder), "-p", TWICE, "-s", "Paris",
                                       "-t", "Rome", "--occurrence", "4"])
    assert result.exit_code == 2 and "error: there is no occurrence 4" in result.output
    assert "loading" not in result.output  # refused before the model loads


def test_b_cli_edit_saves_the_occurrence(tiny_folder, word_corpus, tmp_path):
    save = tmp_path / "e.safetensors"
    prompt = "Paris is located in France Paris is located in"  # the tiny model continues it with a word
    result = CliRunner().invoke(main, ["edit", "--model", str(tiny_folder), "-p", prompt, "-s", "Paris",
                                       "--occurrence", "1", "-t", "Rome", "--layer", "1", "--tokens", "300",
                                       "--save", str(save)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    request = EditDelta.load(save).requests[0]  # the current target was filled in; the occurrence is kept
    assert request["prompt"] == "Paris is located in France {} is located in" and request["occurrence"] == 1
    assert request["target_true"] and EditRequest.from_dict(request).text == prompt


# ------------------------------------------------------------------- c: a non-Ray server at --cluster
def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


SETTINGS = frame(4, 0, 0)
GRPC_HEADERS = b"\x88@\x0ccontent-type\x10application/grpc"  # :status 200, content-type (HPACK)
CLUSTER_ID_REPLY = b"\n\x00\x12\x1c" + bytes(range(28))  # GetClusterIdReply: status {}, cluster_id (28 bytes)


def grpc_reply(message: bytes) -> bytes:
    return (frame(1, 0x4, 1, GRPC_HEADERS) + frame(0, 0, 1, b"\x00" + len(message).to_bytes(4, "big") + message)
            + frame(1, 0x5, 1, b"@\x0bgrpc-status\x010"))


def grpc_refusal(status: int) -> bytes:
    return frame(1, 0x5, 1, GRPC_HEADERS + b"\x00\x0bgrpc-status" + bytes([len(str(status))]) + str(status).encode())


class FakeServer:
    """Listens on 127.0.0.1; answers each connection's first bytes with `answer`, then keeps the
    connection open (saying nothing more) until the client closes it."""

    def __init__(self, answer: bytes):
        self.answer, self.sock = answer, socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(10)
                try:
                    request = connection.recv(65536)
                    self.requests.append(request)
                    connection.sendall(self.answer)
                    while connection.recv(65536):
                        pass
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.fixture()
def fake_server():
    servers = []

    def start(answer: bytes) -> FakeServer:
        servers.append(FakeServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_c_a_silent_http2_server_fails_within_3_seconds_in_the_cli(fake_server, tmp_path):
    server = fake_server(SETTINGS)  # what the old probe took for Ray: any HTTP/2 server's first frame
    began = time.monotonic()
    result = CliRunner().invoke(main, ["stats", "--layer", "0", "--cluster", server.address])
    assert time.monotonic() - began < 5  # ray.init took 24 s to give up
    assert result.exit_code == 2, result.output
    assert (f"error: {server.address} answers, but not as a Ray head node (no gRPC answer within 3 s)"
            in result.output)
    assert server.requests[0].startswith(b"PRI * HTTP/2.0")
    assert b"/ray.rpc.NodeInfoGcsService/GetClusterId" in server.requests[0]


@pytest.mark.parametrize("answer, reason", [
    (SETTINGS + frame(1, 0x5, 1, b"\x8d"), "an HTTP/2 server that is not a gRPC server"),  # :status 404
    (SETTINGS + frame(1, 0x4, 1, b"\x88") + frame(0, 1, 1, b"<html>hello</html>"), "not a Ray GCS reply"),
    (SETTINGS + grpc_refusal(12), "a gRPC server without Ray's GCS service"),  # UNIMPLEMENTED
    (SETTINGS + grpc_reply(b"\x08\x01"), "not a Ray GCS reply"),  # another service's message
    (SETTINGS + frame(7, 0, 0, bytes(8)), "closed the HTTP/2 connection"),  # GOAWAY
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "it does not speak HTTP/2"),
])
def test_c_other_servers_are_told_apart_at_once(fake_server, answer, reason):
    from factedit.cluster.connection import ClusterError, probe

    server = fake_server(answer)
    began = time.monotonic()
    with pytest.raises(ClusterError, match=f"answers, but not as a Ray head node .*{re.escape(reason)}"):
        probe(server.address)
    assert time.monotonic() - began < 2  # at once, not at the 3 s deadline


@pytest.mark.parametrize("answer", [
    SETTINGS + grpc_reply(CLUSTER_ID_REPLY),  # a Ray GCS's reply (as Ray 2.60's, recorded)
    SETTINGS + grpc_refusal(16),  # UNAUTHENTICATED: a Ray GCS with token authentication
])
def test_c_a_ray_gcs_passes_the_probe(fake_server, answer):
    from factedit.cluster.connection import probe

    probe(fake_server(answer).address)


# ------------------------------------------------------------------- d: byte fragments
def test_d_byte_fragments_are_shown_by_their_bytes(smollm2):
    tok = smollm2.tokenizer
    ids = tok(" 😀 東京", add_special_tokens=False)["input_ids"]
    labels = [token_label(tok, i) for i in ids]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # SmolLM2 splits both into byte fragments
    assert not any("\ufffd" in label for label in labels) and any("<0xF0>" in label for label in labels)
    # the labels spell the text's bytes: fragments as <0x..>, whole characters as themselves
    parts = re.split(r"(<0x[0-9A-F]{2}>)", "".join(labels))
    spelled = b"".join(bytes([int(p[3:5], 16)]) if re.fullmatch(r"<0x..>", p) else p.encode() for p in parts)
    assert spelled == " 😀 東京".encode()
    assert token_label(tok, tok(" Paris", add_special_tokens=False)["input_ids"][0]) == " Paris"
    assert len({token_label(tok, i) for i in ids if "\ufffd" in tok.decode([i])}) \
        == len({i for i in ids if "\ufffd" in tok.decode([i])})  # different fragments, different labels


def test_d_traces_label_fragments(smollm2):
    from factedit.trace.heatmap import result_of
    from factedit.trace.runs import prepare

    run = prepare(smollm2, "The emoji 😀 is called a", "The emoji", samples=1, answer="😀")
    assert "\ufffd" not in "".join(run.tokenized.tokens) and "<0xF0>" in "".join(run.tokenized.tokens)
    assert "<0xF0>" in run.answer and "\ufffd" not in run.answer
    fragment = next(i for i, t in enumerate(run.tokenized.tokens) if "<0x" in t)
    scores = torch.zeros(run.n_tokens, smollm2.n_layers).numpy()
    scores[fragment, 3] = 1.0
    summary = result_of(run, "hidden", 1, scores).summary()
    assert f"peak at token {fragment} {run.tokenized.tokens[fragment]!r}" in summary and "\ufffd" not in summary


class SentencePieceLike:
    """A tokenizer whose byte tokens are named <0xE6>, as SentencePiece's byte fallback names them."""

    def decode(self, ids):
        return {0: "\ufffd", 1: "\ufffd", 2: "▁Paris"}[ids[0]]

    def convert_ids_to_tokens(self, token_id):
        return {0: "<0xE6>", 1: "\ufffd", 2: "▁Paris"}[token_id]


def test_d_sentencepiece_byte_tokens_and_a_real_replacement_character():
    tok = SentencePieceLike()
    assert token_label(tok, 0) == "<0xE6>"
    assert token_label(tok, 1) == "\ufffd"  # the vocabulary's own U+FFFD stays what it is
    assert token_label(tok, 2) == "▁Paris"
