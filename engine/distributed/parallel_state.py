"""Process groups of this worker and the tensor-parallel collectives model layers use.

Before `initialize_model_parallel` (or with one rank) everything behaves as a
single rank: world size 1, rank 0, collectives are the identity. Model layers
therefore call these functions unconditionally.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger("engine.distributed")


class GroupCoordinator:
    """One group of ranks: its size, this process's rank in it, and the platform's
    device communicator that performs its collectives (None for one rank)."""

    def __init__(self, ranks: list[int], rank: int, device_group: Any,
                 communicator: Any, name: str) -> None:
        self.ranks = ranks
        self.world_size = len(ranks)
        self.rank = rank  # rank within this group
        self.device_group = device_group
        self.communicator = communicator
        self.name = name

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return input_
        return self.communicator.all_reduce(input_)

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return input_
        return self.communicator.all_gather(input_, dim)

    def reduce_scatter(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return input_
        return self.communicator.reduce_scatter(input_, dim)

    def gather(self, input_: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        if self.world_size == 1:
            return input_
        return self.communicator.gather(input_, dst, dim)

    def broadcast(self, input_: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size == 1:
            return input_
        return self.communicator.broadcast(input_, src)

    def destroy(self) -> None:
        if self.communicator is not None:
            self.communicator.destroy()
            self.communicator = None

    def __repr__(self) -> str:
        return f"GroupCoordinator({self.name!r}, rank={self.rank}, world_size={self.world_size})"


_SINGLE_RANK = GroupCoordinator([0], 0, None, None, "tp")
_tp_group: GroupCoordinator | None = None
_world_initialized_here = False


def init_distributed_environment(
    world_size: int = 1,
    rank: int = 0,
    distributed_init_method: str | None = None,
    backend: str = "gloo",
) -> None:
    """Join the torch.distributed world (`tcp://host:port` rendezvous).

    A single rank without an init method needs no process group and is left
    alone; calling again once initialised is a no-op.
    """
    import torch.distributed as dist

    global _world_initialized_here
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise RuntimeError(
                f"torch.distributed is already initialised with world size "
                f"{dist.get_world_size()}, not {world_size}"
            )
        return
    if world_size == 1 and distributed_init_method is None:
        return
    if distributed_init_method is None:
        raise ValueError(f"world size {world_size} needs a distributed_init_method")
    logger.debug("rank %d/%d joins %s (%s)", rank, world_size, distributed_init_method, backend)
    dist.init_process_group(
        backend=backend, init_method=distributed_init_method, world_size=world_size, rank=rank
    )
    _world_initialized_here = True


def initialize_model_parallel(tensor_model_parallel_size: int = 1) -> None:
    """Build the tensor-parallel group over all ranks of the world, with the
    device communicator named by `current_platform.get_device_communicator_cls()`."""
    import torch.distributed as dist

    global _tp_group
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if tensor_model_parallel_size != world_size:
        raise ValueError(
            f"tensor_parallel_size {tensor_model_parallel_size} must equal the world size "
            f"{world_size} (no other parallelism exists)"
        )
    if world_size == 1:
        _tp_group = _SINGLE_RANK
        return
    from engine.platforms import current_platform
    from engine.utils import resolve_obj_by_qualname

    ranks = list(range(world_size))
    rank = dist.get_rank()
    device = current_platform.device_for_rank(rank)
    comm_cls = resolve_obj_by_qualname(current_platform.get_device_communicator_cls())
    communicator = comm_cls(group=dist.group.WORLD, device=device, unique_name="tp")
    _tp_group = GroupCoordinator(ranks, rank, dist.group.WORLD, communicator, "tp")


def model_parallel_is_initialized() -> bool:
    return _tp_group is not None


def get_tp_group() -> GroupCoordinator:
    """The tensor-parallel group (a single-rank group before initialisation)."""
    return _tp_group if _tp_group is not None else _SINGLE_RANK


def get_tensor_model_parallel_world_size() -> int:
    return get_tp_group().world_size


def get_tensor_model_parallel_rank() -> int:
    return get_tp_group().rank


def tensor_model_parallel_all_reduce(input_: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel ranks (identity with one rank)."""
    return get_tp_group().all_reduce(input_)


def tensor_model_parallel_all_gather(input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate the ranks' tensors along `dim` (identity with one rank)."""
    return get_tp_group().all_gather(input_, dim)


def tensor_model_parallel_reduce_scatter(input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return get_tp_group().reduce_scatter(input_, dim)


def tensor_model_parallel_gather(input_: torch.Tensor, dst: int = 0,
                                 dim: int = -1) -> torch.Tensor | None:
    """Concatenate along `dim` on rank `dst` only (None on the others)."""
    return get_tp_group().gather(input_, dst, dim)


def destroy_model_parallel() -> None:
    global _tp_group
    if _tp_group is not None and _tp_group is not _SINGLE_RANK:
        _tp_group.destroy()
    _tp_group = None


def destroy_distributed_environment() -> None:
    """Tear down the model-parallel groups and the process group this module made."""
    global _world_initialized_here
    destroy_model_parallel()
    if _world_initialized_here:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _world_initialized_here = False
