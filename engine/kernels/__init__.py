"""Compiled CPU kernels (C++ ops registered with torch.library), built once per
machine and cached.

The ops live under ``torch.ops.engine_kernels``: ``paged_decode_attention``
(decode attention reading K/V through the block table, see paged_attention.cpp)
and the decoder layer's fused element-wise ops ``rms_norm``,
``fused_add_rms_norm``, ``silu_and_mul`` and ``rotary_embedding``
(fused_ops.cpp), which the in-tree `CustomOp`s run from ``forward_cpu``,
``lora_add`` (lora.cpp: every row's own LoRA adapter in one call per layer), and
``decode_layers`` (decode_layers.cpp: a decode step's decoder layers as one call
that makes, from C++, the calls a model's fast path would make from Python).
Nothing here is needed for correctness: callers check `kernels_available()` and
fall back to plain PyTorch.

Building takes a minute or two (a C++ compiler and ninja), so it never happens on
the path of a first `engine generate`: ``ENGINE_CPU_KERNELS`` chooses

- ``auto`` (default): load the library when it is already built; when not, start
  one low-priority build in the background, for the next engine to use;
- ``build``: build now (blocking) when missing, then load;
- ``0``: never use them.

``ENGINE_KERNEL_PATH=portable`` makes the kernels that choose an instruction-set
path (the float32 and bfloat16 GEMVs, the paged decode attention, the LoRA shrink)
take their portable vector-extension code, and the AMX kernels (linear, prefill
attention) stand aside, whatever the CPU has: the fallback runs, and is tested, on
every machine. ``ENGINE_KERNEL_PATH=no-amx`` sets only the AMX kernels aside (no
weight is packed for them; the other kernels keep their best path for this CPU):
what a CPU with AVX512-BF16 and no AMX (AMD Zen 4) runs, run and tested on an
Intel CPU that has both.

``engine kernels build`` (or ``python -m engine.kernels build``) builds in the
foreground. The library lands
in ``$ENGINE_KERNEL_CACHE`` (default ``~/.cache/engine/kernels``), under a key
made of the sources, the torch version and the CPU, so any change rebuilds.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.utils import STARTUP_LOGGER

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
startup_logger = logging.getLogger(STARTUP_LOGGER)

SOURCES = ("paged_attention.cpp", "fused_ops.cpp", "gemv.cpp", "amx_linear.cpp",
           "fp32_gemv.cpp", "prefill_attention.cpp", "ggml_quant.cpp", "lora.cpp",
           "decode_layers.cpp")
HEADERS = ("vec.h", "amx.h")
LIBRARY_NAME = "engine_kernels"
MODE_ENV = "ENGINE_CPU_KERNELS"
# "portable": the kernels that pick a path from the CPU's flags take their
# portable (vector-extension) code instead, so that it runs, and is tested, anywhere;
# "no-amx": the AMX kernels stand aside, the others keep their best path
PATH_ENV = "ENGINE_KERNEL_PATH"
PATH_VALUES = ("portable", "no-amx")
CACHE_ENV = "ENGINE_KERNEL_CACHE"
# a build lock older than this is left over from a killed build
STALE_LOCK_SECONDS = 1800

_loaded: bool | None = None
_builds = itertools.count()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty elsewhere)."""
    line = _cpu_flags()
    return set(line.partition(":")[2].split()) if line.startswith("flags") else set()


def library_dir() -> Path:
    """The folder of this build's library (keyed by sources, torch, Python, CPU)."""
    import torch

    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((Path(__file__).parent / name).read_bytes())
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}".encode())
    digest.update(_cpu_flags().encode())
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "engine" / "kernels")
    return root / digest.hexdigest()[:16]


def library_path() -> Path:
    return library_dir() / f"{LIBRARY_NAME}.so"


def build() -> Path:
    """Compile the kernels into `library_path()` (blocking) and return it.

    One compiler runs at a time per library: a second caller (another process, or
    a thread) waits for the first, and when the first has just built the library
    it takes that one rather than compiling it again (two test processes that both
    need the kernels, an engine's background build beside ``engine kernels
    build``). A library that was there before the call is rebuilt."""
    import fcntl

    from torch.utils import cpp_extension

    target = library_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    there_before = target.exists()
    with open(target.parent / "build.flock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if target.exists() and not there_before:
            return target  # built by the caller we waited for
        _compile(cpp_extension, target)
    return target


# -fopenmp: at::parallel_for is inline OpenMP code; without the flag it runs on one
# thread. The library then needs libgomp.so.1, which resolves to the copy torch has
# already loaded (one thread pool).
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only",
          "-mprefer-vector-width=512", "-fopenmp")
