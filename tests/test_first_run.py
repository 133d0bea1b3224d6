"""A new user's first commands: the model as a positional argument, sizes with
units, a KV cache sized to the model and allocated lazily, what the engine says at
start-up (KV-cache decision, kernel build, out-of-tree plugins), help texts, and an
empty completion explained."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chat_models import VOCAB_SIZE, build_chat_model
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def _engine(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=180, env=subprocess_env(**env))


# ------------------------------------------------------------------ item 5: MODEL


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_model_is_accepted_as_a_positional_argument(command):
    from engine.cli.common import resolve_model_argument
    from engine.cli.main import build_parser

    extra = ["--prompt", "x"] if command == "generate" else []
    args = build_parser().parse_args([command, "some/model", *extra])
    resolve_model_argument(args, command)
    assert args.model == "some/model"
    same = build_parser().parse_args([command, "some/model", "--model", "some/model", *extra])
    resolve_model_argument(same, command)
    assert same.model == "some/model"
    both = build_parser().parse_args([command, "a/model", "--model", "b/model", *extra])
    with pytest.raises(ValueError, match=r"given twice.*'a/model'.*--model \('b/model'\)"):
        resolve_model_argument(both, command)


def test_generate_with_a_positional_model_folder(make_hf_model):
    model = str(make_hf_model("llama"))
    proc = _engine("generate", model, "--prompt", "x = 1", "--max-tokens", "3",
                   "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("x = 1")
    clash = _engine("generate", model, "--model", str(ROOT), "--prompt", "x")
    assert clash.returncode == 1 and "given twice" in clash.stderr


@pytest.mark.parametrize("args,env,message", [
    (["generate", "no/such-model-here", "--prompt", "x"], {}, "not in the Hugging Face cache"),
    (["chat", "/no/such/folder"], {}, "not a folder"),
    (["embed", "x", "--model", "/no/such/folder"], {}, "not a folder"),
    (["serve", "/no/such/folder"], {}, "not a folder"),
    (["serve", "--api-key", " "], {}, "--api-key is empty"),
    (["serve"], {"ENGINE_API_KEY": ""}, "ENGINE_API_KEY is empty"),
    (["serve", "--port", "70000"], {}, "--port must be in 0..65535"),
    (["serve", "--lora-modules", "a=/x"], {}, "--lora-modules needs --enable-lora"),
    (["generate", "--prompt", "x", "--max-num-seqs", "0"], {}, "max_num_seqs must be"),
])
def test_a_wrong_model_or_flag_is_reported_before_torch_is_imported(args, env, message):
    """torch takes seconds to import: a mistyped model or flag is reported first
    (``-X importtime`` lists every module the command imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "engine", *args],
                          capture_output=True, text=True, timeout=120,
                          env=subprocess_env(**env))
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert any(message in line for line in errors), errors
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "registry" in imported  # the listing works
    assert "torch" not in imported


def test_a_taken_port_is_reported_before_loading_and_never_said_ready(make_hf_model):
    """`engine serve` on a port another program listens on: one line naming the
    port and what to do, before torch is imported. (It used to load the model,
    let uvicorn log the bind error, then print "ready on" all the same.)"""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "engine", "serve",
             str(make_hf_model("llama")), "--port", str(port)],
            capture_output=True, text=True, timeout=120, env=subprocess_env())
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if not line.startswith("import time:")]
    assert proc.returncode == 1, errors
    assert errors == [f"engine serve: error: cannot listen on 127.0.0.1:{port}: Address "
                      "already in use: another program listens there; choose another --port "
                      "(0: any free one)"]
    assert not [line for line in lines if line.rstrip().endswith("| torch")]


# ------------------------------------------------------------------ item 6: flags


def test_kv_cache_memory_takes_units():
    from engine.cli.main import build_parser
    from engine.engine_args import EngineArgs, parse_memory_size

    assert parse_memory_size("1GiB") == 2**30
    assert parse_memory_size("512MiB") == 512 * 2**20
    assert parse_memory_size("2GB") == 2 * 10**9
    assert parse_memory_size("4096") == 4096
    with pytest.raises(ValueError, match="kv_cache_memory: '3 parsecs' is not a size"):
        parse_memory_size("3 parsecs", "kv_cache_memory")
    args = build_parser().parse_args(["serve", "--kv-cache-memory", "1GiB"])
    assert args.kv_cache_memory == 2**30
    config = EngineArgs(kv_cache_memory="512MiB").create_engine_config()
    assert config.cache_config.kv_cache_memory == 512 * 2**20
    bad = _engine("serve", "--kv-cache-memory", "lots")
    assert bad.returncode == 2 and "'lots' is not a size" in bad.stderr


