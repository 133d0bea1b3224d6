// bfloat16 linear layer for decode-sized batches (up to 32 rows) on Intel AMX.
// The weight is repacked once into AMX tile order, so the kernel streams it
// tile after tile (1 KiB each, in memory order) while the activations stay in
// L1: at these row counts the product is bound by reading the weight, and
// oneDNN's general kernel reads it at about half the speed this one does.
//
// engine_kernels::amx_pack_weight(weight [N, K]) -> packed [N / 16, K / 32, 16, 32]
//     tile (n, k) row r holds, for the 16 outputs n*16+j, the pair
//     (W[n*16+j][k*32+2r], W[n*16+j][k*32+2r+1]): the layout TDPBF16PS reads
// engine_kernels::amx_linear(out [M, N], x [M, K], packed, bias [N] or None)
//     out = x @ W.T + bias, float32 accumulation, rounded once to bfloat16; M <= 32
// engine_kernels::amx_supported() -> bool: built with AMX and allowed by the kernel
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "amx.h"

namespace {

using engine_kernels::amx_permitted;
#if ENGINE_HAS_AMX
using engine_kernels::configure_tiles;
#endif

constexpr int64_t kTileN = 16;   // outputs per tile
constexpr int64_t kTileK = 32;   // bf16 inputs per tile row
constexpr int64_t kMaxRows = 32; // two tiles of 16 rows
constexpr int64_t kBlocksPerStep = 2;  // N tiles computed together

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
// tiles: 0-3 C (rows 0-15 / 16-31 of N block 0, then of N block 1), 4-5 A, 6-7 B
void configure(int64_t rows0, int64_t rows1) {
  const int64_t rows[8] = {rows0, rows1, rows0, rows1, rows0, rows1, kTileK / 2, kTileK / 2};
  configure_tiles(rows, 8);
}

template <bool TWO_HALVES>
void linear_blocks(const c10::BFloat16* x, const c10::BFloat16* packed, const c10::BFloat16* bias,
                   c10::BFloat16* out, int64_t M, int64_t N, int64_t K, int64_t nb_begin,
                   int64_t nb_end) {
  const int64_t kt = K / kTileK;
  const int64_t tile_elems = kTileK / 2 * 2 * kTileN;  // 512 bf16 = 1 KiB
  const int64_t x_stride = K * 2;                      // bytes
  alignas(64) float cbuf[kMaxRows * kTileN * kBlocksPerStep];
  for (int64_t nb = nb_begin; nb < nb_end; nb += kBlocksPerStep) {
    const bool pair = nb + 1 < nb_end;
    const c10::BFloat16* b0 = packed + nb * kt * tile_elems;
    const c10::BFloat16* b1 = pair ? b0 + kt * tile_elems : b0;
    // the next pair of blocks, to prefetch while this one computes
    const char* ahead = reinterpret_cast<const char*>(
        packed + std::min(nb + kBlocksPerStep, nb_end - 1) * kt * tile_elems);
    _tile_zero(0);
    _tile_zero(2);
    if (TWO_HALVES) {
      _tile_zero(1);
      _tile_zero(3);
    }
    for (int64_t k = 0; k < kt; ++k) {
      for (int64_t line = 0; line < 2 * 1024 / 64; ++line)
        _mm_prefetch(ahead + (k * 2 * 1024) + line * 64, _MM_HINT_T1);
      _tile_loadd(4, x + k * kTileK, x_stride);
      if (TWO_HALVES) _tile_loadd(5, x + 16 * K + k * kTileK, x_stride);
      _tile_loadd(6, b0 + k * tile_elems, 64);
      _tile_loadd(7, b1 + k * tile_elems, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 4, 7);
      if (TWO_HALVES) {
        _tile_dpbf16ps(1, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    // cbuf: [block][row][16]
    _tile_stored(0, cbuf, 64);
    _tile_stored(2, cbuf + kMaxRows * kTileN, 64);
    if (TWO_HALVES) {
      _tile_stored(1, cbuf + 16 * kTileN, 64);
      _tile_stored(3, cbuf + kMaxRows * kTileN + 16 * kTileN, 64);
    }
    for (int64_t blk = 0; blk < (pair ? 2 : 1); ++blk) {
      const int64_t n0 = (nb + blk) * kTileN;
      for (int64_t m = 0; m < M; ++m) {
        const float* c = cbuf + blk * kMaxRows * kTileN + m * kTileN;
        c10::BFloat16* o = out + m * N + n0;
        for (int64_t j = 0; j < kTileN; ++j) {
          float v = c[j];
          if (bias) v += static_cast<float>(bias[n0 + j]);
          o[j] = c10::BFloat16(v);
        }
      }
    }
  }
}
#endif

void amx_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_permitted(), "amx_linear: AMX is not available in this process");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && out.dim() == 2, "x/out 2-D, packed 4-D");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t N = packed.size(0) * kTileN;
  TORCH_CHECK(packed.size(1) * kTileK == K && packed.size(2) == kTileK / 2 &&
                  packed.size(3) == 2 * kTileN, "packed does not match x's ", K, " features");
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "amx_linear takes 1 to ", kMaxRows, " rows, got ", M);
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "out must be [", M, ", ", N, "]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16, "amx_linear: bfloat16 tensors only");
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous() && out.is_contiguous(),
              "amx_linear: contiguous tensors only");
  const c10::BFloat16* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == at::kBFloat16, "bias must be a contiguous bfloat16 [N]");
    b = bias->data_ptr<c10::BFloat16>();
  }
#if ENGINE_HAS_AMX
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* pp = packed.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  const int64_t blocks = N / kTileN;
  const int64_t steps = (blocks + kBlocksPerStep - 1) / kBlocksPerStep;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), steps)));
  const int64_t rows0 = std::min<int64_t>(M, 16), rows1 = M - rows0;
#pragma omp parallel num_threads(threads)
  {
    // each thread: one contiguous range of block pairs (one stream through the weight)
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t s0 = steps * t / nt, s1 = steps * (t + 1) / nt;
    const int64_t nb0 = s0 * kBlocksPerStep, nb1 = std::min(blocks, s1 * kBlocksPerStep);
    if (nb0 < nb1) {
      configure(rows0, rows1);
      if (rows1)
        linear_blocks<true>(xp, pp, b, op, M, N, K, nb0, nb1);
      else
        linear_blocks<false>(xp, pp, b, op, M, N, K, nb0, nb1);
      _tile_release();
    }
  }
#else
  (void)b;
  TORCH_CHECK(false, "amx_linear: built without AMX");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine_kernels, m) {
  m.def("amx_supported() -> bool");
  m.def("amx_pack_weight(Tensor weight) -> Tensor");
  m.def("amx_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("amx_pack_weight", &amx_pack_weight);
  m.impl("amx_linear", &amx_linear);
}

TORCH_LIBRARY_IMPL(engine_kernels, CompositeExplicitAutograd, m) {
  m.impl("amx_supported", &amx_supported);
}
