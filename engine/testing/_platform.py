"""Checks of a platform plugin: its detector, its class (the platform contract in
docs/reference.md), its config hook, and its parts against the engine's reference
implementations (attention vs NAIVE, custom ops vs ``forward_native``,
communicator vs gloo, end-to-end greedy tokens vs the ``cpu`` platform).

The platform is made current in the kit's own process (``ENGINE_PLATFORM=NAME``,
general plugins loaded, kernels imported), exactly as an engine process sets itself
up, so attention layers and ops are built by the engine's own selection code.
"""

from __future__ import annotations

import inspect
from typing import Any

from engine.testing import _comm, _e2e, _lora, _ops
from engine.testing._core import Check, CheckFailed, CheckSkipped, KitContext
from engine.testing._setup import activate, detect, kit_engine_config, platform_cls

# (absolute, relative) tolerance per dtype: |plugin - reference| <= atol + rtol * |reference|.
# Stated per dtype because a device kernel may accumulate in the working dtype where the
# reference accumulates in float32: float32 agrees to rounding, bfloat16 to ~2 ulp.
ATTENTION_TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (5e-3, 5e-3),
                       "bfloat16": (3e-2, 3e-2)}

ATTENTION_BLOCK_SIZES = (8, 16)
# name -> (query heads, KV heads); head_size is HEAD_SIZE
ATTENTION_HEADS = {"mha": (4, 4), "gqa": (8, 2)}
HEAD_SIZE = 64
# a scale other than 1/sqrt(head_size): models set their own (query_pre_attn_scalar, ...)
ATTENTION_SCALE = 0.8 / HEAD_SIZE**0.5
ATTENTION_STEPS = ("prefill", "chunked_prefill", "prefix_hit", "decode")
REQUIRED_CLASSMETHODS = ("check_and_update_config", "get_attn_backend_cls",
                         "get_device_communicator_cls", "import_kernels")


def platform_checks(ctx: KitContext, name: str) -> list[Check]:
    """Every check of platform plugin `name`, in the order they run."""
    prefix = f"platform/{name}::"
    checks = [
        Check(prefix + "detector", lambda: detect(ctx, name),
              "the detector returns a Platform subclass's qualified name"),
        Check(prefix + "class_attributes", lambda: check_class_attributes(ctx, name),
              "_enum, device_type and device_name"),
        Check(prefix + "classmethods", lambda: check_classmethods(ctx, name),
              "the contract's methods are classmethods"),
        Check(prefix + "check_and_update_config", lambda: check_config_hook(ctx, name),
              "sets worker_cls (from 'auto') to a WorkerBase subclass"),
        Check(prefix + "import_kernels", lambda: check_import_kernels(ctx, name),
              "import_kernels runs, and again"),
        Check(prefix + "attn_backend_cls", lambda: check_attn_backend_cls(ctx, name),
              "get_attn_backend_cls names an AttentionBackend; an explicit choice wins"),
        Check(prefix + "device_communicator_cls", lambda: check_communicator_cls(ctx, name),
              "get_device_communicator_cls names a DeviceCommunicatorBase subclass"),
    ]
    for dtype in ATTENTION_TOLERANCE:
        for block_size in ATTENTION_BLOCK_SIZES:
            for heads in ATTENTION_HEADS:
                for step in ATTENTION_STEPS:
                    key = (dtype, block_size, heads)
                    checks.append(Check(
                        f"{prefix}attention[{dtype}-bs{block_size}-{heads}-{step}]",
                        lambda key=key, step=step: check_attention_step(ctx, name, key, step),
                        f"the platform's attention backend vs NAIVE: {step}"))
    checks += _ops.op_checks(ctx, name, prefix)
    checks += _comm.communicator_checks(ctx, name, prefix)
    checks.append(Check(prefix + "greedy_vs_cpu", lambda: _e2e.check_greedy_vs_cpu(ctx, name),
                        "greedy tokens on the default model equal the cpu platform's"))
    checks.append(Check(prefix + "lora_vs_cpu", lambda: _lora.check_lora_vs_cpu(ctx, name),
                        "a platform whose worker implements LoRA: greedy tokens of an adapter "
                        "batched with the base model equal the cpu platform's"))
    return checks


