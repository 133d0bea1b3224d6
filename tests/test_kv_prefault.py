"""The KV cache paged in ahead of use (engine.worker.kv_prefault): an idle-priority
thread makes the blocks past the highest one used resident, without changing a
byte of them, so a fresh prompt's cache writes take no page faults; it stops with
the worker, and ends by itself when its cache is dropped."""

from __future__ import annotations

import gc
import resource
import time

import pytest
import torch
from test_prefill_path import _mapping_of

from engine.worker.kv_prefault import LIVENESS_S, KVPrefault
from engine.worker.worker import _zeroed_untouched

BLOCKS, BLOCK_BYTES = 512, 16 * 3 * 64 * 2  # [2, 512, 16, 3, 64] bf16: 6 KiB a block


def _wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _resident_kib(cache: torch.Tensor) -> int:
    return int(_mapping_of(cache.data_ptr() + (1 << 20))["Rss"].split()[0])


def test_blocks_ahead_become_resident_and_keep_their_contents():
    cache = _zeroed_untouched((2, BLOCKS, 16, 3, 64), torch.bfloat16, None)
    assert KVPrefault.applies_to([cache], BLOCKS)
    cache[:, 3] = 7  # a step wrote block 3
    before = _resident_kib(cache)
    prefault = KVPrefault([cache], BLOCKS, ahead_blocks=64)
    try:
        assert _wait_for(lambda: prefault.paged_in == 64), prefault.paged_in
        # K and V halves of 64 blocks (the first MiB of the mapping is not counted)
        assert _resident_kib(cache) >= before + (2 * 64 * BLOCK_BYTES - (1 << 20)) // 1024 - 16
        prefault.used(100)  # a step reached block 100: page in up to 100 + 64
        assert _wait_for(lambda: prefault.paged_in == 165), prefault.paged_in
        prefault.used(10_000)  # never past the cache's end
        assert _wait_for(lambda: prefault.paged_in == BLOCKS), prefault.paged_in
        assert _resident_kib(cache) >= (2 * BLOCKS * BLOCK_BYTES - (1 << 20)) // 1024 - 16
        # nothing written: block 3 as the step left it, every other block zero
        assert bool((cache[:, 3] == 7).all())
        cache[:, 3] = 0
        assert cache.abs().sum() == 0
        # a block the thread paged in takes no page fault when a step writes it
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cache[:, 200:264] = 1
        assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 16
    finally:
        prefault.stop()
    assert not prefault.running


def test_the_thread_ends_when_its_cache_is_dropped():
    cache = _zeroed_untouched((2, BLOCKS, 16, 3, 64), torch.bfloat16, None)
    prefault = KVPrefault([cache], BLOCKS, ahead_blocks=8)
    assert _wait_for(lambda: prefault.paged_in == 8)
    assert prefault.running
    del cache
    gc.collect()
    assert _wait_for(lambda: not prefault.running, seconds=LIVENESS_S * 5)


def test_other_layouts_are_left_alone():
    assert not KVPrefault.applies_to([], 8)
    assert not KVPrefault.applies_to([torch.zeros(8, 2, 16)], 8)  # blocks first
    assert not KVPrefault.applies_to([torch.zeros(2, 16, 8).transpose(1, 2)], 8)  # strided


@pytest.mark.usefixtures("compiled")
def test_an_engine_pages_in_past_its_last_block_and_stops_on_sleep(make_hf_model, monkeypatch,
                                                                   tmp_path):
    from engine import LLM, SamplingParams

    monkeypatch.setenv("ENGINE_CONFIG_DIR", str(tmp_path))
    llm = LLM(make_hf_model("llama"), dtype="float32", kv_cache_memory=1 << 24,
              max_num_batched_tokens=64, block_size=16, enable_sleep_mode=True,
              kv_prefault="ahead")
    worker = llm.llm_engine.executor.worker
    prefault = worker._prefault
    assert prefault is not None and prefault.ahead_blocks == 4  # 64 tokens
    out = llm.generate([list(range(3, 100))],  # 97 tokens, 100 with the outputs: 7 blocks
                       SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    # at least blocks 0-6 used: paged in up to 4 past them, while the test waits
    assert _wait_for(lambda: prefault.paged_in >= 7 + 4), prefault.paged_in
    llm.sleep(level=1)
    assert not prefault.running and worker._prefault is None
    llm.wake_up()
    assert worker._prefault is not None and worker._prefault.running
    llm.shutdown()


@pytest.mark.usefixtures("compiled")
def test_kv_prefault_all_pages_the_whole_cache_in(make_hf_model, monkeypatch, tmp_path):
    """`kv_prefault="all"` (engine serve's default): the thread pages every block in
    while the engine is idle, before any step asks for them."""
    from engine import LLM

    monkeypatch.setenv("ENGINE_CONFIG_DIR", str(tmp_path))
    with LLM(make_hf_model("llama"), dtype="float32", kv_cache_memory=1 << 24,
             max_num_batched_tokens=64, block_size=16, kv_prefault="all") as llm:
        worker = llm.llm_engine.executor.worker
        prefault = worker._prefault
        blocks = llm.llm_engine.config.cache_config.num_blocks
        assert prefault is not None and prefault.ahead_blocks == blocks
        assert _wait_for(lambda: prefault.paged_in == blocks), (prefault.paged_in, blocks)
