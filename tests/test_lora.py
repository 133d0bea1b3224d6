"""LoRA adapters against `peft` as the oracle.

Three random adapters made by peft (`get_peft_model` + `save_pretrained`) with
different ranks, scalings (rsLoRA too) and target modules, on a tiny random
Llama: greedy tokens in float32 equal `PeftModel`'s, each adapter alone and all
three mixed with the base model in one batch; the prefix cache never hands one
adapter's blocks to another; bad adapters fail with the adapter and field named
and the engine keeps serving.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import peft
import pytest
import torch
import transformers

from engine import LLM, LoRARequest, SamplingParams

MAX_TOKENS = 12
KIB = 1024
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# name -> peft.LoraConfig arguments: ranks 4, 8, 16; plain, rsLoRA and a
# per-module rank/alpha; attention only, MLP only, every projection
ADAPTERS = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "mlp": dict(r=8, lora_alpha=16, use_rslora=True,
                target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all": dict(r=16, lora_alpha=24, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"],
                rank_pattern={"o_proj": 6}, alpha_pattern={"down_proj": 40}),
}


def make_adapter(base_dir: Path, out: Path, seed: int, **lora_args) -> Path:
    """A peft adapter folder with random (non-zero) A and B."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **lora_args))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # big enough to change greedy choices
                param.copy_(torch.randn_like(param) * 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_dir(make_hf_model):
    return make_hf_model("llama")


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> dict[str, LoRARequest]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: LoRARequest(name, i + 1, str(make_adapter(llama_dir, root / name, i, **args)))
            for i, (name, args) in enumerate(ADAPTERS.items())}


