// bfloat16 linear layers on Intel AMX. The weight is repacked once into AMX tile
// order, so the kernel streams it tile after tile (1 KiB each, in memory order).
//
// Decode-sized batches (up to 32 rows): the activations stay in L1 and the product
// is bound by reading the weight, which oneDNN's general kernel reads at about half
// the speed this one does.
//
// Prompt-sized batches (more rows): each thread takes a range of output blocks and,
// for each pair of them, runs every 32-row block of x against the pair's weight
// panel (2 x K/32 tiles, 36 KiB for K = 576) while it sits in L1: the weight is
// read from memory once per call (the next pair's prefetched meanwhile), x (a few
// hundred KiB) from L2, and the threads split the outputs. oneDNN's kernel, given a
// model's worth of distinct weights (none left in cache from the layer before), ran
// 1.3-2x slower than on one weight repeated, and its 256 x 1,536 -> 576 product
// gained nothing from a second thread (docs/prefill.md, "Time to first token").
//
// engine_kernels::amx_pack_weight(weight [N, K]) -> packed [N / 16, K / 32, 16, 32]
//     tile (n, k) row r holds, for the 16 outputs n*16+j, the pair
//     (W[n*16+j][k*32+2r], W[n*16+j][k*32+2r+1]): the layout TDPBF16PS reads
// engine_kernels::amx_linear(out [M, N], x [M, K], packed, bias [N] or None)
//     out = x @ W.T + bias, float32 accumulation, rounded once to bfloat16
// engine_kernels::amx_silu_and_mul(out [M, I], x [M, K], packed, bias [2I] or None)
//     packed from the fused [gate; up] weight [2I, K]: g = x @ G.T, u = x @ U.T (plus
//     their halves of bias), each rounded to bfloat16 as the fused projection's
//     output would be, then out = silu(g) * u rounded as `silu_and_mul` rounds
//     (silu(g) to bfloat16, then the product): the result of the projection followed
//     by engine_kernels::silu_and_mul, without the [M, 2I] projection in memory
// engine_kernels::amx_supported() -> bool: built with AMX and allowed by the kernel
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx.h"
#include "vec.h"

namespace {

using engine_kernels::amx_permitted;
#if ENGINE_HAS_AMX
using engine_kernels::configure_tiles;
#endif

constexpr int64_t kTileN = 16;   // outputs per tile
constexpr int64_t kTileK = 32;   // bf16 inputs per tile row
constexpr int64_t kMaxRows = 32; // two tiles of 16 rows
constexpr int64_t kBlocksPerStep = 2;  // N tiles computed together
constexpr int64_t kKChunk = 16;        // k tiles of a weight panel kept in L1 at once

bool amx_supported() { return amx_permitted(); }

at::Tensor amx_pack_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "weight must be a bfloat16 [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % kTileN == 0 && K % kTileK == 0, "amx_pack_weight: N must be a multiple of ",
              kTileN, " and K of ", kTileK, ", got [", N, ", ", K, "]");
  at::Tensor w = weight.contiguous();
  // [N/16, 16, K/32, 16, 2] -> [N/16, K/32, 16 (pairs), 16 (outputs), 2]
  return w.view({N / kTileN, kTileN, K / kTileK, kTileK / 2, 2})
      .permute({0, 2, 3, 1, 4})
      .contiguous()
      .view({N / kTileN, K / kTileK, kTileK / 2, 2 * kTileN});
}

#if ENGINE_HAS_AMX
using engine_kernels::load;
using engine_kernels::round_out;
using engine_kernels::store_out;
using engine_kernels::vf;

constexpr int64_t kTileElems = kTileK / 2 * 2 * kTileN;  // 512 bf16 = 1 KiB

// tiles: 0-3 C (rows 0-15 / 16-31 of N block 0, then of N block 1), 4-5 A, 6-7 B
void configure(int64_t rows0, int64_t rows1) {
  const int64_t rows[8] = {rows0, rows1, rows0, rows1, rows0, rows1, kTileK / 2, kTileK / 2};
  configure_tiles(rows, 8);
}

