"""`CustomOp`: the base of every engine op a platform may replace or specialise.

An in-tree op is registered under a short name (``@CustomOp.register("rms_norm")``).
Each instance picks its forward once, at construction: ``forward_native`` when the op
is disabled by ``config.compilation_config.custom_ops``, otherwise the method of the
current platform (``forward_cpu`` / ``forward_cuda`` / ``forward_oot``), which default
to ``forward_native``.

An out-of-tree class registered with ``register_oot`` replaces the in-tree class
everywhere it is constructed: ``RMSNorm(...)`` then returns the plugin's object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn as nn

from engine.config import get_current_engine_config

logger = logging.getLogger(__name__)


class CustomOp(nn.Module):
    """Base class of replaceable ops (docs/reference.md, "Other extension interfaces")."""

    # registered name -> in-tree class / out-of-tree replacement
    op_registry: ClassVar[dict[str, type[CustomOp]]] = {}
    op_registry_oot: ClassVar[dict[str, type[CustomOp]]] = {}
    # set by `register`; __new__ reads it from the class's own __dict__ only, so a
    # subclass (a replacement, or a model's variant of the op) is never redirected
    _op_name: ClassVar[str | None] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> CustomOp:
        name = cls.__dict__.get("_op_name")
        replacement = CustomOp.op_registry_oot.get(name) if name else None
        if replacement is None or replacement is cls:
            return super().__new__(cls)
        if issubclass(replacement, cls):
            # Python runs replacement.__init__ on what __new__ returns: don't run it twice.
            return super().__new__(replacement)
        return replacement(*args, **kwargs)

    def __init__(self) -> None:
        super().__init__()
        self._forward_method = self.dispatch_forward()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward_method(*args, **kwargs)

    # ------------------------------------------------------------------ forwards

    def forward_native(self, *args: Any, **kwargs: Any) -> Any:
        """The reference implementation in plain PyTorch; every op must define it."""
        raise NotImplementedError(f"{type(self).__name__}.forward_native")

    def forward_cpu(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_native(*args, **kwargs)

    def forward_cuda(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_native(*args, **kwargs)

    def forward_oot(self, *args: Any, **kwargs: Any) -> Any:
        """What an out-of-tree platform runs; override it in a replacement op."""
        return self.forward_native(*args, **kwargs)

    # ------------------------------------------------------------------ dispatch

    @classmethod
    def op_name(cls) -> str | None:
        """The registered name of this op (inherited by replacements), or None."""
        for klass in cls.__mro__:
            name = klass.__dict__.get("_op_name")
            if name:
                return name
        return None

    @classmethod
    def enabled(cls) -> bool:
        """Whether this op dispatches by platform (else it runs `forward_native`),
        from ``compilation_config.custom_ops`` of the current engine config:
        ``"all"`` (default), ``"none"``, ``"+name"``, ``"-name"``; the last toggle
        naming this op wins over the "all"/"none" base."""
        config = get_current_engine_config()
        toggles = list(config.compilation_config.custom_ops) if config is not None else []
        name = cls.op_name()
        enabled = "none" not in toggles
        for toggle in toggles:
            if name and toggle == f"+{name}":
                enabled = True
            elif name and toggle == f"-{name}":
                enabled = False
        return enabled

    def dispatch_forward(self) -> Callable[..., Any]:
        """Choose the forward method for the current platform (called once)."""
        if not self.enabled():
            return self.forward_native
        from engine.platforms import PlatformEnum, current_platform

        platform_enum = current_platform._enum
        if platform_enum == PlatformEnum.CUDA:
            return self.forward_cuda
        if platform_enum == PlatformEnum.OOT:
            return self.forward_oot
        return self.forward_cpu

    # ------------------------------------------------------------------ registration

    @classmethod
    def register(cls, name: str) -> Callable[[type[CustomOp]], type[CustomOp]]:
        """Class decorator for in-tree ops: ``@CustomOp.register("rms_norm")``."""

        def decorator(op_cls: type[CustomOp]) -> type[CustomOp]:
            existing = CustomOp.op_registry.get(name)
            if existing is not None and existing is not op_cls:
                raise ValueError(
                    f"custom op name {name!r} is already taken by {existing.__qualname__}"
                )
            op_cls._op_name = name
            CustomOp.op_registry[name] = op_cls
            return op_cls

        return decorator

    @classmethod
    def register_oot(
        cls, _decorated_op_cls: type[CustomOp] | None = None, name: str | None = None
    ) -> Any:
        """Replace an in-tree op with an out-of-tree class, everywhere it is built.

        Three forms: ``@RMSNorm.register_oot``, ``@RMSNorm.register_oot()`` and
        ``CustomOp.register_oot(_decorated_op_cls=MyNorm, name="RMSNorm")``. `name`
        is the in-tree op's class name or registered name; it defaults to the op the
        method is called on. Raises ValueError for an unknown op."""
        target = cls._resolve_oot_target(name)

        def decorator(op_cls: type[CustomOp]) -> type[CustomOp]:
            previous = CustomOp.op_registry_oot.get(target)
            if previous is not op_cls:
                import registry

                registry.record_effect("custom_op", target, module=op_cls.__module__)
            if previous is not None and previous is not op_cls:
                logger.info("custom op %r: replacement %s replaces %s", target,
                            op_cls.__qualname__, previous.__qualname__)
            CustomOp.op_registry_oot[target] = op_cls
            return op_cls

        if _decorated_op_cls is not None:
            return decorator(_decorated_op_cls)
        return decorator

    @classmethod
    def _resolve_oot_target(cls, name: str | None) -> str:
        if name is None:
            own = cls.__dict__.get("_op_name")
            if own is None:
                raise ValueError(
                    "register_oot needs the in-tree op to replace: call it on the op "
                    "class (RMSNorm.register_oot) or pass name='RMSNorm'"
                )
            return own
        if name in CustomOp.op_registry:
            return name
        for registered, op_cls in CustomOp.op_registry.items():
            if op_cls.__name__ == name:
                return registered
        valid = sorted({*CustomOp.op_registry, *(c.__name__ for c in CustomOp.op_registry.values())})
        raise ValueError(f"Unknown custom op: {name!r}. Valid options are: {', '.join(valid)}")
