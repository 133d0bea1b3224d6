"""The embedded default model: a real Hugging Face model that ships in the package,
is what `LLM()` and `engine generate` use without a model, and greedy-decodes
exactly as `transformers` does."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "engine" / "default_model"
SCRIPT = ROOT / "scripts" / "train_default_model.py"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "README.md",
)
PROMPTS = ["import ", "def fibonacci(n):", "class Stack:\n    def __init__(self):"]
MAX_TOKENS = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hf_model():
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json"))


@pytest.fixture(scope="module")
def default_llm():
    from engine import LLM

    return LLM(dtype="float32")  # compared with transformers in float32


# Python the model never saw (written for this test), to measure its loss on
PYTHON_SAMPLE = '''import os
import sys


def read_lines(path):
    """Return the lines of a file without their newlines."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    def __init__(self):
        self.count = 0

    def add(self, value=1):
        self.count += value
        return self.count


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(name, len(read_lines(name)))
'''


def hf_greedy(model, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    import torch

    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
        )
    return out[0, len(ids):].tolist()  # keeps the EOS it stopped on, as the engine does


# ------------------------------------------------------------- the folder


def test_folder_has_every_file_and_is_small():
    missing = [name for name in REQUIRED_FILES if not (DEFAULT_MODEL / name).is_file()]
    assert not missing, f"{DEFAULT_MODEL} lacks {missing}"
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file())
    assert size < 25 * 1024 * 1024, f"{DEFAULT_MODEL} is {size / 1e6:.1f} MB"


def test_config_declares_llama_and_its_dtype():
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float32"
    generation = json.loads((DEFAULT_MODEL / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 1
    assert generation["bos_token_id"] == config["bos_token_id"] == 0


def test_model_card_reports_held_out_loss_and_command():
    card = (DEFAULT_MODEL / "README.md").read_text()
    assert re.search(r"held-out loss \| \d+\.\d+ nats/token", card)
    assert "scripts/train_default_model.py" in card


def test_tokenizer_round_trips_any_text(hf_tokenizer):
    text = "def f(x):\n\treturn x ** 2  # ünïcödé ✓ 漢字 \x00\r\n"
    ids = hf_tokenizer.encode(text, add_special_tokens=False).ids
    assert hf_tokenizer.decode(ids) == text
    assert [hf_tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>")] == [0, 1, 2]


def test_loads_with_transformers_and_predicts_unseen_python(hf_model, hf_tokenizer):
    import math

    import torch

    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert 1_000_000 < hf_model.num_parameters() < 10_000_000
    ids = torch.tensor([hf_tokenizer.encode(PYTHON_SAMPLE).ids])
    with torch.no_grad():
        loss = hf_model(ids, labels=ids).loss.item()
    # an untrained model scores about ln(vocab); the trained one is far below
    # (2.8 nats/token when this test was written; the card's held-out figure is 4.2)
    assert loss < 4.5 < math.log(hf_model.config.vocab_size), loss


# ------------------------------------------------------- through the engine


def test_engine_generate_without_model_prints_transformers_greedy(hf_model, hf_tokenizer):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--prompt", "import ",
         "--max-tokens", "16", "--temperature", "0", "--dtype", "float32"],
        capture_output=True, text=True, timeout=120, env=subprocess_env(OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr
    # it prints the prompt followed by the completion
    expected = hf_tokenizer.decode(hf_greedy(hf_model, hf_tokenizer, "import ", 16))
    assert proc.stdout == f"import {expected}\n"


def test_llm_without_model_samples_reproducibly(default_llm):
    from engine import SamplingParams

    params = SamplingParams(max_tokens=8, seed=0, ignore_eos=True)
    outputs = default_llm.generate(["import ", "def "], params)
    assert [o.prompt for o in outputs] == ["import ", "def "]
    assert [len(o.outputs[0].token_ids) for o in outputs] == [8, 8]
    again = default_llm.generate(["def "], params)[0].outputs[0]
    assert again.token_ids == outputs[1].outputs[0].token_ids
    assert again.text == outputs[1].outputs[0].text != ""
    other = default_llm.generate(["def "], SamplingParams(max_tokens=8, seed=1, ignore_eos=True))
    assert other[0].outputs[0].token_ids != again.token_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_equals_transformers(default_llm, hf_model, hf_tokenizer, prompt):
    from engine import SamplingParams

    expected = hf_greedy(hf_model, hf_tokenizer, prompt, MAX_TOKENS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    got = default_llm.generate(prompt, params)[0].outputs[0]
    assert list(got.token_ids) == expected
    assert got.text == hf_tokenizer.decode(expected)


# ------------------------------------------------------ the training script


def _train_tiny(out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, str(SCRIPT), "--out", str(out), "--seed", "3", "--steps", "2",
        "--max-files", "12", "--val-every", "4", "--vocab-size", "300",
        "--tokenizer-bytes", "100000", "--hidden", "32", "--intermediate", "64",
        "--layers", "1", "--heads", "2", "--kv-heads", "1", "--seq-len", "32",
        "--context", "64", "--batch-size", "2", "--eval-windows", "2", "--log-every", "1",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_training_script_is_deterministic(tmp_path):
    # two fresh processes, side by side: most of each one's time is importing transformers
    procs = [_train_tiny(tmp_path / name) for name in ("a", "b")]
    logs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        logs.append(stdout)

    def digest(folder: Path, name: str) -> str:
        return hashlib.sha256((folder / name).read_bytes()).hexdigest()

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(tmp_path / "a", name) == digest(tmp_path / "b", name), name
    losses = [re.findall(r"loss (\d+\.\d+)", log) for log in logs]
    assert losses[0] and losses[0] == losses[1]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "a").num_parameters() > 0
