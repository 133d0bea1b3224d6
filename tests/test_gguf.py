"""GGUF models end to end: a tiny random Llama written with the `gguf` package's
writer in several tensor types, loaded by the engine (config, tokenizer, chat
template and dequantized weights from the one file) and compared token for
token with transformers' own GGUF loading of the same file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import subprocess_env
from safetensors.torch import load_file

from engine import LLM, SamplingParams

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
PROMPT_IDS = [5, 17, 300, 42, 99, 7]
MAX_TOKENS = 8

# llama.cpp's tensor names, by Hugging Face name (layers: the part after model.layers.N.)
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# bytes per 256-value block and where its float16 scales sit, for the K-quant types
# the gguf package can read but not write: tests fill such blocks with random bits
_K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives query/key projections."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_k_quant(shape: tuple[int, int], qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random but well-formed blocks of a K-quant type: random quants, small scales."""
    block_bytes, scale_offsets = _K_BLOCKS[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scale = rng.uniform(2e-4, 1e-3, size=(rows, cols // 256)).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)


def sentencepiece_vocab(tokenizer_dir: Path, size: int = 700) -> dict:
    """A SentencePiece-style scored vocabulary (<unk>, <s>, </s>, 256 byte
    pieces, then "▁"-spelled pieces), trained offline on the tokenizer fixture's
    text, as llama.cpp writes one: no merges, a score per piece."""
    from conftest import _training_text
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer(add_prefix_space=True)
    trainer.train_from_iterator(_training_text(200_000), vocab_size=size, show_progress=False)
    learned = sorted(trainer.get_vocab().items(), key=lambda item: item[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.BYTE] * 256
    seen = set(tokens)
    for piece, _ in learned:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores,
            "bos": 1, "eos": 2, "unk": 0}


def write_gguf(model_dir: Path, out: Path, qtype: str = "F32", *, chat_template: str | None = None,
               seed: int = 0, arch: str = "llama", vocab: dict | None = None,
               pre: str = "default", k_blocks: Callable[[np.ndarray], np.ndarray] | None = None,
               qtypes: dict[str, str] | None = None) -> Path:
    """Write the Hugging Face-format Llama (or Qwen2, `arch="qwen2"`) `model_dir`
    as one GGUF file: config, byte-level BPE tokenizer, and the 2-D weights in
    `qtype` (norms and biases stay F32), or in ``qtypes[part]`` for the tensors of
    that part (``{"attn_v": "Q8_0"}``: several types in one file, as llama.cpp's
    mixed presets write). K-quant blocks are random unless `k_blocks` (float32
    [N, K] -> uint8 blocks) quantizes the real weights."""
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny-random-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(cfg["vocab_size"])
    if vocab is None:
        tokens = [""] * len(tok["model"]["vocab"])
        for text, i in tok["model"]["vocab"].items():
            tokens[i] = text
        types = [gguf.TokenType.NORMAL] * len(tokens)
        for added in tok["added_tokens"]:
            if added["special"]:
                types[added["id"]] = gguf.TokenType.CONTROL
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
        w.add_bos_token_id(cfg["bos_token_id"])
        w.add_eos_token_id(cfg["eos_token_id"])
        w.add_pad_token_id(cfg["pad_token_id"])
        w.add_add_bos_token(False)
    else:
        w.add_tokenizer_model(vocab["model"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_scores(vocab["scores"])
        w.add_bos_token_id(vocab["bos"])
        w.add_eos_token_id(vocab["eos"])
        w.add_unk_token_id(vocab["unk"])
        w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    default_qtype = qtype
    rng = np.random.default_rng(seed)
    for name, tensor in state.items():
        if name in _GLOBAL:
            gguf_name = _GLOBAL[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            part, suffix = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{_LAYER[part]}.{suffix}"
        values = tensor.float().numpy()
        qtype = next((t for part, t in (qtypes or {}).items() if f".{part}." in gguf_name),
                     default_qtype)
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        if arch == "llama" and ".attn_q." in gguf_name:  # only llama's converter reorders rows
            values = _llama_cpp_permute(values, cfg["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in gguf_name:
            values = _llama_cpp_permute(values, cfg["num_key_value_heads"])
        if values.ndim == 1 or qtype == "F32":
            w.add_tensor(gguf_name, values.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(gguf_name, values.astype(np.float16))
        elif qtype in _K_BLOCKS:
            blocks = (k_blocks(values.astype(np.float32)) if k_blocks is not None
                      else _random_k_quant(values.shape, qtype, rng))
            w.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=kind)
        else:
            quantized = gguf.quants.quantize(values, kind)
            w.add_tensor(gguf_name, quantized, raw_shape=quantized.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def transformers_greedy(gguf_path: Path, prompt: list[int], max_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                             min_new_tokens=max_tokens)
    return out[0, len(prompt):].tolist()


def engine_greedy(model: Path, prompt: list[int], max_tokens: int, **kwargs) -> list[int]:
    with LLM(str(model), dtype="float32", kv_cache_memory=1 << 22, **kwargs) as llm:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return llm.generate([prompt], params)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def small_llama(make_hf_model) -> Path:
    return make_hf_model("llama")


@pytest.fixture(scope="module")
def k_quant_llama(make_hf_model) -> Path:
    """Rows of 256 values: the block size of the K-quant types."""
    return make_hf_model("llama", hidden_size=256, intermediate_size=512)


# every type the gguf writer can quantize to (the rarer ones in the slow set)
@pytest.mark.parametrize("qtype", [
    "F32", "Q8_0", "Q4_0",
    *(pytest.param(q, marks=pytest.mark.slow) for q in ("F16", "BF16", "Q4_1", "Q5_0", "Q5_1")),
])
def test_greedy_equals_transformers_gguf_loading(small_llama, tmp_path, qtype):
    path = write_gguf(small_llama, tmp_path / f"tiny-{qtype}.gguf", qtype)
    expected = transformers_greedy(path, PROMPT_IDS, MAX_TOKENS)
    assert engine_greedy(path, PROMPT_IDS, MAX_TOKENS) == expected


# K-quant blocks the writer cannot produce from floats: random well-formed blocks
@pytest.mark.parametrize("qtype", [
    "Q4_K", *(pytest.param(q, marks=pytest.mark.slow) for q in ("Q5_K", "Q6_K")),
])
def test_k_quant_blocks_equal_transformers_gguf_loading(k_quant_llama, tmp_path, qtype):
    path = write_gguf(k_quant_llama, tmp_path / f"tiny-{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    assert reader.get_tensor(1).tensor_type.name in (qtype, "F32")
    expected = transformers_greedy(path, PROMPT_IDS, MAX_TOKENS)
    assert engine_greedy(path, PROMPT_IDS, MAX_TOKENS) == expected


@pytest.mark.parametrize("qtype", ["Q8_0", pytest.param("F32", marks=pytest.mark.slow)])
def test_qwen2_gguf_equals_transformers(make_hf_model, tmp_path, qtype):
    path = write_gguf(make_hf_model("qwen2"), tmp_path / f"qwen2-{qtype}.gguf", qtype, arch="qwen2")
    expected = transformers_greedy(path, PROMPT_IDS, MAX_TOKENS)
    assert engine_greedy(path, PROMPT_IDS, MAX_TOKENS) == expected


def test_tokenizer_and_chat_template_come_from_the_file(small_llama, tmp_path):
    path = write_gguf(small_llama, tmp_path / "chat.gguf", "Q8_0", chat_template=CHAT_TEMPLATE)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "def add(a, b):\n    return a + b  # ünïcode"
    messages = [{"role": "user", "content": "hello there"}]
    with LLM(str(path), dtype="float32", kv_cache_memory=1 << 22) as llm:
        tok = llm.get_tokenizer()
        assert tok.encode(text, add_special_tokens=False) == reference.encode(
            text, add_special_tokens=False)
        assert tok.decode(reference.encode(text, add_special_tokens=False)) == text
        assert tok.eos_token_id == 1 and tok.bos_token_id == 0
        assert tok.chat_template == CHAT_TEMPLATE
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered == "<s>user: hello there</s>\n<s>assistant:"
        out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 3


TEXTS = ["def add(a, b):\n    return a + b", "  two leading spaces, then\ttabs\n\n",
         "Zahlen 1234567 und Ünïcödé ✓ 你好", "it's we'll they'd", "x"]


def test_a_sentencepiece_vocabulary_tokenizes_as_transformers_does(
    make_hf_model, tokenizer_dir, tmp_path
):
    vocab = sentencepiece_vocab(tokenizer_dir)
    model = make_hf_model("llama", vocab_size=len(vocab["tokens"]), bos_token_id=1,
                          eos_token_id=2, pad_token_id=0)
    path = write_gguf(model, tmp_path / "spm.gguf", "Q8_0", vocab=vocab)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    with LLM(str(path), dtype="float32", kv_cache_memory=1 << 22) as llm:
        tok = llm.get_tokenizer()
        for text in TEXTS:
            ids = reference.encode(text)
            assert tok.encode(text) == ids, text
            assert ids[0] == 1 and any(3 <= i < 259 for i in tok.encode("你"))  # BOS, byte fallback
            assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        out = llm.generate([PROMPT_IDS], SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                        ignore_eos=True))
    assert out[0].outputs[0].token_ids == transformers_greedy(path, PROMPT_IDS, MAX_TOKENS)


def test_a_byte_level_vocabulary_splits_text_as_its_pre_tokenizer_says(small_llama, tmp_path):
    path = write_gguf(small_llama, tmp_path / "llama3-split.gguf", "Q8_0", pre="llama-bpe")
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    with LLM(str(path), dtype="float32", kv_cache_memory=1 << 22) as llm:
        tok = llm.get_tokenizer()
        for text in TEXTS:
            assert tok.encode(text, add_special_tokens=False) == reference.encode(
                text, add_special_tokens=False), text


def test_a_folder_with_one_gguf_file_is_a_model_and_two_are_refused(small_llama, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    path = write_gguf(small_llama, folder / "model.gguf", "Q8_0")
    expected = engine_greedy(path, PROMPT_IDS, 4)
    assert engine_greedy(folder, PROMPT_IDS, 4) == expected
    assert engine_greedy(folder, PROMPT_IDS, 4, load_format="gguf") == expected
    shutil.copy(path, folder / "other.gguf")
    with pytest.raises(ValueError, match=r"2 GGUF files \(model.gguf, other.gguf\)"):
        LLM(str(folder), dtype="float32")


def test_unknown_load_format_names_the_valid_ones(small_llama):
    with pytest.raises(ValueError, match=r"load_format 'onnx' is not registered.*safetensors.*gguf.*pt"):
        LLM(str(small_llama), load_format="onnx")


def test_an_unsupported_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"bert.gguf: GGUF architecture 'bert' is not supported"):
        LLM(str(tmp_path / "bert.gguf"))


def test_engine_generate_cli_runs_a_gguf_file(small_llama, tmp_path):
    path = write_gguf(small_llama, tmp_path / "cli.gguf", "Q4_0")
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", str(path), "--prompt",
         "def add(a, b):", "--max-tokens", "4", "--temperature", "0", "--dtype", "float32", "--json"],
        env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "def add(a, b):" in proc.stdout or proc.stdout.strip()
    with LLM(str(path), dtype="float32", kv_cache_memory=1 << 22) as llm:
        expected = llm.generate("def add(a, b):", SamplingParams(temperature=0, max_tokens=4))
    assert expected[0].outputs[0].text in proc.stdout
