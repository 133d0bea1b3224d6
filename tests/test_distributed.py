"""Tensor-parallel collectives: identity on one rank, real gloo across two
spawned processes through the platform's device communicator."""

from __future__ import annotations

import multiprocessing
import queue
import socket

import pytest
import torch

from engine.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_tp_group,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_gather,
)


def test_single_rank_collectives_are_the_identity():
    assert get_tensor_model_parallel_world_size() == 1
    assert get_tensor_model_parallel_rank() == 0
    t = torch.ones(2, 3)
    assert tensor_model_parallel_all_reduce(t) is t
    assert tensor_model_parallel_all_gather(t, dim=0) is t
    assert tensor_model_parallel_gather(t) is t
    assert get_tp_group().communicator is None


@pytest.fixture(scope="module")
def two_ranks() -> dict[int, dict]:
    """Results of platform_fixtures.dist_checks on two real gloo ranks."""
    from platform_fixtures.dist_checks import run_rank

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(r, 2, f"tcp://127.0.0.1:{port}", results))
             for r in range(2)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in procs:
            rank, value = results.get(timeout=120)
            out[rank] = value
    except queue.Empty:
        pytest.fail(f"ranks did not report; exit codes {[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    for rank, value in out.items():
        assert "error" not in value, f"rank {rank}:\n{value['error']}"
    return out


def test_tp_group_uses_the_platform_device_communicator(two_ranks):
    for rank in (0, 1):
        assert two_ranks[rank]["communicator"] == "DeviceCommunicatorBase"
        assert two_ranks[rank]["tp_rank"] == rank and two_ranks[rank]["tp_size"] == 2


def test_all_reduce_sums_over_ranks(two_ranks):
    for rank in (0, 1):
        assert two_ranks[rank]["all_reduce"] == [[10.0, 12.0, 14.0, 16.0]]


def test_all_gather_concatenates_in_rank_order(two_ranks):
    for rank in (0, 1):
        assert two_ranks[rank]["all_gather_last"] == [[0, 1, 2, 3, 10, 11, 12, 13]]
        assert two_ranks[rank]["all_gather_first"] == [[0, 1, 2, 3], [10, 11, 12, 13]]


def test_reduce_scatter_keeps_each_ranks_slice_of_the_sum(two_ranks):
    assert two_ranks[0]["reduce_scatter"] == [[10.0, 12.0]]
    assert two_ranks[1]["reduce_scatter"] == [[14.0, 16.0]]


def test_gather_lands_on_the_destination_only(two_ranks):
    assert two_ranks[0]["gather"] == [[0, 1, 2, 3, 10, 11, 12, 13]]
    assert two_ranks[1]["gather"] is None


def test_broadcast_and_point_to_point(two_ranks):
    for rank in (0, 1):
        assert two_ranks[rank]["broadcast"] == [[10, 11, 12, 13]]
    assert two_ranks[1]["recv"] == [[0, 100, 200, 300]]


def test_destroy_returns_to_a_single_rank(two_ranks):
    assert {two_ranks[r]["tp_size_after_destroy"] for r in (0, 1)} == {1}