# every source includes these first: parsing them is ~13 s of compiler time per
# source, so they are parsed once into a precompiled header. The ATen ops the
# sources call come one header each (ATen/ATen.h, every op, made the header 406
# MiB and 26 s to build, the build's serial part; these make 288 MiB and 18 s)
PRECOMPILED = ("torch/library.h", "ATen/Dispatch.h", "ATen/ops/addmm.h", "ATen/ops/empty.h",
               "ATen/ops/empty_like.h", "ATen/ops/mm.h", "ATen/Parallel.h")
# the text header that stands for the precompiled one: the compiler reads it only
# when it finds the precompiled header unusable, and then stops
_PCH_STAND_IN = '#error "engine kernels: the precompiled header was not used"\n'


def _compile(cpp_extension: Any, target: Path) -> None:
    work = target.parent / f"build-{os.getpid()}-{threading.get_ident()}"
    work.mkdir(parents=True, exist_ok=True)
    # a name of its own for each build in this process: torch's builder renames a
    # second build of one name whose flags or folder differ (engine_kernels_v1), and
    # the name is a macro of every compile, the precompiled header's too
    name = f"{LIBRARY_NAME}_{next(_builds)}"
    try:
        try:
            header = _precompile_header(cpp_extension, work / "pch", name)
        except (OSError, subprocess.CalledProcessError) as e:
            said = getattr(e, "stderr", b"") or b""
            logger.info("no precompiled header for the kernels (%s%s); each source parses "
                        "torch's headers itself", e, f": {said[-2000:].decode(errors='replace')}"
                        if said else "")
            header = None
        try:
            built = _load(cpp_extension, work, name, header)
        except RuntimeError as e:
            if header is None or "precompiled header was not used" not in str(e):
                raise
            # a compiler or torch that takes other flags than `_compile_flags` says
            logger.warning("the precompiled header did not match the kernels' compile flags; "
                           "building without it")
            shutil.rmtree(work / "pch", ignore_errors=True)
            built = _load(cpp_extension, work, f"{name}_plain", None)
        os.replace(built, target)  # atomic: readers see all or nothing
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load(cpp_extension: Any, work: Path, name: str, header: Path | None) -> Path:
    """Compile and link the sources with torch's extension builder into
    ``work/<name>.so``, each source starting with `header` (the precompiled one)
    when given."""
    pch = ["-Winvalid-pch", "-include", str(header)] if header is not None else []
    return Path(cpp_extension.load(
        name=name,
        sources=[str(Path(__file__).parent / source) for source in SOURCES],
        build_directory=str(work),
        extra_cflags=[*CFLAGS, *pch],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    ))


def _compile_flags(cpp_extension: Any, name: str) -> list[str]:
    """The flags torch's extension builder gives the compiler for each source (its
    recipe for a CPU extension on Linux): a precompiled header is used only by a
    compile with the same ones."""
    import sysconfig

    includes = [*cpp_extension.include_paths("cpu"),
                sysconfig.get_path("include", scheme="posix_prefix")]
    return [f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H",
            *(flag for path in includes for flag in ("-isystem", path)),
            "-fPIC", "-std=c++20", *CFLAGS]


