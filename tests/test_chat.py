"""`LLM.chat`: the prompt is the model's own chat template rendered exactly as
transformers' `apply_chat_template` renders and tokenizes it (ChatML-style
template in tokenizer_config.json, Llama-3-style one in chat_template.jinja)."""

from __future__ import annotations

import pytest
from chat_models import VOCAB_SIZE, build_chat_model

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "You answer in Python."},
     {"role": "user", "content": "  Sort a list  "}],
    [{"role": "user", "content": "x = 1"}, {"role": "assistant", "content": "y = 2"},
     {"role": "user", "content": "é ü <|im_start|> \n\n tabs\t"}],
]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def chat_model(request, make_hf_model, tokenizer_dir, tmp_path_factory):
    base = make_hf_model("llama", vocab_size=VOCAB_SIZE)
    return build_chat_model(request.param, base, tokenizer_dir,
                            tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def chat_llm(chat_model):
    from engine import LLM

    llm = LLM(str(chat_model), dtype="float32", kv_cache_memory=2**22)
    yield llm
    llm.shutdown()


def _hf_ids(model_dir, conversation, add_generation_prompt=True, chat_template=None):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                   chat_template=chat_template, tokenize=True,
                                   return_dict=False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_prompt_ids_equal_transformers_apply_chat_template(chat_llm, chat_model,
                                                           add_generation_prompt):
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=2)
    outs = chat_llm.chat(CONVERSATIONS, params, add_generation_prompt=add_generation_prompt)
    assert len(outs) == len(CONVERSATIONS)
    for conversation, out in zip(CONVERSATIONS, outs, strict=True):
        expected = _hf_ids(chat_model, conversation, add_generation_prompt)
        assert out.prompt_token_ids == expected
        assert out.prompt == chat_llm.get_tokenizer().decode(expected, skip_special_tokens=False)
    # one conversation (not a list of them) gives one output
    single = chat_llm.chat(CONVERSATIONS[0], params, add_generation_prompt=add_generation_prompt)
    assert len(single) == 1 and single[0].prompt_token_ids == outs[0].prompt_token_ids


def test_bos_written_once_by_llama3_template(chat_llm, chat_model):
    tok = chat_llm.get_tokenizer()
    ids = tok.apply_chat_template(CONVERSATIONS[0])
    if (chat_model / "chat_template.jinja").is_file():
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_chat_greedy_reply_equals_generate_on_the_same_ids(chat_llm):
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    chat = chat_llm.chat(CONVERSATIONS[1], params)[0]
    plain = chat_llm.generate([chat.prompt_token_ids], params)[0]
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids


def test_chat_template_argument_overrides_the_models(chat_llm, chat_model):
    from engine import SamplingParams

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    out = chat_llm.chat(CONVERSATIONS[2], SamplingParams(max_tokens=1), chat_template=template)
    assert out[0].prompt_token_ids == _hf_ids(chat_model, CONVERSATIONS[2],
                                              chat_template=template)


def test_model_without_template_gets_a_clear_error(make_hf_model):
    from engine import LLM

    llm = LLM(str(make_hf_model("llama")), dtype="float32", kv_cache_memory=2**22)
    try:
        with pytest.raises(ValueError, match="has no chat template.*chat_template="):
            llm.chat([{"role": "user", "content": "hi"}])
    finally:
        llm.shutdown()


def test_bad_messages_name_the_problem(chat_llm):
    with pytest.raises(ValueError, match="conversation 1"):
        chat_llm.chat([[{"role": "user", "content": "a"}], "not a conversation"])
