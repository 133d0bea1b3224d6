"""Structured outputs: every request that finishes with "stop" satisfies its
constraint (JSON schemas checked with `jsonschema`, regexes with `re`, choices,
a GBNF grammar), in mixed batches, and unconstrained rows are left untouched."""

from __future__ import annotations

import json
import multiprocessing
import re
import threading

import jsonschema
import pytest

from engine.sampling_params import SamplingParams, StructuredOutputsParams

SCHEMAS = [
    {  # nested object, enum, required
        "type": "object",
        "properties": {
            "user": {"type": "object",
                     "properties": {"name": {"type": "string", "maxLength": 8},
                                    "role": {"enum": ["admin", "guest", "owner"]}},
                     "required": ["name", "role"], "additionalProperties": False},
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"], "additionalProperties": False,
    },
    {  # array of bounded integers
        "type": "object",
        "properties": {"ids": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                          "maximum": 999},
                               "minItems": 1, "maxItems": 4}},
        "required": ["ids"], "additionalProperties": False,
    },
    {  # array of objects with an enum and an optional field
        "type": "array", "maxItems": 3,
        "items": {"type": "object",
                  "properties": {"color": {"enum": ["red", "green", "blue"]},
                                 "size": {"type": "integer", "minimum": 1, "maximum": 9}},
                  "required": ["color"], "additionalProperties": False},
    },
    {"enum": ["alpha", "beta", 3, None]},
    {"type": "string", "pattern": "^[a-z]{2,5}$"},
]
PROMPTS = ["def f(x):", "import os\n", "class A:", "x = [", "# a comment\n"]


@pytest.fixture(scope="module")
def llm(make_hf_model):
    from engine import LLM

    llm = LLM(str(make_hf_model("llama")), dtype="float32", kv_cache_memory=2**23)
    yield llm
    llm.shutdown()


def _constrained(seed: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=160,
                          structured_outputs=StructuredOutputsParams(**kwargs))


def test_every_finished_json_output_validates(llm):
    params, expected = [], []
    for schema in SCHEMAS:
        for seed in range(4):
            params.append(_constrained(seed, json=schema))
            expected.append(schema)
    outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params)
    stopped = 0
    for out, schema in zip(outs, expected, strict=True):
        completion = out.outputs[0]
        if completion.finish_reason != "stop":
            continue
        stopped += 1
        jsonschema.validate(json.loads(completion.text), schema)
    assert stopped >= len(outs) * 3 // 4, [o.outputs[0].finish_reason for o in outs]


def test_schema_given_as_json_text_and_json_object(llm):
    outs = llm.generate(["a", "b", "c"], [
        _constrained(0, json=json.dumps(SCHEMAS[1])),
        SamplingParams(temperature=0, max_tokens=160,
                       structured_outputs=StructuredOutputsParams(json_object=True)),
        _constrained(2, json_object=True),
    ])
    jsonschema.validate(json.loads(outs[0].outputs[0].text), SCHEMAS[1])
    for out in outs[1:]:
        if out.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(out.outputs[0].text), dict)


def test_regex_choice_and_grammar(llm):
    regex = r"[0-9]{3}-[a-z]{2,4}(\.v[0-9])?"
    choices = ["yes", "no", "maybe later"]
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
    params = ([_constrained(s, regex=regex) for s in range(4)]
              + [_constrained(s, choice=choices) for s in range(4)]
              + [_constrained(s, grammar=grammar) for s in range(4)])
    outs = llm.generate(["x = "] * len(params), params)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0]
    texts = [o.outputs[0].text for o in outs]
    assert all(re.fullmatch(regex, t) for t in texts[:4]), texts[:4]
    assert all(t in choices for t in texts[4:8]), texts[4:8]
    assert all(re.fullmatch(r"\((\d|[1-9]\d)(\+(\d|[1-9]\d))*\)", t) for t in texts[8:]), \
        texts[8:]


def test_unconstrained_rows_are_untouched_in_a_mixed_batch(llm):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS[:2], plain)
    mixed = llm.generate(PROMPTS[:2] + ["q"], [plain, plain, _constrained(0, json=SCHEMAS[0])])
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [o.outputs[0].token_ids for o in alone]


