"""End-to-end engine runs for the kit, each in a fresh process (the platform is
chosen once per process): greedy tokens on the default model.

Run as ``python -m engine.testing._e2e [--log-stats] [--quantization NAME] [--lora DIR]``;
the platform comes from ``ENGINE_PLATFORM``. Prints one JSON object: ``platform``
and ``tokens``. With ``--lora`` (the adapter folder), the prompts run twice in one
batch, first with the adapter, then on the base model (engine.testing._lora).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from engine.testing._core import CheckFailed, CheckSkipped, KitContext

PROMPTS = ("def add(a, b):", "import os\n", "class Stack:\n    def")
MAX_TOKENS = 8
TIMEOUT_S = 300


def run_engine(platform: str, *, log_stats: bool = False, strict: bool = False,
               quantization: str | None = None, lora_path: str | None = None) -> dict[str, Any]:
    """Run the engine in a child process on `platform`; its JSON report. Raises
    CheckFailed naming the platform and the child's last lines when it fails."""
    env = dict(os.environ, ENGINE_PLATFORM=platform, OMP_NUM_THREADS="1")
    if strict:
        env["ENGINE_STRICT_PLUGINS"] = "1"
    engine_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (engine_root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "engine.testing._e2e"] + (["--log-stats"] if log_stats else [])
    if quantization is not None:
        command += ["--quantization", quantization]
    if lora_path is not None:
        command += ["--lora", lora_path]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"the engine run on platform {platform!r} took over {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise CheckFailed(f"the engine run on platform {platform!r} exited with code "
                          f"{proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_greedy_vs_cpu(ctx: KitContext, name: str) -> None:
    """Fail when the plugin platform's greedy tokens differ from the cpu platform's."""
    from engine.testing._setup import platform_cls

    cls = platform_cls(ctx, name)
    if not cls.supports_dtype("float32"):
        raise CheckSkipped(f"{cls.__qualname__}.supported_dtypes excludes float32, the dtype "
                           "greedy tokens are compared in")
    plugin = ctx.memo(("engine_run", name), lambda: run_engine(name))
    cpu = ctx.memo(("engine_run", "cpu"), lambda: run_engine("cpu"))
    for prompt, got, expected in zip(PROMPTS, plugin["tokens"], cpu["tokens"], strict=True):
        if got != expected:
            at = next((i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e),
                      min(len(got), len(expected)))
            raise CheckFailed(
                f"prompt {prompt!r}: greedy token {at} is {got[at:at + 1]} on {name!r} and "
                f"{expected[at:at + 1]} on 'cpu' (dtype float32, default model); "
                f"{name!r} gave {got}, cpu {expected}")


def _main(argv: list[str]) -> int:
    from engine import LLM, LoRARequest, SamplingParams
    from engine.platforms import current_platform

    quantization = argv[argv.index("--quantization") + 1] if "--quantization" in argv else None
    lora_path = argv[argv.index("--lora") + 1] if "--lora" in argv else None
    lora_args: dict[str, Any] = {}
    if lora_path is not None:
        lora_args = dict(enable_lora=True, max_loras=1, max_lora_rank=16)
    llm = LLM(dtype="float32", kv_cache_memory=1 << 24, log_stats="--log-stats" in argv,
              quantization=quantization, **lora_args)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    if lora_path is None:
        outputs = llm.generate(list(PROMPTS), params)
    else:  # the adapter's requests and the base model's in one batch
        lora = LoRARequest("kit-adapter", 1, lora_path)
        outputs = llm.generate(list(PROMPTS) * 2, params,
                               lora_request=[lora] * len(PROMPTS) + [None] * len(PROMPTS))
    report = {"platform": current_platform.device_name,
              "tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    llm.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