def test_help_states_defaults_and_one_meaning_of_seed():
    helps = {cmd: _engine(cmd, "--help").stdout for cmd in ("generate", "chat", "serve")}
    flat = {cmd: " ".join(text.split()) for cmd, text in helps.items()}
    assert "most tokens to generate per prompt (default 64)" in flat["generate"]
    assert "(default: 8000)" in flat["serve"]
    for cmd, text in flat.items():
        options = text[text.index("options:"):]
        # one --seed, not an engine one besides
        assert len(re.findall(r"--seed S[ ,]", options)) == 1, cmd
        seed_help = options[options.index("--seed S"):][:80]
        assert "sampling seed" in seed_help, (cmd, seed_help)


def test_generate_explains_an_empty_completion_of_a_chat_model(
        make_hf_model, tokenizer_dir, tmp_path):
    from engine import LLM, SamplingParams

    base = make_hf_model("llama", vocab_size=VOCAB_SIZE)
    model = build_chat_model("chatml", base, tokenizer_dir, tmp_path / "chat")
    llm = LLM(str(model), dtype="float32", kv_cache_memory=1 << 22)
    first = llm.generate(["What is 2+2?"], SamplingParams(temperature=0, max_tokens=1,
                                                         ignore_eos=True))
    llm.shutdown()
    # make the greedy first token the end of sequence: the reply is empty at once
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_id"] = first[0].outputs[0].token_ids[0]
    (model / "generation_config.json").write_text(json.dumps(gen))
    proc = _engine("generate", str(model), "--prompt", "What is 2+2?", "--temperature", "0",
                   "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "What is 2+2?"
    assert "the model ended at once" in proc.stderr
    assert f"engine chat {model}" in proc.stderr


# ------------------------------------------------------------------ item 3: KV cache


def test_default_kv_cache_is_sized_to_the_model_and_said_in_one_line(make_hf_model):
    from engine import LLM
    from engine.core.engine import DEFAULT_FULL_LENGTH_SEQS, DEFAULT_MIN_CACHE_BYTES

    # a long context: 4 sequences at full length are more than the minimum
    model = make_hf_model("llama", max_position_embeddings=300_000)
    llm = LLM(str(model), dtype="float32", max_model_len=300_000)
    per_token = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head 16 x float32
    num_blocks = llm.llm_engine.num_blocks
    assert num_blocks == DEFAULT_FULL_LENGTH_SEQS * 300_000 // 16
    assert num_blocks * 16 * per_token > DEFAULT_MIN_CACHE_BYTES
    llm.shutdown()
    proc = _engine("generate", str(model), "--prompt", "x", "--max-tokens", "1",
                   "--dtype", "float32", "--max-model-len", "8192")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "KV cache" in line]
    expected_blocks = DEFAULT_MIN_CACHE_BYTES // (16 * per_token)
    assert lines == [f"engine: KV cache: {expected_blocks} blocks x 16 tokens = "
                     f"{expected_blocks * 16} tokens, 0.50 GiB (the 512 MiB default minimum, "
                     f"{per_token} bytes/token; kv_cache_memory=SIZE to change)"]


def test_kv_cache_pages_are_not_touched_until_used(make_hf_model):
    # resident memory, not time: a 2 GiB cache must not make the process 2 GiB big
    model = make_hf_model("llama", max_position_embeddings=300_000)
    script = (
        "import sys\n"
        "from engine import LLM\n"
        "llm = LLM(sys.argv[1], dtype='float32', kv_cache_memory='2GiB')\n"
        "llm.generate(['x'])\n"
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1]\n"
        "print(llm.llm_engine.num_blocks, rss)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True,
                          text=True, timeout=180, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    num_blocks, rss_kib = map(int, proc.stdout.split())
    assert num_blocks * 16 * 512 == 2 * 2**30  # the whole 2 GiB was allocated...
    # ...and, after start-up and a request, under 1 GiB is resident: touched cache pages
    # would stay (the current RSS, not the peak: start-up's passing buffers are not the cache)
    assert rss_kib < 2**20, rss_kib


# ------------------------------------------------------------------ item 4: kernels