def test_greedy_choice_finishes_with_one_of_the_choices(llm):
    outs = llm.generate(["x = "], SamplingParams(
        temperature=0, max_tokens=10,
        structured_outputs=StructuredOutputsParams(choice=["cat", "dog"])))
    assert outs[0].outputs[0].text in ("cat", "dog")
    assert outs[0].outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, field", [
    ({}, "exactly one"),
    ({"json": {"type": "object"}, "regex": "a"}, "exactly one"),
    ({"regex": "a("}, "regex"),
    ({"choice": []}, "choice"),
    ({"json": "{not json"}, "json"),
    ({"grammar": "root ::= ("}, "grammar"),
    ({"json": 3}, "json"),
])
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StructuredOutputsParams(**kwargs)
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})


@pytest.mark.parametrize("field, bad", [
    ("json", {"type": "nonsense"}),
    ("regex", "a{5,2}"),
    ("grammar", "start: undefined_rule"),
])
def test_params_broken_after_construction_are_refused_at_request_time(llm, field, bad):
    """StructuredOutputsParams checks itself when built; one changed afterwards is
    checked again (the structured-outputs processor's validate_params) when the
    request is made: ValueError naming the prompt and the field, nothing queued,
    and the other prompts of the engine still served."""
    good = _constrained(0, regex="[a-z]{2,4}")
    broken = _constrained(1, regex="[a-z]{2,4}")
    broken.structured_outputs.regex = None
    setattr(broken.structured_outputs, field, bad)
    with pytest.raises(ValueError, match=rf"prompt 1: .*StructuredOutputsParams\.{field}"):
        llm.generate(["x = ", "y = "], [good, broken])
    assert not llm.llm_engine.requests
    broken.structured_outputs.json_object = True  # two fields at once: also refused
    with pytest.raises(ValueError, match="prompt 0: .*exactly one"):
        llm.generate(["y = "], broken)
    out = llm.generate(["x = "], good)[0].outputs[0]
    assert out.finish_reason != "stop" or re.fullmatch("[a-z]{2,4}", out.text)


@pytest.mark.parametrize("field, value", [("stop", ["}"]), ("stop_token_ids", [5]),
                                          ("min_tokens", 3)])
def test_settings_that_would_break_the_guarantee_are_refused(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} cannot be combined"):
        SamplingParams(max_tokens=10, structured_outputs=StructuredOutputsParams(regex="a+"),
                       **{field: value})


def test_preempted_constrained_requests_resume_their_grammar(make_hf_model):
    """A KV cache too small for the batch preempts requests; a resumed request's
    matcher replays the tokens it already has, so finished outputs still validate."""
    from engine import LLM

    llm = LLM(str(make_hf_model("llama")), dtype="float32", kv_cache_memory=2**17,
              block_size=16, max_num_seqs=8)
    try:
        # about 60 tokens each: 8 of them do not fit in the 256-token cache together
        schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                  "minItems": 30, "maxItems": 30}
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=150,
                                 structured_outputs=StructuredOutputsParams(json=schema))
                  for s in range(8)]
        outs = llm.generate([f"# request {i}\n" for i in range(8)], params)
        assert llm.llm_engine.num_preemptions > 0
    finally:
        llm.shutdown()
    finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(finished) == 8
    for completion in finished:
        jsonschema.validate(json.loads(completion.text), schema)


# -------------------------------------------------------- compile time limit


@pytest.fixture
def compile_time_limit():
    from engine.structured_outputs import set_compile_time_limit

    yield set_compile_time_limit
    set_compile_time_limit(None)


def _patterned_schema(properties: int, tag: str) -> dict:
    # thousands of properties, each with its own pattern: seconds to compile
    return {"type": "object", "properties": {
        f"{tag}{i}": {"type": "string", "pattern": f"[a-z]{{1,9}}{i}"}
        for i in range(properties)}}


def test_a_compile_past_its_time_limit_is_killed_and_names_the_field(compile_time_limit):
    compile_time_limit(0.1)
    threads = threading.active_count()
    with pytest.raises(ValueError, match=r"^StructuredOutputsParams\.json did not compile "
                                         r"within 0\.1 s$"):
        StructuredOutputsParams(json=_patterned_schema(3000, "slow"))
    # nothing keeps compiling: no child process, no thread
    assert multiprocessing.active_children() == []
    assert threading.active_count() == threads


def test_a_grammar_compiled_in_a_child_is_the_one_compiled_here(compile_time_limit):
    from engine.structured_outputs.grammar import _compile_here, compile_grammar

    compile_time_limit(60)
    params = StructuredOutputsParams(json=_patterned_schema(3, "child"))
    assert compile_grammar(params) == _compile_here("json", json.dumps(params.json))
    with pytest.raises(ValueError, match=r"^StructuredOutputsParams\.regex"):
        StructuredOutputsParams(regex="(unclosed")
    assert multiprocessing.active_children() == []
