"""A plugin's compiled C++ operator (torch.utils.cpp_extension) called from the
`forward_oot` of an out-of-tree op replacement, inside a real engine run on the
example out-of-tree platform. Slow: compiling against torch's headers takes ten
seconds and more."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ninja
import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
ACME_MANIFEST = ROOT / "examples" / "acme-platform" / "manifest"

PLUGIN = '''
"""Replaces SiluAndMul with a C++ kernel compiled on first use."""
import os

CALLS = {"cpp": 0}
_ext = None


def kernel():
    global _ext
    if _ext is None:
        import torch
        from torch.utils.cpp_extension import load

        # registered with torch.library (no Python binding module), so the source
        # includes only the headers of what it uses: a quarter of the compile time
        # of <torch/extension.h>, which load_inline would put first
        load(name="cpp_silu_ops", sources=[os.path.join(os.path.dirname(__file__), "cpp_silu.cpp")],
             is_python_module=False, build_directory=os.environ["CPP_BUILD_DIR"], verbose=False)
        _ext = torch.ops.cpp_silu
    return _ext


def register():
    from engine.ops import SiluAndMul

    @SiluAndMul.register_oot
    class CppSiluAndMul(SiluAndMul):
        def forward_oot(self, x):
            CALLS["cpp"] += 1
            return kernel().silu_and_mul(x)
'''

SOURCE = """
#include <ATen/core/Tensor.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

at::Tensor silu_and_mul(const at::Tensor& x) {
  auto d = x.size(-1) / 2;
  return at::silu(x.narrow(-1, 0, d)).mul(x.narrow(-1, d, d));
}

TORCH_LIBRARY(cpp_silu, m) { m.def("silu_and_mul(Tensor x) -> Tensor", &silu_and_mul); }
"""

MANIFEST = '''
schema-version = 1
[package]
name = "cpp-silu"
path = "."
[[plugin]]
group = "general"
name = "cpp_silu"
value = "cpp_silu:register"
'''

SCRIPT = """
import json, sys
from engine import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory=1 << 22)
out = llm.generate(["def add(a, b):", "import os"],
                   SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
calls = sys.modules["cpp_silu"].CALLS["cpp"] if "cpp_silu" in sys.modules else 0
print(json.dumps({"tokens": [o.outputs[0].token_ids for o in out], "cpp_calls": calls}))
llm.shutdown()
"""


@pytest.mark.slow
def test_compiled_cpp_op_runs_inside_an_engine_on_an_oot_platform(tmp_path, make_hf_model):
    assert shutil.which("c++") or shutil.which("g++"), \
        "no C++ compiler (c++ / g++) on PATH: the test builds a torch C++ extension"
    # ninja comes with the test extra: put its binary on PATH for the engine processes
    ninja_path = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "cpp_silu.py").write_text(textwrap.dedent(PLUGIN))
    (plugin_dir / "cpp_silu.cpp").write_text(SOURCE)
    (plugin_dir / "cpp-silu.toml").write_text(MANIFEST)
    build = tmp_path / "build"
    build.mkdir()
    model = make_hf_model("llama")

    def run(**env: str) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(model)], capture_output=True, text=True,
            timeout=300, env=subprocess_env(CPP_BUILD_DIR=str(build), OMP_NUM_THREADS="1",
                                            MAX_JOBS="2", PATH=ninja_path, **env),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    dirs = f"{plugin_dir}:{ACME_MANIFEST}"
    on_acme = run(ENGINE_PLUGIN_DIRS=dirs)
    assert on_acme["cpp_calls"] > 0  # forward_oot ran the compiled kernel
    on_cpu = run(ENGINE_PLUGIN_DIRS=dirs, ENGINE_PLATFORM="cpu")
    assert on_cpu["cpp_calls"] == 0  # the CPU platform dispatches to forward_cpu
    assert on_acme["tokens"] == on_cpu["tokens"]
