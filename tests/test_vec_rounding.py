"""The kernels' float32 -> bfloat16 rounding (engine/kernels/vec.h: `store`,
`round_bf16`) and widening (`load`) give torch's bits on every code path: the one
this CPU builds (-march=native), the AVX2 one (x86-64-v3: what a CPU without
AVX-512 builds, on any CPU that can run it) and the generic one (x86-64-v2: no
AVX). Each is a small program built against vec.h alone, checking a million
float32 bit patterns (ties, infinities, NaNs, denormals among them) against c10's
scalar conversion, which is torch's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from engine.kernels import cpu_flags

VEC_H = Path(__file__).resolve().parent.parent / "engine" / "kernels" / "vec.h"

PROGRAM = r"""
#include "vec.h"
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>
using namespace engine_kernels;

static uint16_t bits16(c10::BFloat16 b) { uint16_t v; std::memcpy(&v, &b, 2); return v; }
static uint32_t bits32(float f) { uint32_t v; std::memcpy(&v, &f, 4); return v; }

int main() {
  std::mt19937 gen(1);
  std::uniform_int_distribution<uint32_t> any;
  const int n = 1 << 20;
  std::vector<float> x(n);
  for (int i = 0; i < n; i++) {
    uint32_t u = any(gen);
    if (i % 7 == 0) u = (u & 0xffff0000u) | 0x8000u;               // a tie
    if (i % 11 == 0) u = (u & 0x807fffffu) | 0x7f800000u;          // inf or NaN
    if (i % 13 == 0) u &= 0x807fffffu;                             // denormal or zero
    if (i % 17 == 0) u = (u & 0xff800000u) | 0x007fffffu;          // rounds up a binade
    std::memcpy(&x[i], &u, 4);
  }
  std::vector<c10::BFloat16> b(n);
  std::vector<float> wide(n), rounded(n);
  for (int i = 0; i < n; i += kLanes) {
    store(&b[i], load(&x[i]));
    store(&wide[i], load(&b[i]));
    store(&rounded[i], round_bf16(load(&x[i])));
  }
  long bad = 0;
  for (int i = 0; i < n; i++) {
    const c10::BFloat16 want(x[i]);  // torch's conversion
    if (bits16(b[i]) != bits16(want) || bits32(wide[i]) != bits32(static_cast<float>(b[i])) ||
        bits32(rounded[i]) != bits32(static_cast<float>(want))) {
      if (bad++ < 5)
        std::printf("x=%08x store %04x load %08x round %08x, torch %04x\n", bits32(x[i]),
                    bits16(b[i]), bits32(wide[i]), bits32(rounded[i]), bits16(want));
    }
  }
  std::printf("%ld of %d differ\n", bad, n);
  return bad != 0;
}
"""


def _can_run(march: str) -> bool:
    flags = cpu_flags()
    return march != "x86-64-v3" or {"avx2", "fma", "f16c", "bmi2"} <= flags


@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64-v2"])
def test_bf16_rounding_and_widening_equal_torchs_on_every_path(tmp_path, march):
    if not _can_run(march):
        pytest.skip(f"this CPU cannot run {march} code")
    source = tmp_path / "rounding.cpp"
    source.write_text(PROGRAM)
    program = tmp_path / "rounding"
    includes = [flag for path in cpp_extension.include_paths("cpu") for flag in ("-isystem", path)]
    # the kernels' own flags (engine.kernels.CFLAGS) but the target's -march, no OpenMP
    subprocess.run([cpp_extension.get_cxx_compiler(), "-O3", f"-march={march}", "-ffast-math",
                    "-fno-finite-math-only", "-mprefer-vector-width=512", "-std=c++20",
                    "-Wno-psabi", "-I", str(VEC_H.parent), *includes, str(source),
                    "-o", str(program)], check=True, capture_output=True)
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().endswith("0 of 1048576 differ")
