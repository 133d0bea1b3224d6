"""`AcmePlatform`: what the engine asks of a device."""

from __future__ import annotations

from typing import Any

from engine.platforms import CpuPlatform, PlatformEnum


class AcmePlatform(CpuPlatform):
    """The Acme NPU. It inherits the CPU platform's memory queries and distributed
    backend (a real device would answer those from its runtime) and brings its own
    worker, attention backend, device communicator and kernels."""

    _enum = PlatformEnum.OOT
    device_name = "acme-npu"
    device_type = "cpu"  # the torch device the tensors live on

    @classmethod
    def check_and_update_config(cls, config: Any) -> None:
        super().check_and_update_config(config)  # device, distributed backend
        parallel = config.parallel_config
        if parallel.worker_cls in ("auto", "engine.worker.Worker"):
            parallel.worker_cls = "acme_platform.worker.AcmeWorker"

    @classmethod
    def get_attn_backend_cls(cls, selected_backend: str | None, attn_selector_config: Any) -> str:
        if selected_backend is None:  # the user's explicit choice always wins
            return "acme_platform.attention.AcmeAttentionBackend"
        return super().get_attn_backend_cls(selected_backend, attn_selector_config)

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return "acme_platform.communicator.AcmeCommunicator"

    @classmethod
    def import_kernels(cls) -> None:
        from acme_platform import kernels

        kernels.load()