// C tiles of up to 32 rows of x (row stride K) against the weight blocks b0 and b1
// over the k tiles [k0, k1): started from `from` (or zero), stored to `to`, both
// [block][row][16] float32; `ahead0` and `ahead1` (or null): the two weight blocks
// the next step reads, their k tiles prefetched meanwhile
template <bool TWO_HALVES>
inline void tile_products(const c10::BFloat16* x, int64_t K, const c10::BFloat16* b0,
                          const c10::BFloat16* b1, int64_t k0, int64_t k1, const float* from,
                          float* to, const char* ahead0, const char* ahead1) {
  const int64_t x_stride = K * 2;  // bytes
  if (from) {
    _tile_loadd(0, from, 64);
    _tile_loadd(2, from + kMaxRows * kTileN, 64);
    if (TWO_HALVES) {
      _tile_loadd(1, from + 16 * kTileN, 64);
      _tile_loadd(3, from + kMaxRows * kTileN + 16 * kTileN, 64);
    }
  } else {
    _tile_zero(0);
    _tile_zero(2);
    if (TWO_HALVES) {
      _tile_zero(1);
      _tile_zero(3);
    }
  }
  for (int64_t k = k0; k < k1; ++k) {
    if (ahead0)
      for (int64_t line = 0; line < 1024 / 64; ++line) {
        _mm_prefetch(ahead0 + k * 1024 + line * 64, _MM_HINT_T1);
        _mm_prefetch(ahead1 + k * 1024 + line * 64, _MM_HINT_T1);
      }
    // the second row half's A tile loads while the first half's products run
    _tile_loadd(6, b0 + k * kTileElems, 64);
    _tile_loadd(7, b1 + k * kTileElems, 64);
    _tile_loadd(4, x + k * kTileK, x_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    if (TWO_HALVES) {
      _tile_loadd(5, x + 16 * K + k * kTileK, x_stride);
      _tile_dpbf16ps(1, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, to, 64);
  _tile_stored(2, to + kMaxRows * kTileN, 64);
  if (TWO_HALVES) {
    _tile_stored(1, to + 16 * kTileN, 64);
    _tile_stored(3, to + kMaxRows * kTileN + 16 * kTileN, 64);
  }
}

inline vf bias_of(const c10::BFloat16* bias, int64_t n0) {
  return bias ? load(bias + n0) : vf{};
}

// What one step writes from cbuf. Plain: blocks nb and nb + 1 (when `pair`) of out.
// Gated (GATED): block nb of out from the gate (cbuf block 0) and up (block 1) sums.
template <bool GATED>
inline void store_rows(const float* cbuf, const c10::BFloat16* bias, c10::BFloat16* out,
                       int64_t rows, int64_t N, int64_t nb, bool pair, int64_t up_offset) {
  if (GATED) {
    const int64_t n0 = nb * kTileN;
    const vf gb = bias_of(bias, n0), ub = bias_of(bias, up_offset + n0);
    for (int64_t m = 0; m < rows; ++m) {
      // rounded as the projection's bfloat16 output, then as silu_and_mul rounds
      const vf g = round_out(load(cbuf + m * kTileN) + gb);
      const vf u = round_out(load(cbuf + kMaxRows * kTileN + m * kTileN) + ub);
      const vf silu = round_out(g / (1.f + engine_kernels::exp_approx(-g)));
      store_out(out + m * N + n0, silu * u);
    }
    return;
  }
  for (int64_t blk = 0; blk < (pair ? 2 : 1); ++blk) {
    const int64_t n0 = (nb + blk) * kTileN;
    const vf b = bias_of(bias, n0);
    for (int64_t m = 0; m < rows; ++m)
      store_out(out + m * N + n0, load(cbuf + blk * kMaxRows * kTileN + m * kTileN) + b);
  }
}

// Steps [s_begin, s_end) of one thread over the M rows of x, in 32-row blocks (the
// last M % 32 in a block of their own, configured apart). Plain: a step is a pair of
// output blocks; gated: an output block (gate block s and up block s + gate_blocks).
// A step's weight panel is used by every row block while it is in L1: K is taken
// kKChunk tiles at a time (a panel chunk of 2 x 16 KiB), each row block's
// accumulators kept in `acc` between chunks.
template <bool GATED>
void linear_steps(const c10::BFloat16* x, const c10::BFloat16* packed,
                  const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N,
                  int64_t K, int64_t blocks, int64_t s_begin, int64_t s_end,
                  int64_t gate_blocks, float* acc) {
  const int64_t kt = K / kTileK;
  const int64_t block_elems = kt * kTileElems;
  constexpr int64_t kAccElems = kMaxRows * kTileN * kBlocksPerStep;  // one row block's C
  alignas(64) float cbuf[kAccElems];
  const int64_t full = M - M % kMaxRows, tail = M % kMaxRows;
  // one block of rows (a decode step) has no panel to reuse: K in one go
  const int64_t chunk = M > kMaxRows ? kKChunk : kt;
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t m_begin = pass == 0 ? 0 : full, m_end = pass == 0 ? full : M;
    if (m_begin == m_end) continue;
    const int64_t rows0 = pass == 0 ? 16 : std::min<int64_t>(tail, 16);
    const int64_t rows1 = pass == 0 ? 16 : tail - rows0;
    configure(rows0, rows1);
    for (int64_t s = s_begin; s < s_end; ++s) {
      const int64_t nb = GATED ? s : s * kBlocksPerStep;
      const bool pair = GATED || nb + 1 < blocks;
      const c10::BFloat16* b0 = packed + nb * block_elems;
      const c10::BFloat16* b1 =
          GATED ? packed + (nb + gate_blocks) * block_elems : (pair ? b0 + block_elems : b0);
      // the next step's two weight blocks, prefetched while the first rows compute
      const int64_t next = GATED ? std::min(nb + 1, gate_blocks - 1)
                                 : std::min(nb + kBlocksPerStep, blocks - 1);
      const int64_t next1 = GATED ? next + gate_blocks : std::min(next + 1, blocks - 1);
      const char* ahead0 = reinterpret_cast<const char*>(packed + next * block_elems);
      const char* ahead1 = reinterpret_cast<const char*>(packed + next1 * block_elems);
      for (int64_t k0 = 0; k0 < kt; k0 += chunk) {
        const int64_t k1 = std::min(kt, k0 + chunk);
        const bool last = k1 == kt;
        for (int64_t m0 = m_begin; m0 < m_end; m0 += kMaxRows) {
          const c10::BFloat16* xm = x + m0 * K;
          float* a = acc + (m0 / kMaxRows) * kAccElems;
          const float* from = k0 ? a : nullptr;
          float* to = last ? cbuf : a;
          const bool first = m0 == m_begin;
          const char* pf0 = first ? ahead0 : nullptr;
          const char* pf1 = first ? ahead1 : nullptr;
          if (rows1)
            tile_products<true>(xm, K, b0, b1, k0, k1, from, to, pf0, pf1);
          else
            tile_products<false>(xm, K, b0, b1, k0, k1, from, to, pf0, pf1);
          if (last)
            store_rows<GATED>(cbuf, bias, out + m0 * N, std::min(kMaxRows, M - m0), N, nb,
                              pair, gate_blocks * kTileN);
        }
      }
    }
  }
}
#endif

// the checks both ops make; returns the bias pointer (or null)
const c10::BFloat16* check_operands(const char* op, const at::Tensor& out, const at::Tensor& x,
                                    const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                    int64_t out_features, int64_t bias_features) {
  TORCH_CHECK(amx_permitted(), op, ": AMX is not available in this process");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && out.dim() == 2, op,
              ": x/out 2-D, packed 4-D");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.size(1) * kTileK == K && packed.size(2) == kTileK / 2 &&
                  packed.size(3) == 2 * kTileN, op, ": packed does not match x's ", K,
              " features");
  TORCH_CHECK(M >= 1, op, ": x has no rows");
  TORCH_CHECK(out.size(0) == M && out.size(1) == out_features, op, ": out must be [", M, ", ",
              out_features, "]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16, op, ": bfloat16 tensors only");
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous() && out.is_contiguous(), op,
              ": contiguous tensors only");
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == bias_features && bias->is_contiguous() &&
                  bias->scalar_type() == at::kBFloat16, op, ": bias must be a contiguous bfloat16 [",
              bias_features, "]");
  return bias->data_ptr<c10::BFloat16>();
}