def test_engine_kernels_status_and_the_background_build_is_announced(tmp_path):
    cache = tmp_path / "kernels"
    status = _engine("kernels", "status", ENGINE_KERNEL_CACHE=str(cache))
    assert status.returncode == 0, status.stderr
    assert "not built (engine kernels build builds it)" in status.stdout
    # a compiler that fails at once: the build starts, is announced, and ends quickly
    proc = _engine("generate", "--prompt", "x", "--max-tokens", "1", "--dtype", "bfloat16",
                   ENGINE_KERNEL_CACHE=str(cache), ENGINE_CPU_KERNELS="auto", CXX="false")
    assert proc.returncode == 0, proc.stderr
    announced = [line for line in proc.stderr.splitlines() if "in the background" in line]
    assert len(announced) == 1 and "engine kernels build" in announced[0], proc.stderr
    deadline = time.monotonic() + 120
    while list(cache.glob("*/building.lock")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not list(cache.glob("*/building.lock")), "the background build never ended"
    failed = _engine("kernels", "build", ENGINE_KERNEL_CACHE=str(cache), CXX="false")
    assert failed.returncode == 1 and "the build failed" in failed.stderr


def test_two_builds_at_once_compile_once_and_an_asked_rebuild_compiles_again(tmp_path,
                                                                            monkeypatch):
    """Two callers of ``build()`` at once (two test processes, a background build
    beside ``engine kernels build``) wait for one compiler and share its library."""
    import threading

    from engine import kernels

    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "kernels"))
    compiled = []

    def compile_slowly(cpp_extension, target):  # the compiler's part, minutes in life
        compiled.append(threading.get_ident())
        time.sleep(0.5)
        target.write_bytes(b"library")

    monkeypatch.setattr(kernels, "_compile", compile_slowly)
    results = []
    threads = [threading.Thread(target=lambda: results.append(kernels.build()))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [kernels.library_path()] * 2
    assert len(compiled) == 1, compiled
    kernels.build()  # the library is there before the call: build it again
    assert len(compiled) == 2


@pytest.fixture
def small_kernel_build(tmp_path, monkeypatch):
    """``kernels._compile`` on one small source that includes a light header
    (precompiled in a second, where torch's take half a minute); the rest (torch's
    extension builder, the compile flags, the precompiled header and its stand-in) as
    in the real build."""
    from engine import kernels

    source = tmp_path / "small.cpp"
    source.write_text('#include <cstdint>\nextern "C" int64_t engine_small() { return 7; }\n')
    monkeypatch.setattr(kernels, "SOURCES", (str(source),))  # an absolute path stays one
    monkeypatch.setattr(kernels, "PRECOMPILED", ("cstdint",))
    return tmp_path / "engine_kernels.so"


def test_kernel_sources_are_compiled_with_the_precompiled_header(small_kernel_build, caplog):
    """Every source starts with the precompiled header (the parse of torch's headers,
    16 s of ~20 s of a source's compile, done once): the compiler takes it only when
    it was built with the flags torch's extension builder gives each source, else it
    reads the stand-in header, which stops the build."""
    import ctypes
    import logging

    from torch.utils import cpp_extension

    from engine import kernels

    with caplog.at_level(logging.INFO, logger="engine.kernels"):
        kernels._compile(cpp_extension, small_kernel_build)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert ctypes.CDLL(str(small_kernel_build)).engine_small() == 7
    assert not list(small_kernel_build.parent.glob("build-*"))  # the work folder is gone


def test_a_precompiled_header_the_compiler_refuses_means_a_build_without_it(
        small_kernel_build, monkeypatch, caplog):
    """Flags that differ from the sources' (another torch's recipe, say) leave the
    precompiled header unused: the build says so and compiles without it."""
    import ctypes
    import logging

    from torch.utils import cpp_extension

    from engine import kernels

    flags = kernels._compile_flags
    monkeypatch.setattr(kernels, "_compile_flags",
                        lambda ext, name: [*flags(ext, name), "-DENGINE_ANOTHER_TORCH=1"])
    with caplog.at_level(logging.INFO, logger="engine.kernels"):
        kernels._compile(cpp_extension, small_kernel_build)
    assert [r.getMessage() for r in caplog.records] == [
        "the precompiled header did not match the kernels' compile flags; building without it"]
    assert ctypes.CDLL(str(small_kernel_build)).engine_small() == 7


# ------------------------------------------------------------------ item 8: plugins


def test_start_up_names_out_of_tree_plugins_and_v_shows_the_platform():
    plain = _engine("generate", "--prompt", "x", "--max-tokens", "1")
    assert plain.returncode == 0, plain.stderr
    assert "out-of-tree plugins" not in plain.stderr  # built-ins are not named
    example = ROOT / "examples" / "jsonl-stat-logger"
    proc = _engine("--plugin-dir", str(example), "generate", "-v", "--prompt", "x",
                   "--max-tokens", "1")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "out-of-tree plugins active" in line]
    assert len(lines) == 1 and "jsonl (stat_logger, plugin-dir" in lines[0], proc.stderr
    assert "platform 'cpu'" in proc.stderr


# ------------------------------------------------------------------ item 7: examples


