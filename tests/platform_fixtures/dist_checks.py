"""Runs in each of two spawned processes: joins a gloo group through
`parallel_state` and exercises every `DeviceCommunicatorBase` operation,
returning plain lists so the parent can compare them."""

from __future__ import annotations

import traceback


def run_rank(rank: int, world_size: int, init_method: str, results) -> None:
    try:
        results.put((rank, _checks(rank, world_size, init_method)))
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))


def _checks(rank: int, world_size: int, init_method: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from engine.distributed import (
        DeviceCommunicatorBase,
        destroy_distributed_environment,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
        get_tp_group,
        init_distributed_environment,
        initialize_model_parallel,
        tensor_model_parallel_all_gather,
        tensor_model_parallel_all_reduce,
        tensor_model_parallel_gather,
        tensor_model_parallel_reduce_scatter,
    )

    init_distributed_environment(world_size, rank, init_method, "gloo")
    initialize_model_parallel(world_size)
    comm = get_tp_group().communicator
    # rank r holds [[10r, 10r+1, 10r+2, 10r+3]]
    x = torch.arange(4, dtype=torch.float32).reshape(1, 4) + 10 * rank
    out = {
        "communicator": type(comm).__name__,
        "is_base": isinstance(comm, DeviceCommunicatorBase),
        "tp_rank": get_tensor_model_parallel_rank(),
        "tp_size": get_tensor_model_parallel_world_size(),
        "all_reduce": tensor_model_parallel_all_reduce(x.clone()).tolist(),
        "all_gather_last": tensor_model_parallel_all_gather(x).tolist(),
        "all_gather_first": tensor_model_parallel_all_gather(x, dim=0).tolist(),
        "reduce_scatter": tensor_model_parallel_reduce_scatter(x.clone()).tolist(),
        "broadcast": comm.broadcast(x.clone(), src=1).tolist(),
    }
    gathered = tensor_model_parallel_gather(x, dst=0)
    out["gather"] = None if gathered is None else gathered.tolist()
    if rank == 0:
        comm.send(x * 100, dst=1)
        out["recv"] = None
    else:
        out["recv"] = comm.recv((1, 4), torch.float32, src=0).tolist()
    destroy_distributed_environment()
    out["tp_size_after_destroy"] = get_tensor_model_parallel_world_size()
    return out
