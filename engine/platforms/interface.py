"""The `Platform` base class: what the engine asks of a hardware backend.

A platform is a class, never instantiated by plugin authors: the engine calls its
classmethods. `engine.platforms.current_platform` is the one chosen for this
process. torch is imported inside the methods that need it, so importing this
module stays cheap.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from engine.attention.selector import AttentionSelectorConfig, attention_backend_path

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams

DEFAULT_WORKER_CLS = "engine.worker.Worker"
DEFAULT_DEVICE_COMMUNICATOR_CLS = "engine.distributed.DeviceCommunicatorBase"


class PlatformEnum(enum.Enum):
    """Which family a platform belongs to; every plugin platform is `OOT`."""

    CPU = enum.auto()
    CUDA = enum.auto()
    OOT = enum.auto()
    UNSPECIFIED = enum.auto()


class Platform:
    """Base class of every platform.

    Subclasses set the class attributes and override the classmethods their
    device needs. A method the device cannot serve raises `NotImplementedError`
    naming the method, so a missing piece is obvious instead of silently wrong.
    """

    _enum: PlatformEnum = PlatformEnum.UNSPECIFIED
    device_name: str = "unspecified"
    # torch device string ("cpu", "cuda", or a PrivateUse1 name such as "npu")
    device_type: str = "cpu"
    # dtypes the device computes in: `check_and_update_config` refuses any other
    # explicit `dtype`, naming these
    supported_dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")

    # -- identity ---------------------------------------------------------

    @classmethod
    def is_cpu(cls) -> bool:
        return cls._enum == PlatformEnum.CPU

    @classmethod
    def is_cuda(cls) -> bool:
        return cls._enum == PlatformEnum.CUDA

    @classmethod
    def is_out_of_tree(cls) -> bool:
        return cls._enum == PlatformEnum.OOT

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        """A human-readable name of device `device_id`."""
        return cls.device_name

    # -- configuration ----------------------------------------------------

    @classmethod
    def check_and_update_config(cls, config: EngineConfig) -> None:
        """Adjust the engine config for this platform; runs early, in the process
        that builds the engine, before workers start.

        The base implementation refuses an explicit `dtype` outside
        `supported_dtypes` (ValueError naming the platform and the valid choices),
        sets the device, the distributed backend (when the user chose none) and,
        when `worker_cls` is "auto", the default `engine.worker.Worker`.
        Subclasses usually call `super()` and then set their own worker class.
        """
        dtype = config.model_config.dtype
        if dtype != "auto" and not cls.supports_dtype(dtype):
            raise ValueError(
                f"dtype {dtype!r} is not supported on platform {cls.device_name!r} "
                f"({cls.__qualname__}). Valid options are: auto, {', '.join(cls.supported_dtypes)}"
            )
        config.device_config.device = cls.device_type
        parallel = config.parallel_config
        if parallel.distributed_backend is None:
            parallel.distributed_backend = cls.get_default_dist_backend()
        if parallel.worker_cls == "auto":
            parallel.worker_cls = DEFAULT_WORKER_CLS

    @classmethod
    def get_attn_backend_cls(cls, selected_backend: str | None,
                             attn_selector_config: AttentionSelectorConfig) -> str:
        """Qualified class name of the attention backend to use.

        `selected_backend` is the user's choice (`LLM(attention_backend=...)`,
        `--attention-backend`); without one, `ENGINE_ATTENTION_BACKEND`; without
        that, TORCH_SDPA. Unknown names raise `ValueError` listing the valid ones.
        `attn_selector_config` (head size, dtype, ...) lets a platform refuse or
        redirect a choice; the base class ignores it.
        """
        return attention_backend_path(selected_backend)

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        """Qualified class name of the `DeviceCommunicatorBase` used for
        tensor-parallel collectives on this device."""
        return DEFAULT_DEVICE_COMMUNICATOR_CLS

    @classmethod
    def get_default_dist_backend(cls) -> str:
        """The torch.distributed backend for this device ("gloo", "nccl", ...)."""
        return "gloo"

    @classmethod
    def import_kernels(cls) -> None:
        """Import the platform's compiled ops. Called once in every process that
        builds a worker (whatever its class), before the worker is constructed."""

    # -- device -----------------------------------------------------------

    @classmethod
    def device_for_rank(cls, local_rank: int) -> torch.device:
        """The torch device a worker with this local rank computes on."""
        import torch

        return torch.device(cls.device_type)

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        """Make `device` the current device of this process (no-op by default)."""

    @classmethod
    def device_count(cls) -> int:
        raise NotImplementedError(f"{cls.__name__}.device_count is not implemented")

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        """Total memory of the device in bytes."""
        raise NotImplementedError(f"{cls.__name__}.get_device_total_memory is not implemented")

    @classmethod
    def mem_get_info(cls, device_id: int = 0) -> tuple[int, int]:
        """(free, total) memory of the device in bytes."""
        raise NotImplementedError(f"{cls.__name__}.mem_get_info is not implemented")

    # -- dtypes -----------------------------------------------------------

    @classmethod
    def supports_dtype(cls, dtype: str) -> bool:
        """Whether the device computes in `dtype` (a torch dtype name, "float16")."""
        return dtype in cls.supported_dtypes

    @classmethod
    def preferred_dtype(cls) -> str:
        """The dtype a float32 model computes in under ``dtype="auto"``: the first of
        `supported_dtypes` by default; a platform returns a faster one its device
        computes natively (the CPU platform: bfloat16 where AMX or AVX512-BF16 is
        present)."""
        return cls.supported_dtypes[0]

    @classmethod
    def resolve_auto_dtype(cls, config_dtype: str) -> str:
        """What ``dtype="auto"`` means for a checkpoint whose config.json says
        `config_dtype` ("float32", "bfloat16", ...): a float32 model runs in
        `preferred_dtype`; any other dtype is kept when the device supports it,
        else `preferred_dtype` too. The model loader calls this."""
        if config_dtype != "float32" and cls.supports_dtype(config_dtype):
            return config_dtype
        return cls.preferred_dtype()

    # -- requests ---------------------------------------------------------

    @classmethod
    def validate_request(
        cls, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> None:
        """Refuse a generation request this device cannot serve: raise ValueError
        with the reason. Called for every request before it is queued (a refused
        request never reaches the scheduler; `LLM.generate` raises the ValueError,
        the HTTP server answers 400 with its message). Accepts everything by
        default."""
