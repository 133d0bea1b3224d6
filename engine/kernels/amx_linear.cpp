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
// engine_kernels::amx_split_linear(out [M, N], x [M, K], packed, bias [N] or None)
//     float32 x, out and bias; packed by amx_pack_weight from [hi | lo] [N, 2K], the
//     weight W split into two bfloat16 parts (hi = W rounded, lo = the rest
//     rounded): out = xh Wh^T + xh Wl^T + xl Wh^T + bias, x split the same way
//     (xl Wl^T, at most 2^-16 of the product, is left out). Each part keeps 8 of
//     float32's 24 significant bits, so the product is within ~1e-5 (relative) of
//     float32's, three bfloat16 tile products in place of float32 FMAs
// engine_kernels::amx_split_silu_and_mul(out [M, I], x [M, K], packed, bias [2I] or None)
//     the same from the split fused [gate; up] weight: silu(g) * u in float32
// engine_kernels::amx_supported() -> bool: built with AMX and allowed by the kernel
#include <torch/library.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
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

// C tiles of up to 32 rows of x (row stride ldx) against the weight blocks b0 and b1
// over the k steps [k0, k1): started from `from` (or zero), stored to `to`, both
// [block][row][16] float32; `ahead0` and `ahead1` (or null): the two weight blocks
// the next step reads, their k tiles prefetched meanwhile. SPLIT (a float32
// product, see amx_split_linear): x holds [hi | lo] and each block [hi | lo] tiles,
// kt of each; steps 0..kt multiply xh by Wh, kt..2kt xh by Wl, 2kt..3kt xl by Wh.
template <bool TWO_HALVES, bool SPLIT>
inline void tile_products(const c10::BFloat16* x, int64_t ldx, int64_t kt,
                          const c10::BFloat16* b0, const c10::BFloat16* b1, int64_t k0,
                          int64_t k1, const float* from, float* to, const char* ahead0,
                          const char* ahead1) {
  const int64_t x_stride = ldx * 2;  // bytes
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
    int64_t xk = k, wk = k;
    if (SPLIT) {
      const int64_t j = k >= 2 * kt ? k - 2 * kt : (k >= kt ? k - kt : k);
      xk = k >= 2 * kt ? kt + j : j;
      wk = k >= 2 * kt ? j : k;
    }
    if (ahead0 && wk == k)
      for (int64_t line = 0; line < 1024 / 64; ++line) {
        _mm_prefetch(ahead0 + wk * 1024 + line * 64, _MM_HINT_T1);
        _mm_prefetch(ahead1 + wk * 1024 + line * 64, _MM_HINT_T1);
      }
    // the second row half's A tile loads while the first half's products run
    _tile_loadd(6, b0 + wk * kTileElems, 64);
    _tile_loadd(7, b1 + wk * kTileElems, 64);
    _tile_loadd(4, x + xk * kTileK, x_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    if (TWO_HALVES) {
      _tile_loadd(5, x + 16 * ldx + xk * kTileK, x_stride);
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

template <typename T>
inline vf bias_of(const T* bias, int64_t n0) {
  return bias ? load(bias + n0) : vf{};
}

// a result as a T op holds it: bfloat16 rounded, float32 as is
inline vf as_out(vf v, const c10::BFloat16*) { return round_out(v); }
inline vf as_out(vf v, const float*) { return v; }

// What one step writes from cbuf. Plain: blocks nb and nb + 1 (when `pair`) of out.
// Gated (GATED): block nb of out from the gate (cbuf block 0) and up (block 1) sums.
template <bool GATED, typename T>
inline void store_rows(const float* cbuf, const T* bias, T* out, int64_t rows, int64_t N,
                       int64_t nb, bool pair, int64_t up_offset) {
  if (GATED) {
    const int64_t n0 = nb * kTileN;
    const vf gb = bias_of(bias, n0), ub = bias_of(bias, up_offset + n0);
    for (int64_t m = 0; m < rows; ++m) {
      // rounded as the projection's output, then as silu_and_mul rounds
      const vf g = as_out(load(cbuf + m * kTileN) + gb, out);
      const vf u = as_out(load(cbuf + kMaxRows * kTileN + m * kTileN) + ub, out);
      const vf silu = as_out(g / (1.f + engine_kernels::exp_approx(-g)), out);
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
// accumulators kept in `acc` between chunks. K: x's features (SPLIT: x holds
// [hi | lo], 2K bfloat16 a row, and the k steps are 3 K / 32, tile_products).
template <bool GATED, bool SPLIT, typename T>
void linear_steps(const c10::BFloat16* x, const c10::BFloat16* packed, const T* bias, T* out,
                  int64_t M, int64_t N, int64_t K, int64_t blocks, int64_t s_begin,
                  int64_t s_end, int64_t gate_blocks, float* acc) {
  const int64_t kt = K / kTileK;                       // tiles of x's features
  const int64_t steps_k = SPLIT ? 3 * kt : kt;         // tile products per output tile
  const int64_t ldx = SPLIT ? 2 * K : K;
  const int64_t block_elems = (SPLIT ? 2 : 1) * kt * kTileElems;
  constexpr int64_t kAccElems = kMaxRows * kTileN * kBlocksPerStep;  // one row block's C
  alignas(64) float cbuf[kAccElems];
  const int64_t full = M - M % kMaxRows, tail = M % kMaxRows;
  // one block of rows (a decode step) has no panel to reuse: K in one go
  const int64_t chunk = M > kMaxRows ? kKChunk : steps_k;
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
      for (int64_t k0 = 0; k0 < steps_k; k0 += chunk) {
        const int64_t k1 = std::min(steps_k, k0 + chunk);
        const bool last = k1 == steps_k;
        for (int64_t m0 = m_begin; m0 < m_end; m0 += kMaxRows) {
          const c10::BFloat16* xm = x + m0 * ldx;
          float* a = acc + (m0 / kMaxRows) * kAccElems;
          const float* from = k0 ? a : nullptr;
          float* to = last ? cbuf : a;
          const bool first = m0 == m_begin;
          const char* pf0 = first ? ahead0 : nullptr;
          const char* pf1 = first ? ahead1 : nullptr;
          if (rows1)
            tile_products<true, SPLIT>(xm, ldx, kt, b0, b1, k0, k1, from, to, pf0, pf1);
          else
            tile_products<false, SPLIT>(xm, ldx, kt, b0, b1, k0, k1, from, to, pf0, pf1);
          if (last)
            store_rows<GATED>(cbuf, bias, out + m0 * N, std::min(kMaxRows, M - m0), N, nb,
                              pair, gate_blocks * kTileN);
        }
      }
    }
  }
}

// x [M, K] float32 -> [M, 2K] bfloat16: hi (x rounded) then lo (x - hi, rounded)
void split_rows(const float* x, c10::BFloat16* parts, int64_t M, int64_t K) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = x + m * K;
      c10::BFloat16* hi = parts + m * 2 * K;
      c10::BFloat16* lo = hi + K;
      for (int64_t k = 0; k < K; k += engine_kernels::kLanes) {
        const vf v = load(row + k);
        const vf h = round_out(v);
        store_out(hi + k, h);
        store_out(lo + k, v - h);
      }
    }
  });
}
#endif