# ---------------------------------------------------------------------------
# the detector and the class


def check_class_attributes(ctx: KitContext, name: str) -> None:
    """``_enum``, ``device_type`` and ``device_name`` are declared and sensible."""
    import torch

    from engine.platforms import PlatformEnum

    cls = platform_cls(ctx, name)
    problems = []
    enum = getattr(cls, "_enum", None)
    if not isinstance(enum, PlatformEnum) or enum == PlatformEnum.UNSPECIFIED:
        problems.append(f"_enum is {enum!r}; out-of-tree platforms set PlatformEnum.OOT")
    device_type = getattr(cls, "device_type", None)
    try:
        torch.device(device_type)
    except Exception:
        problems.append(f"device_type {device_type!r} is not a torch device string")
    device_name = getattr(cls, "device_name", None)
    if not isinstance(device_name, str) or device_name in ("", "unspecified"):
        problems.append(f"device_name is {device_name!r}; name the device")
    if problems:
        raise CheckFailed("; ".join(problems))


def check_classmethods(ctx: KitContext, name: str) -> None:
    """The methods the engine calls on the class are classmethods."""
    cls = platform_cls(ctx, name)
    wrong = [m for m in REQUIRED_CLASSMETHODS
             if not isinstance(inspect.getattr_static(cls, m, None), classmethod)]
    if wrong:
        raise CheckFailed(f"not classmethods: {', '.join(wrong)} (the engine calls them "
                          "on the class, never on an instance)")


def check_config_hook(ctx: KitContext, name: str) -> None:
    """``check_and_update_config`` fills in worker_cls, the device and the backend."""
    import registry
    from engine.worker import WorkerBase

    cls = platform_cls(ctx, name)
    config = kit_engine_config()
    cls.check_and_update_config(config)
    worker_cls = config.parallel_config.worker_cls
    if worker_cls == "auto":
        raise CheckFailed("check_and_update_config left parallel_config.worker_cls == 'auto'")
    try:
        worker = registry.resolve_qualname(worker_cls)
    except Exception as exc:
        raise CheckFailed(f"worker_cls {worker_cls!r} cannot be imported: {exc}") from None
    if not (isinstance(worker, type) and issubclass(worker, WorkerBase)):
        raise CheckFailed(f"worker_cls {worker_cls!r} is not an engine.worker.WorkerBase subclass")
    if config.device_config.device != cls.device_type:
        raise CheckFailed(f"device_config.device is {config.device_config.device!r}, "
                          f"not the platform's device_type {cls.device_type!r}")
    if not config.parallel_config.distributed_backend:
        raise CheckFailed("parallel_config.distributed_backend is not set")


def check_import_kernels(ctx: KitContext, name: str) -> None:
    """``import_kernels`` runs through the engine, and again."""
    cls = activate(ctx, name)  # imports them once, through current_platform
    cls.import_kernels()  # a second call (a re-entrant plugin) must not fail


def _selector(dtype: Any = None, block_size: int = 16) -> Any:
    import torch

    from engine.attention import AttentionSelectorConfig

    return AttentionSelectorConfig(head_size=HEAD_SIZE, num_heads=8, num_kv_heads=2,
                                   dtype=dtype or torch.float32, block_size=block_size)