def test_my_model_plugin_example_ships_a_model_to_try(tmp_path):
    example = ROOT / "examples" / "my-model-plugin"
    made = subprocess.run([sys.executable, str(example / "make_tiny_model.py"),
                           str(tmp_path / "my-model")], capture_output=True, text=True,
                          timeout=60, env=subprocess_env())
    assert made.returncode == 0, made.stderr
    config = json.loads((tmp_path / "my-model" / "config.json").read_text())
    assert config["architectures"] == ["MyLlamaForCausalLM"]
    greedy = ("--prompt", "def add(a, b):", "--max-tokens", "8", "--temperature", "0",
              "--dtype", "float32")
    mine = _engine("--plugin-dir", str(example), "generate", str(tmp_path / "my-model"),
                   *greedy)
    assert mine.returncode == 0, mine.stderr
    default = _engine("generate", *greedy)
    assert mine.stdout == default.stdout  # logit_scale 1.0: the default model's text
    without = _engine("generate", str(tmp_path / "my-model"), *greedy)
    assert without.returncode == 1 and "MyLlamaForCausalLM" in without.stderr


# ------------------------------------------------------------------ item 2: loading


def test_a_gguf_file_is_parsed_once_and_read_as_the_gguf_package_reads_it(
        make_hf_model, tmp_path, monkeypatch):
    import gguf
    import numpy as np
    import torch
    from test_gguf import write_gguf

    from engine import LLM
    from engine.model_loader import gguf_reader
    from engine.model_loader.gguf import GGUFFile, _open_cached
    from engine.model_loader.gguf_reader import dequantize

    path = write_gguf(make_hf_model("llama"), tmp_path / "tiny.gguf", "Q4_1",
                      chat_template="{{ messages[0]['content'] }}")
    _open_cached.cache_clear()
    parses = []
    parse = gguf_reader.GGUFReader._parse
    monkeypatch.setattr(gguf_reader.GGUFReader, "_parse",
                        lambda self: parses.append(self.path) or parse(self))
    llm = LLM(str(path), dtype="float32", kv_cache_memory=1 << 22)
    llm.shutdown()
    assert parses == [path]  # config, tokenizer and weights: one parse...
    assert _open_cached.cache_info().currsize == 0  # ...dropped once the weights are read
    monkeypatch.undo()
    # the same metadata and the same dequantized values as the gguf package's reader
    ours, theirs = GGUFFile.open(path).reader, gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields.keys() == fields.keys()
    for key, value in fields.items():
        assert ours.fields[key] == pytest.approx(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors, strict=True):
        expected = np.asarray(gguf.dequantize(ref.data, ref.tensor_type), dtype=np.float32)
        got = dequantize(ours, mine)
        assert torch.equal(got, torch.tensor(expected).reshape(got.shape)), mine.name


def test_a_gguf_file_looks_up_its_quantization_plugins_once_per_tensor_type(
        make_hf_model, tmp_path):
    """Keeping GGUF blocks quantized asks which plugin serves a tensor type; the
    answer is looked up once per type, not once per tensor (each look-up imports
    the quantization group's plugins again: thousands of imports for a 30-layer
    model). So a model with four times the layers costs no more look-ups."""
    import torch
    from test_gguf import write_gguf

    import registry
    from engine.model_loader.gguf import GGUFFile
    from engine.model_loader.loader import GGUFLoader

    group = registry.resolve_group(registry.QUANTIZATION_PLUGINS)

    def plugin_imports(layers: int) -> int:
        path = tmp_path / f"{layers}.gguf"
        if not path.exists():
            write_gguf(make_hf_model("llama", num_hidden_layers=layers), path, "Q4_1")
        before = len([e for e in registry.load_trace() if e.group == group])
        weights = dict(GGUFLoader().iter_weights(path, GGUFFile.open(path).hf_config()))
        assert any(not isinstance(w, torch.Tensor) for w in weights.values())  # kept quantized
        return len([e for e in registry.load_trace() if e.group == group]) - before

    plugin_imports(2)  # the first load also builds the methods' instances
    assert plugin_imports(2) == plugin_imports(8) > 0


def _on_a_terminal(*args: str, timeout: float = 180.0) -> str:
    """What `engine ARGS` writes to a pseudo-terminal (stdout and stderr)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI with the terminal as stdin, stdout and stderr
        os.execvpe(sys.executable, [sys.executable, "-m", "engine", *args], subprocess_env())
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running: the loop timed out
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    return out.decode(errors="replace")


def test_loading_is_announced_on_a_terminal_and_not_when_piped():
    args = ("generate", "--prompt", "x", "--max-tokens", "1")
    assert "engine generate: loading the embedded default model ..." in _on_a_terminal(*args)
    piped = _engine(*args)
    assert piped.returncode == 0, piped.stderr
    assert "loading" not in piped.stderr


def test_generating_never_imports_torchdynamo(tmp_path):
    """TorchDynamo costs about a second to import: only ``compilation_config``
    may pull it in, never a plain load and generate (a decorator such as
    ``torch.compiler.disable`` on a model module imports it for everyone)."""
    script = ("import sys, engine\n"
              "from engine import LLM, SamplingParams\n"
              "LLM().generate(['hello'], SamplingParams(max_tokens=2))\n"
              "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=180, env=subprocess_env(ENGINE_CONFIG_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
