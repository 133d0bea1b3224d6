"""IncrementalDetokenizer and check_stop: text equals a full decode at every
step, multi-byte characters are never split, stop strings cut exactly, and
the finish rules (EOS, stop ids, max_tokens, min_tokens, context length)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer, load_tokenizer
from engine.tokenizer.detokenizer import (
    DetokenizerUpdate,
    IncrementalDetokenizer,
    StopDecision,
    check_stop,
)

EOS = 1


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return load_tokenizer(tokenizer_dir)


def run(tok, ids, prompt=(), **params) -> tuple[IncrementalDetokenizer, list[DetokenizerUpdate]]:
    """Feed `ids` until the sequence finishes; returns the detokenizer and the updates."""
    params.setdefault("max_tokens", max(len(ids), 1))
    detok = IncrementalDetokenizer(tok, list(prompt), SamplingParams(**params))
    updates = []
    for token_id in ids:
        updates.append(detok.update(token_id))
        if updates[-1].finished:
            break
    return detok, updates


# ------------------------------------------------------------ text = decode


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=0, max_value=1023), min_size=1, max_size=40),
       prompt_text=st.sampled_from(["", "x = 1", "中文 "]))
def test_text_is_the_full_decode_at_every_step(tok, ids, prompt_text):
    prompt = tok.encode(prompt_text)
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams(max_tokens=len(ids), ignore_eos=True))
    streamed = ""
    for step, token_id in enumerate(ids, start=1):
        streamed += detok.update(token_id).text_delta
        full = tok.decode(ids[:step])
        assert full.startswith(detok.output_text)
        if not full.endswith("\ufffd"):
            assert detok.output_text == full
    assert detok.finished and detok.finish_reason == "length"
    assert detok.output_text == streamed == tok.decode(ids)


def test_multibyte_characters_are_never_split(tok):
    text = "naïve café 🙂🚀 中文字符 ∑ done"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 2  # the tokenizer really splits characters
    detok, updates = run(tok, ids)
    assert all("\ufffd" not in u.text_delta for u in updates)
    assert any(u.text_delta == "" for u in updates)  # a character waited for its bytes
    assert "".join(u.text_delta for u in updates) == detok.output_text == text


def test_first_token_keeps_its_context_from_the_prompt(minilm_dir):
    wordpiece = load_tokenizer(minilm_dir)
    prompt = wordpiece.encode("the weather is")
    output = wordpiece.encode("nice today, isn't it?", add_special_tokens=False)
    detok, _ = run(wordpiece, output, prompt)
    full = wordpiece.decode(prompt + output)
    assert full == wordpiece.decode(prompt) + detok.output_text
    assert detok.output_text.startswith(" nice")


def test_skip_special_tokens_false_keeps_them(tok):
    ids = [0, *tok.encode("hi")]
    detok, _ = run(tok, ids, skip_special_tokens=False)
    assert detok.output_text == "<s>hi"
    detok, _ = run(tok, ids)
    assert detok.output_text == "hi"


def test_decode_window_stays_short(tokenizer_dir):
    """Each step decodes a few ids, not the whole output."""
    widths: list[int] = []

    class CountingTokenizer(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            widths.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    base = load_tokenizer(tokenizer_dir)
    counting = CountingTokenizer.__new__(CountingTokenizer)
    counting.__dict__.update(base.__dict__)
    ids = base.encode("import os\n" * 300 + "中文🙂" * 20)
    detok, _ = run(counting, ids)
    assert detok.output_text == base.decode(ids)
    assert len(ids) > 500 and max(widths) <= 12


# ---------------------------------------------------------------- stop strings


def test_stop_string_spanning_tokens_cuts_exactly(tok):
    text = "alpha beta gamma delta"
    ids = tok.encode(text)
    detok, updates = run(tok, ids, stop=["ta gam"])
    assert detok.output_text == "alpha be"
    assert (detok.finish_reason, detok.stop_reason) == ("stop", "ta gam")
    assert updates[-1].finished and updates[-1].stop_reason == "ta gam"
    assert "".join(u.text_delta for u in updates) == "alpha be"
    assert len(detok.token_ids) < len(ids)


def test_streamed_text_never_runs_past_a_later_cut(tok):
    ids = tok.encode("one two three four five")
    detok, updates = run(tok, ids, stop=["three four", "xyz"])
    streamed = ""
    for u in updates:
        streamed += u.text_delta
        assert "one two ".startswith(streamed)
    assert streamed == detok.output_text == "one two "


def test_include_stop_str_in_output(tok):
    detok, _ = run(tok, tok.encode("alpha beta gamma delta"), stop="beta",
                   include_stop_str_in_output=True)
    assert detok.output_text == "alpha beta"


def test_earliest_stop_string_wins(tok):
    detok, _ = run(tok, tok.encode("x = foo(bar)"), stop=["bar", "foo(bar"])
    assert detok.output_text == "x = " and detok.stop_reason == "foo(bar"


def test_stop_string_inside_a_multibyte_run(tok):
    detok, _ = run(tok, tok.encode("价格：中文字符，结束"), stop="字符")
    assert detok.output_text == "价格：中文"


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode("ab ab ab ab ab ab")  # "ab", " ab", " ab", ...
    detok, _ = run(tok, ids, stop="ab", min_tokens=3)
    assert (detok.finish_reason, detok.stop_reason) == ("stop", "ab")
    assert len(detok.token_ids) == 3 and detok.output_text == "ab ab "


# -------------------------------------------------------------- token rules


def test_eos_stops_and_is_not_in_the_text(tok):
    ids = [*tok.encode("done"), EOS, *tok.encode(" more")]
    detok, updates = run(tok, ids, max_tokens=50)
    assert (detok.finish_reason, detok.stop_reason) == ("stop", None)
    assert detok.token_ids[-1] == EOS and detok.output_text == "done"
    assert updates[-1] == DetokenizerUpdate("", True, "stop", None)


def test_ignore_eos_runs_to_max_tokens(tok):
    ids = [*tok.encode("a"), EOS, *tok.encode("bc")]
    detok, _ = run(tok, ids, ignore_eos=True)
    assert detok.finish_reason == "length" and detok.token_ids == ids


def test_stop_token_id_is_the_stop_reason(tok):
    stop_id = tok.encode(" x")[0]
    ids = [*tok.encode("y ="), stop_id, *tok.encode("z")]
    detok, _ = run(tok, ids, stop_token_ids=[stop_id], max_tokens=20)
    assert (detok.finish_reason, detok.stop_reason) == ("stop", stop_id)
    assert detok.output_text == "y ="
    detok, _ = run(tok, ids, stop_token_ids=[stop_id], max_tokens=20,
                   include_stop_str_in_output=True)
    assert detok.output_text == "y = x"


def test_max_tokens_gives_length(tok):
    ids = tok.encode("the quick brown fox jumps over")
    detok, updates = run(tok, ids, max_tokens=3)
    assert len(detok.token_ids) == 3 and detok.finish_reason == "length"
    assert detok.output_text == tok.decode(ids[:3])
    assert [u.finished for u in updates] == [False, False, True]


def test_max_model_len_gives_length(tok):
    detok = IncrementalDetokenizer(tok, [5, 6, 7], SamplingParams(max_tokens=None),
                                   max_model_len=5)
    assert detok.add(40) is None
    assert detok.add(41) == StopDecision("length")


def test_min_tokens_delays_eos(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(min_tokens=2))
    assert detok.add(EOS) is None
    assert detok.add(EOS) == StopDecision("stop", None)


def test_adding_after_finish_is_an_error(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=1))
    detok.add(50)
    with pytest.raises(RuntimeError, match="already finished"):
        detok.add(51)


def test_check_stop_without_text():
    params = SamplingParams(max_tokens=4, stop_token_ids=[9])
    assert check_stop([], params, {1}) is None
    assert check_stop([3], params, {1}) is None
    assert check_stop([3, 1], params, {1}) == StopDecision("stop", None)
    assert check_stop([3, 9], params, {1}) == StopDecision("stop", 9)
    assert check_stop([3, 4, 5, 6], params, {1}) == StopDecision("length")
    assert check_stop([3, 4, 5, 1], params, {1}) == StopDecision("stop", None)
    assert check_stop([3], SamplingParams(max_tokens=None), {1}, prompt_len=9,
                      max_model_len=10) == StopDecision("length")


def test_a_character_split_across_prompt_and_output_lands_in_the_output(tok):
    ids = tok.encode("中x")
    assert len(tok.encode("中")) > 1  # the character spans several byte tokens
    cut = len(tok.encode("中")) - 1
    detok, updates = run(tok, ids[cut:], ids[:cut])
    assert detok.output_text == "中x"
    assert "\ufffd" not in "".join(u.text_delta for u in updates)
