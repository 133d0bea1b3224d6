"""`DeviceCommunicatorBase`: tensor collectives over one torch.distributed group.

The default implementation uses plain torch.distributed calls, so it works for
every backend (gloo on CPU, NCCL on CUDA); a platform plugin subclasses it to use
its device's own collective library and names the subclass in
`Platform.get_device_communicator_cls()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch.distributed import ProcessGroup


class DeviceCommunicatorBase:
    """Collectives among the ranks of `group`.

    Ranks in `src`/`dst` arguments are ranks *within the group* (0 ..
    world_size - 1). `all_reduce` may reduce in place: callers hand over the
    tensor. Tensors must be on `device`.
    """

    def __init__(
        self,
        group: ProcessGroup | None = None,
        device: torch.device | None = None,
        unique_name: str = "",
    ) -> None:
        import torch
        import torch.distributed as dist

        self.group = group if group is not None else dist.group.WORLD
        self.device = device if device is not None else torch.device("cpu")
        self.unique_name = unique_name
        self.backend = dist.get_backend(self.group)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.ranks = dist.get_process_group_ranks(self.group)

    def _global(self, group_rank: int) -> int:
        if not 0 <= group_rank < self.world_size:
            raise ValueError(f"rank {group_rank} is outside the group (size {self.world_size})")
        return self.ranks[group_rank]

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        """Sum `input_` over the group; returns the sum (possibly `input_` itself)."""
        import torch.distributed as dist

        if self.world_size == 1:
            return input_
        tensor = input_ if input_.is_contiguous() else input_.contiguous()
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `input_` along `dim`, in rank order."""
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return input_
        dim = dim % input_.dim()
        if self.backend == "nccl":
            # one contiguous buffer, gathered along dim 0, then moved into place
            stacked = torch.empty(
                (self.world_size,) + tuple(input_.shape), dtype=input_.dtype, device=input_.device
            )
            dist.all_gather_into_tensor(stacked, input_.contiguous(), group=self.group)
            parts = stacked.unbind(0)
        else:
            parts = [torch.empty_like(input_) for _ in range(self.world_size)]
            dist.all_gather(parts, input_.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Sum `input_` over the group and return this rank's equal slice along `dim`."""
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return input_
        dim = dim % input_.dim()
        if input_.shape[dim] % self.world_size:
            raise ValueError(
                f"reduce_scatter: size {input_.shape[dim]} of dim {dim} is not divisible "
                f"by the world size {self.world_size}"
            )
        chunks = [c.contiguous() for c in input_.chunk(self.world_size, dim=dim)]
        if self.backend == "nccl":
            output = torch.empty_like(chunks[0])
            dist.reduce_scatter(output, chunks, group=self.group)
            return output
        # gloo has no reduce_scatter: reduce everything, keep our slice
        return self.all_reduce(input_.clone()).chunk(self.world_size, dim=dim)[self.rank]

    def gather(self, input_: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's `input_` along `dim` on rank `dst`; None elsewhere."""
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return input_
        dim = dim % input_.dim()
        parts = [torch.empty_like(input_) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(input_.contiguous(), parts, dst=self._global(dst), group=self.group)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def broadcast(self, input_: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy rank `src`'s `input_` into every rank's `input_` (in place)."""
        import torch.distributed as dist

        if self.world_size == 1:
            return input_
        dist.broadcast(input_, src=self._global(src), group=self.group)
        return input_

    def send(self, tensor: torch.Tensor, dst: int | None = None) -> None:
        """Send `tensor` to rank `dst` (default: the next rank, wrapping around)."""
        import torch.distributed as dist

        if dst is None:
            dst = (self.rank + 1) % self.world_size
        dist.send(tensor.contiguous(), dst=self._global(dst), group=self.group)

    def recv(self, size: torch.Size | tuple[int, ...], dtype: torch.dtype,
             src: int | None = None) -> torch.Tensor:
        """Receive a tensor of `size` and `dtype` from rank `src` (default: the
        previous rank, wrapping around)."""
        import torch
        import torch.distributed as dist

        if src is None:
            src = (self.rank - 1) % self.world_size
        tensor = torch.empty(size, dtype=dtype, device=self.device)
        dist.recv(tensor, src=self._global(src), group=self.group)
        return tensor

    def destroy(self) -> None:
        """Release communicator resources; the process group itself belongs to
        `parallel_state` and is destroyed there."""
