"""Tensor parallelism of the model layers on two real gloo ranks: each rank loads
its shard of the checkpoint, and the gathered logits equal transformers'."""

from __future__ import annotations

import multiprocessing
import socket
import traceback

import pytest
import torch

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, init_method: str, model_dirs: list[str], prompt: list[int], results):
    try:
        results.put((rank, _rank_logits(rank, init_method, model_dirs, prompt)))
    except BaseException:
        results.put((rank, traceback.format_exc()))


def _rank_logits(rank, init_method, model_dirs, prompt):
    torch.set_num_threads(1)
    from test_models_llama import PagedRunner

    from engine.config import EngineConfig, ModelConfig, ParallelConfig
    from engine.distributed import (
        destroy_distributed_environment,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from engine.model_loader import load_model
    from engine.models import register_builtin_models

    register_builtin_models()
    init_distributed_environment(2, rank, init_method, "gloo")
    initialize_model_parallel(2)
    out = {}
    try:
        for model_dir in model_dirs:
            model = load_model(EngineConfig(ModelConfig(model=model_dir, dtype="float32"),
                                            parallel_config=ParallelConfig(tensor_parallel_size=2)))
            attn = model.model.layers[0].self_attn
            out[model_dir] = {
                "heads": (attn.num_heads, attn.num_kv_heads),
                "logits": PagedRunner(model).step({"s": prompt})["s"].tolist(),
            }
    finally:
        destroy_distributed_environment()
    return out


@pytest.mark.slow
def test_two_rank_tensor_parallel_logits_match_transformers(make_hf_model):
    from test_models_llama import hf_logits

    # one KV head for two ranks (replicated) with tied embeddings; and Qwen2's biases
    dirs = [str(make_hf_model("llama", num_key_value_heads=1, tie_word_embeddings=True)),
            str(make_hf_model("qwen2"))]
    prompt = list(range(5, 18))
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_run_rank, args=(r, init_method, dirs, prompt, results))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank in range(2):
        assert isinstance(got[rank], dict), got[rank]
    assert got[0][dirs[0]]["heads"] == (2, 1) and got[0][dirs[1]]["heads"] == (2, 1)
    for model_dir in dirs:
        expected = hf_logits(model_dir, prompt)
        for rank in range(2):
            torch.testing.assert_close(torch.tensor(got[rank][model_dir]["logits"]), expected,
                                       atol=1e-4, rtol=0)
