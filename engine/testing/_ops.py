"""Checks of the custom ops a platform changes (a ``register_oot`` replacement, or
an op's ``forward_<platform>``): each op built as a model builds it (so the
replacement class and the platform's dispatch are the engine's own) against the
same op's ``forward_native``, per dtype."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from engine.testing._core import Check, CheckFailed, CheckSkipped, KitContext

# in-tree op name -> builds (op, list of argument tuples) for (dtype, device, generator)
OpCase = Callable[[Any, Any, Any], tuple[Any, list[tuple[Any, ...]]]]


def _rms_norm(dtype: Any, device: Any, gen: Any) -> tuple[Any, list[tuple[Any, ...]]]:
    import torch

    from engine.ops import RMSNorm

    op = RMSNorm(128, eps=1e-5)
    with torch.no_grad():
        op.weight.copy_(torch.rand(128, generator=gen) + 0.5)
    x = torch.randn(7, 128, generator=gen).to(dtype)
    residual = torch.randn(7, 128, generator=gen).to(dtype)
    return op.to(device=device, dtype=dtype), [(x,), (x, residual)]


def _silu_and_mul(dtype: Any, device: Any, gen: Any) -> tuple[Any, list[tuple[Any, ...]]]:
    import torch

    from engine.ops import SiluAndMul

    return SiluAndMul().to(device), [(torch.randn(7, 2 * 96, generator=gen).to(dtype),)]


def _rotary_embedding(dtype: Any, device: Any, gen: Any) -> tuple[Any, list[tuple[Any, ...]]]:
    import torch

    from engine.ops import RotaryEmbedding

    op = RotaryEmbedding(head_size=64, rotary_dim=64, max_position=512, base=10000.0)
    positions = torch.tensor([0, 1, 2, 37, 38, 255, 511])
    query = torch.randn(7, 4 * 64, generator=gen).to(dtype)
    key = torch.randn(7, 2 * 64, generator=gen).to(dtype)
    return op.to(device), [(positions, query, key)]


OP_CASES: dict[str, OpCase] = {
    "rms_norm": _rms_norm,
    "silu_and_mul": _silu_and_mul,
    "rotary_embedding": _rotary_embedding,
}


_PLATFORM_FORWARD = {"CPU": "forward_cpu", "CUDA": "forward_cuda", "OOT": "forward_oot"}


def replaced_ops(ctx: KitContext, name: str) -> list[str]:
    """Names of the in-tree ops whose forward differs from ``forward_native`` on
    this platform once it is set up: replaced with ``register_oot``, or with the
    platform's ``forward_<platform>`` overridden; in registration order."""
    from engine.testing._setup import activate

    def compute() -> list[str]:
        from engine.ops import CustomOp

        cls = activate(ctx, name)
        method = _PLATFORM_FORWARD.get(cls._enum.name, "forward_native")
        found = []
        for op, in_tree in CustomOp.op_registry.items():
            built = CustomOp.op_registry_oot.get(op, in_tree)
            if built is not in_tree or getattr(built, method) is not getattr(CustomOp, method):
                found.append(op)
        return found

    return ctx.memo(("replaced_ops", name), compute)


def op_checks(ctx: KitContext, name: str, prefix: str) -> list[Check]:
    """One check per op the platform changes (see `replaced_ops`) and dtype; a
    single skipped check when the platform cannot be set up to find out."""
    from engine.testing._setup import OP_TOLERANCE

    try:
        ops = replaced_ops(ctx, name)
    except (CheckFailed, CheckSkipped) as exc:
        problem = exc

        def fail() -> NoReturn:
            raise CheckSkipped(f"cannot tell which ops the platform replaces: {problem}")

        return [Check(prefix + "custom_ops", fail, "custom ops vs forward_native")]
    return [Check(f"{prefix}custom_op[{op}-{dtype}]",
                  lambda op=op, dtype=dtype: check_op(ctx, name, op, dtype),
                  f"the replacement of {op} vs its forward_native")
            for op in ops for dtype in OP_TOLERANCE]


def _flatten(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check_op(ctx: KitContext, name: str, op_name: str, dtype_name: str) -> None:
    """Fail when op `op_name`, built and dispatched on the platform, differs from its
    own ``forward_native`` beyond the dtype's tolerance."""
    import torch

    from engine.config import set_current_engine_config
    from engine.ops import CustomOp
    from engine.testing._setup import OP_TOLERANCE, activate, kit_engine_config

    cls = activate(ctx, name)
    if not cls.supports_dtype(dtype_name):
        raise CheckSkipped(f"{cls.__qualname__}.supported_dtypes excludes {dtype_name}")
    case = OP_CASES.get(op_name)
    if case is None:
        raise CheckSkipped(f"the kit has no inputs for in-tree op {op_name!r} yet")
    dtype = getattr(torch, dtype_name)
    atol, rtol = OP_TOLERANCE[dtype_name]
    gen = torch.Generator().manual_seed(99)
    with set_current_engine_config(kit_engine_config()):
        op, calls = case(dtype, cls.device_for_rank(0), gen)
    replacement = CustomOp.op_registry_oot.get(op_name, CustomOp.op_registry[op_name])
    if not isinstance(op, replacement):
        raise CheckFailed(f"building {CustomOp.op_registry[op_name].__name__} gave "
                          f"{type(op).__qualname__}, not the registered replacement "
                          f"{replacement.__qualname__}")
    device = cls.device_for_rank(0)
    for args in calls:
        label = f"{op_name}({', '.join(_describe(a) for a in args)})"
        with torch.inference_mode():
            expected = op.forward_native(*[_clone(a, device) for a in args])
            got = op(*[_clone(a, device) for a in args])
        expected, got = _flatten(expected), _flatten(got)
        if len(got) != len(expected):
            raise CheckFailed(f"{label}: returns {len(got)} tensors, forward_native {len(expected)}")
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            where = f"{label} output {i}"
            if tuple(g.shape) != tuple(e.shape) or g.dtype != e.dtype:
                raise CheckFailed(f"{where}: {g.dtype} {tuple(g.shape)}, forward_native gives "
                                  f"{e.dtype} {tuple(e.shape)}")
            g, e = g.float().cpu(), e.float().cpu()
            diff = (g - e).abs()
            if not bool((diff <= atol + rtol * e.abs()).all()):
                raise CheckFailed(
                    f"{where}: max |diff| {float(diff.nan_to_num(float('inf')).max()):.3g} vs "
                    f"forward_native (tolerance {atol:g} + {rtol:g}*|ref| for {dtype_name})")


def _clone(arg: Any, device: Any) -> Any:
    # ops may work in place: each call gets its own copy
    return arg.to(device).clone() if hasattr(arg, "clone") else arg


def _describe(arg: Any) -> str:
    shape = getattr(arg, "shape", None)
    return f"{str(arg.dtype).removeprefix('torch.')}{list(shape)}" if shape is not None else repr(arg)