def check_attn_backend_cls(ctx: KitContext, name: str) -> None:
    """The platform's backend is an AttentionBackend; an explicit NAIVE is honoured."""
    import registry
    from engine.attention import AttentionBackend, AttentionBackendEnum

    cls = activate(ctx, name)  # the backend may be registered by the general plugin
    path = cls.get_attn_backend_cls(None, _selector())
    if not isinstance(path, str):
        raise CheckFailed(f"get_attn_backend_cls(None, ...) returned {path!r}, not a str")
    try:
        backend = registry.resolve_qualname(path)
    except Exception as exc:
        raise CheckFailed(f"attention backend {path!r} cannot be imported: {exc}") from None
    if not (isinstance(backend, type) and issubclass(backend, AttentionBackend)):
        raise CheckFailed(f"{path!r} is not an engine.attention.AttentionBackend subclass")
    naive = AttentionBackendEnum.NAIVE.get_path()
    chosen = cls.get_attn_backend_cls("NAIVE", _selector())
    if chosen != naive:
        raise CheckFailed(f"an explicit choice of NAIVE gave {chosen!r}; the user's choice "
                          "must win")


def check_communicator_cls(ctx: KitContext, name: str) -> None:
    """The communicator named is a DeviceCommunicatorBase subclass."""
    import registry
    from engine.distributed import DeviceCommunicatorBase

    cls = activate(ctx, name)
    path = cls.get_device_communicator_cls()
    try:
        comm = registry.resolve_qualname(path)
    except Exception as exc:
        raise CheckFailed(f"device communicator {path!r} cannot be imported: {exc}") from None
    if not (isinstance(comm, type) and issubclass(comm, DeviceCommunicatorBase)):
        raise CheckFailed(f"{path!r} is not an engine.distributed.DeviceCommunicatorBase subclass")


# ---------------------------------------------------------------------------
# attention vs NAIVE


# sequence -> (the sequence whose first blocks it starts with, how many): a prefix-cache
# hit, where two sequences' block tables share blocks
_SHARED_PREFIX = {"e": ("c", 2)}


