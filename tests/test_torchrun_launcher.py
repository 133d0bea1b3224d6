"""distributed_executor_backend="external_launcher": the ranks are the processes
that `torchrun` (python -m torch.distributed.run) started; each builds the same
engine and returns the same outputs, equal to one rank's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import subprocess_env

from engine import LLM, SamplingParams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPTS = ["def main():", "import os\nimport sys", "class Foo(object):"]

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from engine import LLM, SamplingParams

    model, out_dir = sys.argv[1], sys.argv[2]
    prompts = json.loads(sys.argv[3])
    llm = LLM(model, tensor_parallel_size=2, distributed_executor_backend="external_launcher",
              dtype="float32", kv_cache_memory=8 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(prompts, params) + llm.generate(prompts[:1], seeded)
    result = {"rank": int(os.environ["RANK"]),
              "tokens": [o.outputs[0].token_ids for o in outputs],
              "texts": [o.outputs[0].text for o in outputs]}
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)
    llm.llm_engine.shutdown()
""")


@pytest.mark.slow
def test_torchrun_ranks_return_identical_outputs_equal_to_one_rank(make_hf_model, tmp_path):
    model = make_hf_model("llama")
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         str(script), str(model), str(tmp_path), json.dumps(PROMPTS)],
        # TMPDIR: torchrun's agent leaves a torchelastic_* folder in the temp folder
        env=subprocess_env(TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["tokens"] == ranks[1]["tokens"]
    assert ranks[0]["texts"] == ranks[1]["texts"]

    llm = LLM(str(model), dtype="float32", kv_cache_memory=8 * 2**20)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
        outputs = llm.generate(PROMPTS, params) + llm.generate(PROMPTS[:1], seeded)
    finally:
        llm.llm_engine.shutdown()
    assert ranks[0]["tokens"] == [o.outputs[0].token_ids for o in outputs]
    assert all(len(t) == 10 for t in ranks[0]["tokens"][:3])


def test_external_launcher_outside_a_launcher_says_how_to_start(make_hf_model, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"torchrun --nproc-per-node N"):
        LLM(str(make_hf_model("llama")), tensor_parallel_size=2,
            distributed_executor_backend="external_launcher")


def test_unknown_executor_backend_lists_the_choices(make_hf_model):
    with pytest.raises(ValueError, match=r"distributed_executor_backend.*mp, ray, external_launcher"):
        LLM(str(make_hf_model("llama")), distributed_executor_backend="slurm")