// Runs `steps` steps on up to torch's thread count, each thread one contiguous
// range of them (one stream through the weight).
template <bool GATED>
void run_steps(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
               const c10::BFloat16* bias, int64_t steps, int64_t gate_blocks) {
#if ENGINE_HAS_AMX
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const int64_t blocks = packed.size(0);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* pp = packed.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), steps)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t s0 = steps * t / nt, s1 = steps * (t + 1) / nt;
    if (s0 < s1) {
      // accumulators between K chunks, per 32-row block (only when K has several)
      std::vector<float> acc(M > kMaxRows && K / kTileK > kKChunk
                                 ? (M + kMaxRows - 1) / kMaxRows * kMaxRows * kTileN * kBlocksPerStep
                                 : 0);
      linear_steps<GATED>(xp, pp, bias, op, M, N, K, blocks, s0, s1, gate_blocks, acc.data());
      _tile_release();
    }
  }
#else
  (void)out, (void)x, (void)packed, (void)bias, (void)steps, (void)gate_blocks;
  TORCH_CHECK(false, "amx_linear: built without AMX");
#endif
}

void amx_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                const c10::optional<at::Tensor>& bias) {
  const int64_t N = packed.dim() == 4 ? packed.size(0) * kTileN : 0;
  const c10::BFloat16* b = check_operands("amx_linear", out, x, packed, bias, N, N);
  const int64_t blocks = N / kTileN;
  run_steps<false>(out, x, packed, b, (blocks + kBlocksPerStep - 1) / kBlocksPerStep, 0);
}

void amx_silu_and_mul(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) % 2 == 0,
              "amx_silu_and_mul: packed must hold the gate and up halves of [2I, K], I a "
              "multiple of ", kTileN);
  const int64_t gate_blocks = packed.size(0) / 2;
  const c10::BFloat16* b = check_operands("amx_silu_and_mul", out, x, packed, bias,
                                          gate_blocks * kTileN, 2 * gate_blocks * kTileN);
  run_steps<true>(out, x, packed, b, gate_blocks, gate_blocks);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine_kernels, m) {
  m.def("amx_supported() -> bool");
  m.def("amx_pack_weight(Tensor weight) -> Tensor");
  m.def("amx_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.def("amx_silu_and_mul(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("amx_pack_weight", &amx_pack_weight);
  m.impl("amx_linear", &amx_linear);
  m.impl("amx_silu_and_mul", &amx_silu_and_mul);
}

TORCH_LIBRARY_IMPL(engine_kernels, CompositeExplicitAutograd, m) {
  m.impl("amx_supported", &amx_supported);
}
