"""LoRA through the worker interface: the engine calls `add_lora` / `remove_lora`
/ `list_loras` / `pin_lora` on every rank; a platform whose worker lacks one
makes ``enable_lora=True`` fail at start-up naming the platform and the method;
under TP=2 (A/B sharded like their base layers) greedy output equals peft's."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import subprocess_env
from plugin_fixtures.helpers import write_manifest
from test_lora import ADAPTERS, GREEDY, KIB, PeftOracle, _prompts, make_adapter

from engine import LLM, LoRARequest

PLATFORM = '''
from engine.platforms import CpuPlatform, PlatformEnum
from engine.worker import Worker, WorkerBase


def detect():
    return "nolora.NoLoraPlatform"


class NoLoraPlatform(CpuPlatform):
    _enum = PlatformEnum.OOT
    device_name = "nolora"

    @classmethod
    def check_and_update_config(cls, config):
        super().check_and_update_config(config)
        config.parallel_config.worker_cls = "nolora.PartialWorker"


class PartialWorker(Worker):
    """The default worker with pin_lora left to WorkerBase, as a platform's
    worker written without it would be."""

    pin_lora = WorkerBase.pin_lora
'''

SCRIPT = """
import sys
from engine import LLM, SamplingParams

try:
    llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory=1 << 20,
              enable_lora=sys.argv[2] == "on")
except ValueError as exc:
    print("ValueError:", exc)
    raise SystemExit(0)
out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))
print("generated", len(out[0].outputs[0].token_ids))
"""


@pytest.fixture
def nolora(tmp_path):
    code = tmp_path / "plugin"
    code.mkdir()
    (code / "nolora.py").write_text(textwrap.dedent(PLATFORM))
    write_manifest(code, "nolora.toml",
                   [{"group": "platform", "name": "nolora", "value": "nolora:detect"}],
                   package='path = "."')
    return code


def test_platform_worker_without_pin_lora_fails_at_start(nolora, make_hf_model):
    model = make_hf_model("llama")
    results = {}
    for lora in ("off", "on"):
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(model), lora], capture_output=True, text=True,
            timeout=300, env=subprocess_env(ENGINE_PLUGIN_DIRS=str(nolora)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[lora] = proc.stdout.strip().splitlines()[-1]
    assert results["off"] == "generated 2"  # the worker itself serves
    assert results["on"] == (
        "ValueError: enable_lora=True: the platform 'nolora' runs the worker class "
        "nolora.PartialWorker, which does not implement pin_lora() (LoRA needs add_lora(), "
        "remove_lora(), list_loras(), pin_lora())")


@pytest.mark.slow
def test_tensor_parallel_lora_equals_peft(make_hf_model, tmp_path):
    base = make_hf_model("llama")
    loras = {name: LoRARequest(name, i + 1, str(make_adapter(base, tmp_path / name, i, **args)))
             for i, (name, args) in enumerate(ADAPTERS.items())}
    oracle = PeftOracle(base)
    prompts = _prompts(5, 11, seed=8)
    chosen = [loras["attn"], None, loras["mlp"], loras["all"], loras["attn"]]
    with LLM(base, dtype="float32", kv_cache_memory=1024 * KIB, tensor_parallel_size=2,
             enable_lora=True, max_loras=3, max_lora_rank=16) as llm:
        outputs = llm.generate(prompts, GREEDY, lora_request=chosen)
        assert llm.llm_engine.executor.collective_rpc("list_loras") == [{1, 2, 3}] * 2
    for i, (prompt, lora, out) in enumerate(zip(prompts, chosen, outputs, strict=True)):
        assert out.outputs[0].token_ids == oracle.greedy(lora, prompt), f"prompt {i}"
