import pytest

from factedit.tokens import PromptError, SubjectWarning, answer_matches, subject_token_range, tokenize_prompt


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.tokenizer


def locate(tok, prompt, subject):
    t = tokenize_prompt(tok, prompt, subject)
    start, end = t.subject_range
    return t.tokens[start:end], t


def test_subject_split_oddly_by_bpe(tok):
    tokens, t = locate(tok, "The Eiffel Tower is located in the city of", "Eiffel Tower")
    assert tokens == [" E", "iffel", " Tower"]  # the leading space sits inside the first subject token
    tokens, _ = locate(tok, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    assert tokens == ["The", " E", "iffel", " Tower"]


def test_leading_and_trailing_spaces_in_the_subject_do_not_matter(tok):
    prompt = "The Space Needle is in downtown"
    assert locate(tok, prompt, " Space Needle")[0] == locate(tok, prompt, "Space Needle ")[0]
    assert "".join(locate(tok, prompt, "Space Needle")[0]).strip() == "Space Needle"


def test_subject_inside_a_token_and_at_the_end(tok):
    tokens, t = locate(tok, "Apple's chief executive is Tim Cook", "Tim Cook")
    assert "".join(tokens).strip() == "Tim Cook" and t.subject_range[1] == t.n_tokens
    tokens, _ = locate(tok, "Audible.com is owned by", "Audible.com")
    assert "".join(tokens) == "Audible.com"


def test_first_occurrence_is_used_with_a_warning_unless_one_is_chosen(tok):
    prompt = "Paris is the capital of France, and Paris is"
    with pytest.warns(SubjectWarning, match="occurs 2 times"):
        _, t = locate(tok, prompt, "Paris")
    assert t.subject_range == (0, 1)
    second = tokenize_prompt(tok, prompt, "Paris", occurrence=1)
    assert second.tokens[second.subject_range[0]:second.subject_range[1]] == [" Paris"]
    assert second.subject_range[0] > 1


def test_a_whole_word_is_preferred_to_a_match_inside_a_word(tok):
    prompt = "Parisian cafes are the pride of Paris"
    tokens, t = locate(tok, prompt, "Paris")
    assert tokens == [" Paris"] and t.subject_range[1] == t.n_tokens
    with pytest.warns(SubjectWarning, match="only inside a word"):
        tokens, _ = locate(tok, "Parisian cafes", "Paris")
    assert "".join(tokens).startswith("Paris")


def test_slow_tokenizer_fallback_matches_offsets(tok):
    """Without offset mappings the spans come from decoding prefixes; both agree."""
    prompt, subject = "Vinson Massif is located in the continent of", "Vinson Massif"
    ids = list(tok(prompt)["input_ids"])

    class NoOffsets:
        def __call__(self, text, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError
            return tok(text)

        def decode(self, ids, **kwargs):
            return tok.decode(ids, **kwargs)

    assert subject_token_range(NoOffsets(), prompt, subject, ids) == subject_token_range(tok, prompt, subject, ids)


def test_errors(tok):
    with pytest.raises(PromptError, match="does not occur"):
        tokenize_prompt(tok, "The Eiffel Tower is in", "Louvre")
    with pytest.raises(PromptError, match="capitalisation"):
        tokenize_prompt(tok, "The Eiffel Tower is in", "eiffel tower")
    with pytest.raises(PromptError, match="empty"):
        tokenize_prompt(tok, "   ", "x")
    with pytest.raises(PromptError, match="at most 8"):
        tokenize_prompt(tok, "The Eiffel Tower is located in the city of Paris France", "Eiffel", max_tokens=8)


def test_answer_matches():
    assert answer_matches(" Par", "Paris") and answer_matches(" Paris", "Paris")
    assert not answer_matches(" London", "Paris") and not answer_matches(" ", "Paris")


@pytest.mark.slow
def test_targets_tokenise_as_continuations_of_their_prompts(smollm2, data_dir):
    """Prompt and target tokenised apart (as editing and scoring do) give the ids of the two together:
    the leading space of a target is where a BPE tokenizer puts it after a word or a "?"."""
    from factedit.data import load_counterfact
    from factedit.data.zsre import load_zsre
    from factedit.request import target_ids

    records = (load_zsre(data_dir / "zsre" / "zsre_train_1k.json", 200)
               + load_counterfact(data_dir / "counterfact" / "counterfact_dev.json", 100))
    tokenizer = smollm2.tokenizer
    for record in records:
        request = record.request
        apart = list(tokenizer(request.text)["input_ids"]) + target_ids(tokenizer, request.target_new)
        assert apart == list(tokenizer(request.text + request.target_new)["input_ids"]), request