class PeftOracle:
    """PeftModel's greedy continuation (None: the base model), cached."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.models: dict = {}

    def greedy(self, lora: LoRARequest | None, prompt: list[int]) -> list[int]:
        key = None if lora is None else lora.path
        if key not in self.models:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                self.base_dir, dtype=torch.float32)
            if lora is not None:
                model = peft.PeftModel.from_pretrained(model, lora.path)
            self.models[key] = model.eval()
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = self.models[key].generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, pad_token_id=2)
        return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def oracle(llama_dir) -> PeftOracle:
    return PeftOracle(llama_dir)


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(llama_dir, dtype="float32", kv_cache_memory=2048 * KIB, enable_lora=True,
             max_loras=3, max_lora_rank=16, max_cpu_loras=4) as llm:
        yield llm


def _prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1024) for _ in range(length)] for _ in range(count)]


def test_each_adapter_alone_equals_peft(llm, adapters, oracle):
    (prompt,) = _prompts(1, 21, seed=1)
    base = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert base == oracle.greedy(None, prompt)
    for name, lora in adapters.items():
        got = llm.generate([prompt], GREEDY, lora_request=lora)[0].outputs[0].token_ids
        assert got == oracle.greedy(lora, prompt), name
        assert got != base, f"adapter {name} changed nothing: the test would prove nothing"


def test_adapters_and_base_mixed_in_one_batch(llm, adapters, oracle):
    prompts = _prompts(8, 13, seed=2)
    loras = [adapters["attn"], None, adapters["mlp"], adapters["all"],
             adapters["all"], adapters["attn"], None, adapters["mlp"]]
    outputs = llm.generate(prompts, GREEDY, lora_request=loras)
    for i, (prompt, lora, out) in enumerate(zip(prompts, loras, outputs, strict=True)):
        assert out.outputs[0].token_ids == oracle.greedy(lora, prompt), f"prompt {i}"


def test_stream_and_chat_take_an_adapter(llm, adapters, oracle):
    (prompt,) = _prompts(1, 9, seed=3)
    lora = adapters["mlp"]
    *_, last = llm.generate_stream(prompt, GREEDY, lora_request=lora)
    assert last.outputs[0].token_ids == oracle.greedy(lora, prompt)


def test_prefix_cache_never_crosses_adapters(llm, adapters, oracle):
    (prompt,) = _prompts(1, 40, seed=4)  # several full blocks of 16
    kv = llm.llm_engine.scheduler.kv_cache
    first = llm.generate([prompt], GREEDY)[0]
    seen = dict(kv.cached_blocks)
    for lora in adapters.values():
        out = llm.generate([prompt], GREEDY, lora_request=lora)[0]
        assert out.num_cached_tokens == 0, f"{lora.name} took another adapter's blocks"
        assert out.outputs[0].token_ids == oracle.greedy(lora, prompt)
    # the same adapter again does hit its own blocks
    again = llm.generate([prompt], GREEDY, lora_request=adapters["attn"])[0]
    assert again.num_cached_tokens >= 32
    assert again.outputs[0].token_ids == oracle.greedy(adapters["attn"], prompt)
    assert llm.generate([prompt], GREEDY)[0].outputs[0].token_ids == \
        first.outputs[0].token_ids
    assert seen  # the base prompt's blocks were cached, under keys of their own


def test_more_adapters_than_slots_take_turns(llama_dir, adapters, oracle):
    """max_loras=1: a batch of three adapters runs one adapter per step, each
    exact; pinning keeps one adapter resident."""
    prompts = _prompts(4, 7, seed=5)
    loras = [adapters["attn"], adapters["mlp"], None, adapters["all"]]
    with LLM(llama_dir, dtype="float32", kv_cache_memory=1024 * KIB, enable_lora=True,
             max_loras=1, max_lora_rank=16, max_cpu_loras=1) as small:
        outputs = small.generate(prompts, GREEDY, lora_request=loras)
        for i, (prompt, lora, out) in enumerate(zip(prompts, loras, outputs, strict=True)):
            assert out.outputs[0].token_ids == oracle.greedy(lora, prompt), f"prompt {i}"
        engine = small.llm_engine
        assert engine.pin_lora(adapters["all"].int_id)
        assert engine.executor.collective_rpc("list_loras")[0] == {adapters["all"].int_id}
        assert engine.remove_lora(adapters["all"].int_id)
        assert not engine.remove_lora(adapters["all"].int_id)


# ---------------------------------------------------------------------- errors


def _copy_adapter(src: LoRARequest, dst: Path, int_id: int, edit=None) -> LoRARequest:
    dst.mkdir()
    config = json.loads((Path(src.path) / "adapter_config.json").read_text())
    if edit:
        edit(config)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    (dst / "adapter_model.safetensors").write_bytes(
        (Path(src.path) / "adapter_model.safetensors").read_bytes())
    return LoRARequest(dst.name, int_id, str(dst))


def test_bad_adapters_name_adapter_and_field(llm, adapters, oracle, tmp_path,
                                             make_hf_model):
    (prompt,) = _prompts(1, 9, seed=6)
    # a request running when the bad ones arrive keeps running
    stream = llm.generate_stream(prompt, GREEDY, lora_request=adapters["attn"])
    first = next(stream)

    too_big = _copy_adapter(adapters["all"], tmp_path / "big", 50)
    missing = LoRARequest("gone", 51, str(tmp_path / "nowhere"))
    corrupt = _copy_adapter(adapters["attn"], tmp_path / "corrupt", 52)
    (Path(corrupt.path) / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    no_config = _copy_adapter(adapters["attn"], tmp_path / "noconfig", 53)
    (Path(no_config.path) / "adapter_config.json").unlink()
    lacking = _copy_adapter(adapters["attn"], tmp_path / "lacking", 54,
                            lambda c: c.update(target_modules=["q_proj", "c_attn"]))
    other_dir = make_hf_model("llama", hidden_size=32, intermediate_size=64)
    other = LoRARequest("other", 55, str(make_adapter(other_dir, tmp_path / "other", 9,
                                                      **ADAPTERS["attn"])))
    deeper_dir = make_hf_model("llama", num_hidden_layers=3)
    deeper = LoRARequest("deeper", 56, str(make_adapter(deeper_dir, tmp_path / "deeper", 9,
                                                        **ADAPTERS["attn"])))
    cases = [
        (missing, "does not exist"),
        (corrupt, "adapter_model.safetensors cannot be read"),
        (no_config, "adapter_config.json is missing"),
        (lacking, "target_modules names 'c_attn'"),
        (other, "input features"),
        (deeper, "num_hidden_layers=2"),
    ]
    with _lowered_max_rank(llm, 8):
        cases.insert(0, (too_big, "r=16 is larger than max_lora_rank=8"))
        for lora, words in cases:
            with pytest.raises(ValueError) as info:
                llm.llm_engine.add_request(prompt, GREEDY, lora_request=lora)
            assert repr(lora.name) in str(info.value) and words in str(info.value), \
                str(info.value)
    with pytest.raises(ValueError, match="int_id 1 is already used by adapter 'attn'"):
        llm.generate([prompt], GREEDY, lora_request=LoRARequest("x", 1, adapters["mlp"].path))
    *_, last = stream
    assert first.outputs[0].token_ids and last.finished
    assert last.outputs[0].token_ids == oracle.greedy(adapters["attn"], prompt)
    assert llm.llm_engine.num_unfinished_requests() == 0


class _lowered_max_rank:  # noqa: N801 (used as a context manager)
    """Lower the running engine's max_lora_rank for a moment (the worker reads
    it when an adapter is added)."""

    def __init__(self, llm: LLM, rank: int) -> None:
        self.config = llm.llm_engine.executor.worker.model_runner.lora.config
        self.rank = rank

    def __enter__(self) -> None:
        self.saved, self.config.max_lora_rank = self.config.max_lora_rank, self.rank

    def __exit__(self, *exc: object) -> None:
        self.config.max_lora_rank = self.saved


def test_lora_request_without_enable_lora(llama_dir, adapters):
    with LLM(llama_dir, dtype="float32", kv_cache_memory=512 * KIB) as plain:
        with pytest.raises(ValueError, match="enable_lora=True"):
            plain.generate([[5, 6, 7]], GREEDY, lora_request=adapters["attn"])


def test_metrics_label_requests_by_adapter(llama_dir, adapters):
    """vLLM's lora_requests_info: the running adapters' names in a label."""
    from prometheus_client import generate_latest

    with LLM(llama_dir, dtype="float32", kv_cache_memory=512 * KIB, enable_lora=True,
             max_loras=2, max_lora_rank=16, log_stats=True) as llm:
        registry = llm.llm_engine.stat_loggers.prometheus_registry
        stream = llm.generate_stream([5, 6, 7], GREEDY, lora_request=adapters["mlp"])
        next(stream)  # running now
        text = generate_latest(registry).decode()
        stream.close()
    line = next(x for x in text.splitlines() if x.startswith("engine_lora_requests_info{"))
    assert 'max_lora="2"' in line and 'running_lora_adapters="mlp"' in line, line