def _precompile_header(cpp_extension: Any, folder: Path, name: str) -> Path:
    """Compile `PRECOMPILED` into ``folder/engine_pch.h.gch`` and return the
    header to include (``folder/engine_pch.h``, the stand-in that fails the build
    when the compiler does not take the precompiled one)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "engine_pch_source.h"
    source.write_text("".join(f"#include <{included}>\n" for included in PRECOMPILED))
    header = folder / "engine_pch.h"
    header.write_text(_PCH_STAND_IN)
    subprocess.run([cpp_extension.get_cxx_compiler(), *_compile_flags(cpp_extension, name),
                    "-x", "c++-header", str(source), "-o", f"{header}.gch"],
                   check=True, capture_output=True)
    return header


def _start_background_build() -> None:
    lock = library_dir() / "building.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        if time.time() - lock.stat().st_mtime < STALE_LOCK_SECONDS:
            return  # another process is building it
        lock.unlink()
    except FileNotFoundError:
        pass
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    log = open(lock.parent / "build.log", "ab")  # noqa: SIM115 - handed to the child
    # niced, in its own session: it outlives this engine and yields the CPU to it
    cmd = [sys.executable, "-m", "engine.kernels", "build", "--unlock", str(lock)]
    subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                     start_new_session=True, preexec_fn=lambda: os.nice(19))
    log.close()
    startup_logger.info(
        "building the compiled CPU kernels in the background, at low priority (a minute or "
        "two; log: %s); until they are built plain PyTorch runs, whose bfloat16 results "
        "can differ in the last bits. `engine kernels build` builds them now",
        lock.parent / "build.log")


def kernels_available() -> bool:
    """Whether ``torch.ops.engine_kernels`` is loaded in this process (loading the
    cached library, or building it, as ``ENGINE_CPU_KERNELS`` says)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    mode = os.environ.get(MODE_ENV, "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        _loaded = False
        return False
    try:
        path = library_path()
        if not path.exists():
            if mode == "build":
                build()
            else:
                _start_background_build()
                _loaded = False
                return False
        import torch

        torch.ops.load_library(str(path))
        _loaded = True
    except Exception as e:  # a kernel problem must never stop the engine
        logger.warning("CPU kernels unavailable, using plain PyTorch: %s", e)
        _loaded = False
    return _loaded


# the linear kernels of a decode step, as engine_kernels::decode_layers (decode_layers.cpp)
# takes them: engine.ops.linear.few_rows_kernel picks among the first four,
# fast_linear_kernel adds the AMX kernel past the few-row sizes (LINEAR_AMX; a gate_up
# projection's with the activation in it: LINEAR_AMX_SILU), a GGUF block method's
# `decode_kernel` says LINEAR_GGML; where none of them takes a bf16 step of up to 32
# rows (no AMX), oneDNN's product on the packed weight (LINEAR_ONEDNN; a gate_up
# projection's with the activation: LINEAR_ONEDNN_SILU)
LINEAR_BF16_GEMV, LINEAR_AMX, LINEAR_AMX_SPLIT, LINEAR_FP32_GEMV, LINEAR_GGML = 1, 2, 3, 4, 5
LINEAR_AMX_SILU, LINEAR_ONEDNN, LINEAR_ONEDNN_SILU = 6, 7, 8
# a quantized weight of several block types: each range's LINEAR_GGML call into
# its columns of one output
LINEAR_GGML_PARTS = 9


_kernel_dtypes: tuple = ()  # (torch.float32, torch.bfloat16) once torch is imported


def usable_for(*tensors: torch.Tensor) -> bool:
    """Whether the compiled ops can take `tensors`: all on the CPU, all float32
    or all bfloat16, and the kernels loaded (`kernels_available`). Called on
    every op of every step: kept to a few attribute reads."""
    global _kernel_dtypes
    if not (_loaded or (_loaded is None and kernels_available())):
        return False
    if not _kernel_dtypes:
        import torch

        _kernel_dtypes = (torch.float32, torch.bfloat16)
    dtype = tensors[0].dtype
    if dtype not in _kernel_dtypes:
        return False
    for t in tensors:
        if t.dtype is not dtype or not t.is_cpu:
            return False
    return True


def _path_asked() -> str:
    value = os.environ.get(PATH_ENV, "").strip().lower()
    if value in PATH_VALUES or value in ("", "auto"):
        return value
    raise ValueError(f"{PATH_ENV}={value!r} is not a kernel path: valid: "
                     f"{', '.join(PATH_VALUES)}, or auto (the default: the best this CPU has)")


def portable_forced() -> bool:
    """Whether ``ENGINE_KERNEL_PATH=portable`` asks for the portable kernel paths."""
    return _path_asked() == "portable"


def amx_set_aside() -> bool:
    """Whether ``ENGINE_KERNEL_PATH`` keeps the AMX kernels out (``portable`` or
    ``no-amx``): no weight is packed for them and no product or attention takes
    them, as on a CPU without AMX."""
    return _path_asked() in PATH_VALUES


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.kernels build``: build the kernels now."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "build":
        print("usage: python -m engine.kernels build", file=sys.stderr)
        return 2
    try:
        print(build())
    finally:
        if "--unlock" in args:
            Path(args[args.index("--unlock") + 1]).unlink(missing_ok=True)
    return 0