// the checks every op makes; returns the bias pointer (or null). T: x's, out's and
// bias's type; `weight_k`: the packed weight's features (2K for a split one)
template <typename T>
const T* check_operands(const char* op, const at::Tensor& out, const at::Tensor& x,
                        const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                        int64_t out_features, int64_t bias_features, int64_t weight_k) {
  constexpr auto dtype = std::is_same_v<T, float> ? at::kFloat : at::kBFloat16;
  TORCH_CHECK(amx_permitted(), op, ": AMX is not available in this process");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && out.dim() == 2, op,
              ": x/out 2-D, packed 4-D");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.size(1) * kTileK == weight_k && packed.size(2) == kTileK / 2 &&
                  packed.size(3) == 2 * kTileN, op, ": packed does not match x's ", K,
              " features");
  TORCH_CHECK(M >= 1, op, ": x has no rows");
  TORCH_CHECK(out.size(0) == M && out.size(1) == out_features, op, ": out must be [", M, ", ",
              out_features, "]");
  TORCH_CHECK(x.scalar_type() == dtype && packed.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == dtype, op, ": x and out must be ", dtype,
              ", packed bfloat16");
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous() && out.is_contiguous(), op,
              ": contiguous tensors only");
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == bias_features && bias->is_contiguous() &&
                  bias->scalar_type() == dtype, op, ": bias must be a contiguous ", dtype,
              " [", bias_features, "]");
  return bias->data_ptr<T>();
}

