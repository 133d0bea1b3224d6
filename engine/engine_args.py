"""`EngineArgs`: every engine setting, written once.

`LLM(...)` takes these fields as keyword arguments, the CLI commands that build an
engine (`engine generate`, `engine embed`, `engine serve`, ...) get their engine flags
from `EngineArgs.add_cli_args`, and the server builds its engine from an `EngineArgs`.
A new setting is one field here (with its help text); the rest follows.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import (
    KV_PREFAULT_MODES,
    SCHEDULING_POLICIES,
    CacheConfig,
    CompilationConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from engine.executor import DISTRIBUTED_EXECUTOR_BACKENDS

DTYPES = ("auto", "float32", "bfloat16", "float16")


DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def default_model_dir() -> Path:
    """The embedded default model's folder. Raises FileNotFoundError when this
    installation has none."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"no model given and the embedded default model is missing ({DEFAULT_MODEL_DIR}); "
            "pass a Hugging Face-format model folder (config.json, *.safetensors, tokenizer.json)"
        )
    return DEFAULT_MODEL_DIR


def _help(text: str, *, flag: str | None = None, cli: bool = True, **argparse_kw: Any) -> dict:
    """Field metadata: the help text, and how (or whether) the field becomes a CLI flag."""
    return {"help": text, "flag": flag, "cli": cli, "argparse": argparse_kw}


# How much of the warm-up runs (docs/sleep-and-warm-up.md): "full" (default) the
# first requests' steps and the shape stages, "steps" the steps only (the first
# large prompt steps build their kernels), "off" none, like `skip_warm_up`.
WARM_UP_ENV = "ENGINE_WARM_UP"
WARM_UP_EXTENTS = ("full", "steps", "off")


