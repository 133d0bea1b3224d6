"""`LoRAConfig`: the engine's LoRA settings (`enable_lora` and its limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRAConfig:
    """Set on `EngineConfig.lora_config` when LoRA is enabled.

    `max_loras` adapters can be active at once (one step mixes at most that many);
    `max_cpu_loras` adapters stay loaded in host memory, ready to activate;
    `max_lora_rank` is the largest rank an adapter may have.
    """

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        elif (not isinstance(self.max_cpu_loras, int) or isinstance(self.max_cpu_loras, bool)
              or self.max_cpu_loras < self.max_loras):
            raise ValueError(f"max_cpu_loras must be an integer >= max_loras ({self.max_loras}), "
                             f"got {self.max_cpu_loras!r}")