// Runs `steps` steps on up to torch's thread count, each thread one contiguous
// range of them (one stream through the weight). SPLIT: `x` is float32, split
// into its bfloat16 parts first.
template <bool GATED, bool SPLIT, typename T>
void run_steps(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const T* bias,
               int64_t steps, int64_t gate_blocks) {
#if ENGINE_HAS_AMX
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const int64_t blocks = packed.size(0);
  at::Tensor parts;
  const c10::BFloat16* xp;
  if constexpr (SPLIT) {
    parts = at::empty({M, 2 * K}, x.options().dtype(at::kBFloat16));
    split_rows(x.data_ptr<float>(), parts.data_ptr<c10::BFloat16>(), M, K);
    xp = parts.data_ptr<c10::BFloat16>();
  } else {
    xp = x.data_ptr<c10::BFloat16>();
  }
  const auto* pp = packed.data_ptr<c10::BFloat16>();
  T* op = out.data_ptr<T>();
  const int64_t steps_k = (SPLIT ? 3 : 1) * K / kTileK;
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), steps)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t s0 = steps * t / nt, s1 = steps * (t + 1) / nt;
    if (s0 < s1) {
      // accumulators between K chunks, per 32-row block (only when K has several)
      std::vector<float> acc(M > kMaxRows && steps_k > kKChunk
                                 ? (M + kMaxRows - 1) / kMaxRows * kMaxRows * kTileN * kBlocksPerStep
                                 : 0);
      linear_steps<GATED, SPLIT>(xp, pp, bias, op, M, N, K, blocks, s0, s1, gate_blocks,
                                 acc.data());
      _tile_release();
    }
  }
#else
  (void)out, (void)x, (void)packed, (void)bias, (void)steps, (void)gate_blocks;
  TORCH_CHECK(false, "amx_linear: built without AMX");
#endif
}

template <bool SPLIT, typename T>
void linear_op(const char* name, at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
               const c10::optional<at::Tensor>& bias) {
  const int64_t N = packed.dim() == 4 ? packed.size(0) * kTileN : 0;
  const int64_t weight_k = (SPLIT ? 2 : 1) * (x.dim() == 2 ? x.size(1) : 0);
  const T* b = check_operands<T>(name, out, x, packed, bias, N, N, weight_k);
  const int64_t blocks = N / kTileN;
  run_steps<false, SPLIT>(out, x, packed, b, (blocks + kBlocksPerStep - 1) / kBlocksPerStep, 0);
}

template <bool SPLIT, typename T>
void silu_and_mul_op(const char* name, at::Tensor& out, const at::Tensor& x,
                     const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) % 2 == 0, name,
              ": packed must hold the gate and up halves of [2I, K], I a multiple of ", kTileN);
  const int64_t gate_blocks = packed.size(0) / 2;
  const int64_t weight_k = (SPLIT ? 2 : 1) * (x.dim() == 2 ? x.size(1) : 0);
  const T* b = check_operands<T>(name, out, x, packed, bias, gate_blocks * kTileN,
                                 2 * gate_blocks * kTileN, weight_k);
  run_steps<true, SPLIT>(out, x, packed, b, gate_blocks, gate_blocks);
}

void amx_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                const c10::optional<at::Tensor>& bias) {
  linear_op<false, c10::BFloat16>("amx_linear", out, x, packed, bias);
}

void amx_silu_and_mul(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias) {
  silu_and_mul_op<false, c10::BFloat16>("amx_silu_and_mul", out, x, packed, bias);
}

void amx_split_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias) {
  linear_op<true, float>("amx_split_linear", out, x, packed, bias);
}

void amx_split_silu_and_mul(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                            const c10::optional<at::Tensor>& bias) {
  silu_and_mul_op<true, float>("amx_split_silu_and_mul", out, x, packed, bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine_kernels, m) {
  m.def("amx_supported() -> bool");
  m.def("amx_pack_weight(Tensor weight) -> Tensor");
  m.def("amx_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.def("amx_silu_and_mul(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.def("amx_split_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.def("amx_split_silu_and_mul(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("amx_pack_weight", &amx_pack_weight);
  m.impl("amx_linear", &amx_linear);
  m.impl("amx_silu_and_mul", &amx_silu_and_mul);
  m.impl("amx_split_linear", &amx_split_linear);
  m.impl("amx_split_silu_and_mul", &amx_split_silu_and_mul);
}

TORCH_LIBRARY_IMPL(engine_kernels, CompositeExplicitAutograd, m) {
  m.impl("amx_supported", &amx_supported);
}