@dataclass
class EngineArgs:
    """The settings of one engine. Every field is also a keyword argument of `LLM`.

    Raises (from `create_engine_config`) ValueError naming the field for a bad
    value, FileNotFoundError for a missing model.
    """

    model: str | None = field(default=None, metadata=_help(
        "Hugging Face-format model folder, or a model name ('org/name') in the local "
        "Hugging Face cache (default: the embedded model)", metavar="MODEL"))
    revision: str | None = field(default=None, metadata=_help(
        "for a model name: the cached branch, tag or commit to load (default: main)",
        metavar="REV"))
    platform: str | None = field(default=None, metadata=_help(
        "use this platform plugin (sets ENGINE_PLATFORM); the CLI's global --platform",
        cli=False))
    plugin_dirs: tuple[str, ...] = field(default=(), metadata=_help(
        "extra plugin folders (reach every engine process); the CLI's global --plugin-dir",
        cli=False))
    plugin_config: dict[str, dict[str, Any]] | None = field(default=None, metadata=_help(
        "plugin settings {NAME: {KEY: VALUE}}, over engine.toml, ENGINE_PLUGIN_CONFIG and "
        "--plugin-config (reach every engine process); the CLI's global --plugin-config",
        cli=False))
    tensor_parallel_size: int = field(default=1, metadata=_help(
        "ranks to shard the model over (one process each)", metavar="N"))
    attention_backend: str | None = field(default=None, metadata=_help(
        "an attention backend name (default: the platform's)", metavar="NAME"))
    io_processor_plugin: str | None = field(default=None, metadata=_help(
        "the IO-processor plugin `encode` and POST /pooling use (default: the "
        "'io_processor_plugin' key of the model's config.json)", metavar="NAME"))
    dtype: str = field(default="auto", metadata=_help(
        "weights and activations dtype; 'auto': a float32 model runs in bfloat16 on a CPU "
        "with native bf16 (AMX or AVX512-BF16), else float32; other checkpoint dtypes are "
        "kept. Use float32 for results equal to transformers in float32",
        choices=DTYPES))
    seed: int = field(default=0, metadata=_help(
        "seeds the global generators (unseeded sampling, weight init)", metavar="S"))
    log_stats: bool = field(default=False, metadata=_help(
        "turn the stat loggers on", cli=False))
    block_size: int = field(default=16, metadata=_help(
        "tokens per KV-cache block", metavar="N"))
    kv_cache_memory: int | str | None = field(default=None, metadata=_help(
        "size of the KV cache: bytes, or with a unit: 512MiB, 1GiB, 2GB (default: what "
        "max_model_len x max_num_seqs can use, capped; see docs/first-run.md)",
        metavar="SIZE", type=lambda text: _cli_memory_size(text)))
    kv_cache_memory_fraction: float = field(default=0.25, metadata=_help(
        "fraction of memory for the KV cache when kv_cache_memory is not set", metavar="F"))
    max_num_seqs: int = field(default=256, metadata=_help(
        "sequences in one step at most", metavar="N"))
    max_num_batched_tokens: int | None = field(default=None, metadata=_help(
        "token budget of one step (default 4096, or the context length when chunked "
        "prefill is off)", metavar="N"))
    enable_prefix_caching: bool = field(default=True, metadata=_help(
        "reuse the KV blocks of repeated prompt prefixes"))
    enable_chunked_prefill: bool = field(default=True, metadata=_help(
        "split long prompts over several steps"))
    max_model_len: int | None = field(default=None, metadata=_help(
        "serve a shorter context than the model's", metavar="N"))
    long_prefill_token_threshold: int = field(default=0, metadata=_help(
        "prompt tokens one request may prefill per step (0: only the step budget)",
        metavar="N"))
    scheduling_policy: str = field(default="fcfs", metadata=_help(
        "order of waiting requests: 'fcfs' (arrival order) or 'short-prompt-first' "
        "(among the requests that arrived between the same two steps, shorter prompts "
        "first: earlier first tokens when many arrive together). Default: fcfs; "
        "engine serve: short-prompt-first", choices=SCHEDULING_POLICIES))
    max_logprobs: int = field(default=20, metadata=_help(
        "most log-probabilities one request may ask for per token (logprobs, "
        "top_logprobs)", metavar="N"))
    max_n: int = field(default=128, metadata=_help(
        "most samples one request may ask for (n)", metavar="N"))
    custom_ops: list[str] | None = field(default=None, metadata=_help(
        "custom-op toggles: 'all', 'none', '+name', '-name' (default: all)",
        nargs="+", metavar="OP"))
    worker_cls: str = field(default="auto", metadata=_help(
        "worker class qualified name ('auto': the platform's)", metavar="QUALNAME"))
    distributed_executor_backend: str = field(default="mp", metadata=_help(
        "who runs the ranks: 'mp' (local processes), 'ray' (Ray actors across the nodes "
        "of a Ray cluster) or 'external_launcher' (each process torchrun started is one "
        "rank)", choices=DISTRIBUTED_EXECUTOR_BACKENDS))
    load_format: str = field(default="auto", metadata=_help(
        "how to read the weights: 'auto' (by what the path holds), 'safetensors', 'pt', "
        "'gguf' or a format a plugin registered", metavar="FORMAT"))
    quantization: str | None = field(default=None, metadata=_help(
        "store the linear layers, embedding and LM head quantized: a quantization plugin "
        "('q8_0', 'q4_0', 'q4_1', 'q5_0', 'q5_1', 'q4_k', 'q5_k', 'q6_k', or a "
        "third party's), quantizing float weights at load; 'none': all in floats. "
        "Default: a GGUF file's blocks stay as they are, other checkpoints stay float "
        "(docs/quantization.md)", metavar="METHOD"))
    logits_processors: tuple[Any, ...] = field(default=(), metadata=_help(
        "extra LogitsProcessor classes (or 'pkg.mod:Cls' names) run after the "
        "logits_processor plugins", nargs="+", metavar="QUALNAME"))
    # -- warm-up, sleep mode, compilation (docs/sleep-and-warm-up.md) --
    skip_warm_up: bool = field(default=False, metadata=_help(
        "start without running the first requests' step shapes once (the first "
        "requests then pay first-time costs); one-shot `engine generate`/`embed` skip it"))
    enable_sleep_mode: bool = field(default=False, metadata=_help(
        "allow LLM.sleep()/wake_up() (and the server's dev-mode /sleep, /wake_up): "
        "free the KV cache and weights while idle; the worker must implement them"))
    compilation_config: dict[str, Any] | str | None = field(default=None, metadata=_help(
        "torch.compile the model: a JSON object with 'backend' (a graph_backend plugin: "
        "'inductor', 'eager', ...), 'dynamic' (default true), 'cache_dir' (default "
        "~/.cache/engine/compile); default: no compilation", metavar="JSON"))
    # speculative decoding (docs/speculative-decoding.md)
    speculative_config: dict[str, Any] | str | None = field(default=None, metadata=_help(
        "speculative decoding, as JSON: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' "
        "or '{\"model\": DRAFT_DIR, \"num_speculative_tokens\": 4}'", metavar="JSON"))
    # LoRA (engine.lora, docs/lora.md)
    enable_lora: bool = field(default=False, metadata=_help(
        "serve LoRA adapters (PEFT format) next to the base model"))
    max_loras: int = field(default=1, metadata=_help(
        "LoRA adapters active at once (one step mixes at most this many)", metavar="N"))
    max_lora_rank: int = field(default=16, metadata=_help(
        "the largest LoRA rank an adapter may have", metavar="R"))
    max_cpu_loras: int | None = field(default=None, metadata=_help(
        "LoRA adapters kept loaded in host memory (default: max_loras)", metavar="N"))
    # last: a field added later goes at the end (positional EngineArgs(...) keep working)
    kv_prefault: str = field(default="auto", metadata=_help(
        "what an idle-priority thread pages in of the KV cache before steps write it: "
        "'ahead' (the blocks a step or two past those used so far: resident memory "
        "grows with use), 'all' (the whole cache, while the CPU is otherwise idle: "
        "no step pays for a first touch) or 'auto' (default: 'all' when "
        "kv_cache_memory gives the cache its size, 'ahead' when the engine sizes it). "
        "engine serve: all",
        choices=("auto", *KV_PREFAULT_MODES)))

    # ------------------------------------------------------------------ CLI

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser | Any,
                     *, exclude: tuple[str, ...] = ()) -> None:
        """Add one flag per CLI-visible field to `parser` (or an argument group):
        ``--tensor-parallel-size N``, ``--dtype``, ``--no-enable-prefix-caching``, ...
        Fields named in `exclude` are left out (a command that sets them itself)."""
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta.get("cli") or f.name in exclude:
                continue
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            kw = dict(meta["argparse"])
            if isinstance(f.default, bool):
                kw["action"] = argparse.BooleanOptionalAction
            elif "nargs" not in kw and "choices" not in kw and "type" not in kw:
                kw["type"] = _cli_type(f.default, f.type)
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = meta["help"]
            if default not in (None, (), False, True) and "default" not in help_text:
                help_text += f" (default: {default})"
            parser.add_argument(flag, dest=f.name, default=default, help=help_text, **kw)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineArgs:
        """The fields `add_cli_args` added, read back from parsed `args`, then
        `overrides` on top."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if hasattr(args, f.name)}
        values.update(overrides)
        return cls(**values)

    # ------------------------------------------------------------------ config

    def model_dir(self) -> Path:
        """The model's folder: `model` itself, its snapshot in the local Hugging Face
        cache (`engine.model_loader.hf_cache.resolve_model`), or the embedded default model when
        `model` is None."""
        if self.model is None:
            if self.revision is not None:
                raise ValueError("revision needs a model name (model='org/name')")
            return default_model_dir()
        from engine.model_loader.hf_cache import resolve_model

        return resolve_model(self.model, self.revision)

    def create_engine_config(self) -> EngineConfig:
        """Check every field and build the `EngineConfig` the engine runs with.
        The fields and the model's location are checked before anything imports
        torch, so that a mistyped flag or path is reported at once."""
        for name in ("tensor_parallel_size", "block_size", "max_num_seqs", "max_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_prefault not in ("auto", *KV_PREFAULT_MODES):
            raise ValueError(f"kv_prefault must be one of auto, {', '.join(KV_PREFAULT_MODES)}, "
                             f"got {self.kv_prefault!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")
        if self.distributed_executor_backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(
                "distributed_executor_backend must be one of "
                f"{', '.join(DISTRIBUTED_EXECUTOR_BACKENDS)}, got "
                f"{self.distributed_executor_backend!r}")
        if isinstance(self.kv_cache_memory, str):
            self.kv_cache_memory = parse_memory_size(self.kv_cache_memory, "kv_cache_memory")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory!r}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1], got "
                             f"{self.kv_cache_memory_fraction!r}")
        model_dir = self.model_dir()
        from engine.core.engine import resolve_max_model_len
        from engine.model_loader import load_hf_config

        hf_config = load_hf_config(model_dir, self.load_format)
        max_model_len = resolve_max_model_len(hf_config, self.max_model_len)
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = 4096 if self.enable_chunked_prefill else max(4096, max_model_len)
        if budget < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {budget}")
        warm_up, warm_up_shapes = self._warm_up_extent()
        return EngineConfig(
            model_config=ModelConfig(
                model=str(model_dir), dtype=self.dtype, seed=self.seed,
                max_model_len=max_model_len, hf_config=hf_config,
                io_processor_plugin=self.io_processor_plugin, load_format=self.load_format,
                enable_sleep_mode=self.enable_sleep_mode,
                quantization=self._checked_quantization(),
            ),
            cache_config=CacheConfig(
                block_size=self.block_size, kv_cache_memory=self.kv_cache_memory,
                kv_cache_memory_fraction=self.kv_cache_memory_fraction,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_prefault=self._kv_prefault(),
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget,
                enable_chunked_prefill=self.enable_chunked_prefill,
                long_prefill_token_threshold=self.long_prefill_token_threshold,
                scheduling_policy=self.scheduling_policy,
                max_logprobs=self.max_logprobs, max_n=self.max_n,
            ),
            parallel_config=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size, worker_cls=self.worker_cls,
                distributed_executor_backend=self.distributed_executor_backend,
            ),
            compilation_config=CompilationConfig(custom_ops=self.custom_ops or ["all"],
                                                 warm_up=warm_up, warm_up_shapes=warm_up_shapes,
                                                 **self._checked_compilation_config()),
            attention_backend=self.attention_backend,
            log_stats=self.log_stats,
            logits_processors=self._checked_logits_processors(),
            speculative_config=self._checked_speculative_config(),
            lora_config=self._lora_config(),
        )

    def _kv_prefault(self) -> str:
        """kv_prefault as the cache runs it: "auto" pages the whole cache in while
        idle when the user gave it its size (that memory is the cache's, as vLLM
        zeroes its own at start), and only a window ahead when the engine sized it
        (resident memory then grows with use). Offline rounds of fresh prompts write
        new blocks every round: with the cache paged in, bench_vs_vllm.py's engine
        ran 1.57x vLLM's throughput against 1.20x without (docs/benchmarks.md)."""
        if self.kv_prefault != "auto":
            return self.kv_prefault
        return "all" if self.kv_cache_memory is not None else "ahead"

    def _warm_up_extent(self) -> tuple[bool, bool]:
        """`CompilationConfig`'s (warm_up, warm_up_shapes) from `skip_warm_up` and
        ``ENGINE_WARM_UP`` (`WARM_UP_EXTENTS`); `skip_warm_up` wins."""
        extent = os.environ.get(WARM_UP_ENV, "").strip().lower() or "full"
        if extent not in WARM_UP_EXTENTS:
            raise ValueError(f"{WARM_UP_ENV} must be one of {', '.join(WARM_UP_EXTENTS)}, "
                             f"got {os.environ[WARM_UP_ENV]!r}")
        return not self.skip_warm_up and extent != "off", extent == "full"

    def _checked_compilation_config(self) -> dict[str, Any]:
        from engine.compilation import parse_compilation_config, resolve_graph_backend

        checked = parse_compilation_config(self.compilation_config)
        if checked.get("backend") is not None:
            resolve_graph_backend(checked["backend"])  # an unknown name fails now, listing them
        return checked

    def _checked_speculative_config(self) -> Any:
        if self.speculative_config is None:
            return None
        from engine.spec_decode import SpeculativeConfig

        return SpeculativeConfig.from_user(self.speculative_config)
    def _checked_quantization(self) -> str | None:
        from engine.quantization import NO_QUANTIZATION, get_quantization_method

        if self.quantization in (None, NO_QUANTIZATION):
            return self.quantization
        if not isinstance(self.quantization, str):
            raise ValueError(f"quantization must be a method name, got {self.quantization!r}")
        get_quantization_method(self.quantization)  # an unknown name fails here, naming the valid ones
        return self.quantization

    def _lora_config(self) -> Any:
        if not self.enable_lora:
            return None
        from engine.lora import LoRAConfig

        return LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                          max_cpu_loras=self.max_cpu_loras)

    def _checked_logits_processors(self) -> list[Any]:
        from engine.sample.logits_processor import processor_name, resolve_logits_processor
        from engine.utils import worker_importable_name

        checked = []
        for entry in self.logits_processors or ():
            what = f"logits_processors entry {processor_name(entry)!r}"
            cls = resolve_logits_processor(entry, what)
            if self.tensor_parallel_size > 1 and not isinstance(entry, str):
                entry = worker_importable_name(cls, what)  # workers import it by name
            checked.append(entry)
        return checked

    def apply_process_settings(self) -> None:
        """The settings that act on this process before the engine is built: the
        platform choice, the plugin folders and the plugin settings (all reach the
        engine's workers)."""
        if self.platform is not None:
            from engine.platforms import reset_current_platform

            os.environ["ENGINE_PLATFORM"] = self.platform
            reset_current_platform()  # a platform resolved earlier in this process is stale
        if self.plugin_dirs:
            import registry

            registry.add_plugin_dirs([os.fspath(d) for d in self.plugin_dirs])
        if self.plugin_config:
            import registry

            registry.add_plugin_config(self.plugin_config)  # via the environment: workers see it


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
               "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_size(text: str, what: str = "size") -> int:
    """Bytes from ``"1073741824"``, ``"512MiB"``, ``"1GiB"``, ``"2GB"`` or ``"1.5 GiB"``
    (KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024). Raises ValueError
    naming `what` for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{what + ': ' if what else ''}{text!r} is not a size; give bytes "
                         "or a number with a unit: 512MiB, 1GiB, 2GB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _cli_memory_size(text: str) -> int:
    try:
        return parse_memory_size(text, "")
    except ValueError as exc:  # argparse prints an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cli_type(default: Any, annotation: Any) -> Any:
    """The argparse type for a field: from its default, else from its annotation."""
    if default is not None and not isinstance(default, (tuple, list)):
        return type(default)
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    for name, typ in (("int", int), ("float", float)):
        if text.startswith(name):
            return typ
    return str


def engine_args_signature(first: tuple[inspect.Parameter, ...] = ()) -> inspect.Signature:
    """`EngineArgs`' fields as keyword-only parameters (for `LLM.__init__`'s
    signature, so help() and editors show every setting)."""
    params = list(first)
    names = {p.name for p in params}
    for f in dataclasses.fields(EngineArgs):
        if f.name in names:
            continue
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type,
        ))
    return inspect.Signature(params)