def _plan(block_size: int) -> list[list[tuple[str, int]]]:
    """The steps of the scenario: per step, (sequence, new tokens). Lengths are
    chosen around block boundaries: one token, exactly one block, a bit over two."""
    bs = block_size
    return [
        [("a", 13), ("b", 1), ("c", 2 * bs + 3), ("d", bs)],  # prefill
        [("a", 7), ("c", bs + 1), ("b", 1)],  # chunked prefill over cached context (+ a decode)
        [("e", 5), ("a", 1)],  # a new prompt whose first two blocks are c's (+ a decode)
        [("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)],  # decode, mixed context lengths
    ]


def run_attention_scenario(ctx: KitContext, name: str, dtype_name: str, block_size: int,
                           heads: str) -> dict[str, str | None]:
    """Run the scenario on the plugin's backend (on its device) and on NAIVE (on the
    CPU); {step: None when within tolerance, else what differed}."""
    import torch

    from engine.attention import Attention, AttentionBackendEnum, AttentionMetadata
    from engine.config import set_current_engine_config

    cls = activate(ctx, name)
    dtype = getattr(torch, dtype_name)
    num_heads, num_kv_heads = ATTENTION_HEADS[heads]
    device = cls.device_for_rank(0)
    atol, rtol = ATTENTION_TOLERANCE[dtype_name]

    config = kit_engine_config(block_size=block_size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with set_current_engine_config(config):
            layer = Attention(num_heads, HEAD_SIZE, ATTENTION_SCALE, num_kv_heads,
                              prefix="conformance.attn")
    finally:
        torch.set_default_dtype(previous)
    layer = layer.to(device)
    reference = AttentionBackendEnum.NAIVE.get_class().get_impl_cls()(
        num_heads, HEAD_SIZE, ATTENTION_SCALE, num_kv_heads)

    plan = _plan(block_size)
    # tokens already in the cache when a sequence first appears (its shared prefix)
    start = {seq: blocks * block_size for seq, (_, blocks) in _SHARED_PREFIX.items()}
    max_len = dict(start)
    for step in plan:
        for seq, n in step:
            max_len[seq] = max_len.get(seq, 0) + n
    # blocks handed out in a shuffled order so that block tables are not the identity
    gen = torch.Generator().manual_seed(1234)
    own = {seq: -(-n // block_size) - start.get(seq, 0) // block_size
           for seq, n in max_len.items()}
    num_blocks = sum(own.values()) + 3
    order = torch.randperm(num_blocks - 1, generator=gen).add(1).tolist()  # block 0 unused
    tables = {}
    for seq, count in own.items():
        tables[seq], order = order[:count], order[count:]
    for seq, (owner, blocks) in _SHARED_PREFIX.items():
        tables[seq] = tables[owner][:blocks] + tables[seq]

    shape = layer.backend.get_kv_cache_shape(num_blocks, block_size, num_kv_heads, HEAD_SIZE)
    layer.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
    ref_cache = torch.zeros((2, num_blocks, block_size, num_kv_heads, HEAD_SIZE), dtype=dtype)

    lengths = {seq: start.get(seq, 0) for seq in max_len}
    results: dict[str, str | None] = {}
    for step_name, step in zip(ATTENTION_STEPS, plan, strict=True):
        query_lens, seq_lens, block_tables, slots = [], [], [], []
        for seq, n in step:
            start, lengths[seq] = lengths[seq], lengths[seq] + n
            query_lens.append(n)
            seq_lens.append(lengths[seq])
            block_tables.append(tables[seq])
            slots += [tables[seq][p // block_size] * block_size + p % block_size
                      for p in range(start, lengths[seq])]
        tokens = sum(query_lens)
        q = torch.randn(tokens, num_heads * HEAD_SIZE, generator=gen).to(dtype)
        k = torch.randn(tokens, num_kv_heads * HEAD_SIZE, generator=gen).to(dtype)
        v = torch.randn(tokens, num_kv_heads * HEAD_SIZE, generator=gen).to(dtype)
        ref_md = AttentionMetadata.build(query_lens, seq_lens, block_tables, slots, block_size)
        expected = reference.forward(None, q, k, v, ref_cache, ref_md).float()
        md = AttentionMetadata.build(query_lens, seq_lens, block_tables, slots, block_size,
                                     device=device)
        with torch.inference_mode():
            got = layer(q.to(device), k.to(device), v.to(device), md)
        results[step_name] = _compare_attention(got, expected, query_lens, seq_lens,
                                                num_heads, atol, rtol, dtype_name)
    return results


def _compare_attention(got: Any, expected: Any, query_lens: list[int], seq_lens: list[int],
                       num_heads: int, atol: float, rtol: float, dtype_name: str) -> str | None:
    if tuple(got.shape) != tuple(expected.shape):
        return f"output shape {tuple(got.shape)}, NAIVE's {tuple(expected.shape)}"
    got = got.detach().float().cpu()
    diff = (got - expected).abs()
    bad = ~(diff <= atol + rtol * expected.abs())  # NaN counts as bad
    if not bool(bad.any()):
        return None
    flat = diff.nan_to_num(float("inf")).view(len(got), num_heads, -1).amax(-1)
    token, head = divmod(int(flat.argmax()), num_heads)
    seq, first = 0, 0
    while first + query_lens[seq] <= token:
        first += query_lens[seq]
        seq += 1
    return (f"max |diff| {float(flat.max()):.3g} vs NAIVE (tolerance {atol:g} + {rtol:g}*|ref| "
            f"for {dtype_name}) at token {token}, head {head}: sequence {seq} with "
            f"{query_lens[seq]} new of {seq_lens[seq]} tokens; "
            f"{int(bad.any(-1).sum())}/{len(got)} tokens differ")


def check_attention_step(ctx: KitContext, name: str, key: tuple[str, int, str],
                         step: str) -> None:
    """Fail when one step of the attention scenario differs from NAIVE."""
    dtype_name, block_size, heads = key
    cls = platform_cls(ctx, name)
    if not cls.supports_dtype(dtype_name):
        raise CheckSkipped(f"{cls.__qualname__}.supported_dtypes excludes {dtype_name}")
    results = ctx.memo(("attention", name, key),
                       lambda: run_attention_scenario(ctx, name, dtype_name, block_size, heads))
    problem = results[step]
    if problem:
        raise CheckFailed(problem)
