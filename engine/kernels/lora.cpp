// Batched LoRA for one linear layer: every row of the batch adds its own adapter's
// delta to the base layer's output, for the whole batch in one call, whatever the
// mix of adapters and base-model rows.
//
// engine_kernels::lora_add(out [T, N], x [T, K], a [S, P*R, K], b [S, R, N],
//                          ranks int32 [S, P], spans int32 [P, 2], slots int32 [T],
//                          bool portable=False)
// The adapters sit in S slots. A layer has P parts (q, k, v or gate, up of a merged
// layer; one otherwise), each with rank at most R and its own output columns
// spans[p] = (c0, c1); B keeps only those columns of each part, so a merged layer's
// B is as small as its parts'. For each row t with slot s = slots[t] >= 0 and each
// part p of rank r = ranks[s, p] > 0:
//     h = x[t] @ a[s, p*R : p*R + r].T                      (shrink)
//     out[t, c0:c1] += h @ b[s, :r, c0:c1]                  (expand)
// h stays in float32; each out element is read, summed in float32 and rounded once.
// Rows of the base model (slot -1) and parts an adapter leaves alone (rank 0) cost
// nothing. x, a and out are all float32 or all bfloat16; b is x's dtype or float32
// (a bfloat16 layer's B kept in float32 spares the expand a widening per vector).
//
// Paths: the shrink (the dot products over K) runs on AVX512-BF16 (vdpbf16ps, 32
// products per instruction) for bfloat16 and AVX-512F FMA intrinsics for float32,
// where the library was built for them (-march=native: this CPU has them);
// elsewhere, or with `portable`, on vec.h's 16-lane code. The expand runs on
// vec.h's code in both. lora_add_path(dtype) names the path `portable=False` takes.
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vec.h"

namespace {

using namespace engine_kernels;
using BF16 = c10::BFloat16;

constexpr int kGroup = 4;  // A rows per pass over the input rows: each A vector loaded once
constexpr int kTile = 4;   // rows of one slot done together: A and B loaded once for them
constexpr int kChunks = 4;  // 16-column vectors per pass of the expand: independent sums

// dot products of G rows of A (K apart) with M input rows (ldx apart): h[m * ldh + g]
#if defined(__AVX512BF16__)
template <int M, int G>
inline void shrink_fast(const BF16* x, int64_t ldx, const BF16* a, int64_t K, float* h,
                        int64_t ldh) {
  __m512 acc[M][G];
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) acc[m][g] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i av[G];
    for (int g = 0; g < G; ++g) av[g] = _mm512_loadu_si512(a + g * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * ldx + k);
      for (int g = 0; g < G; ++g)
        acc[m][g] = _mm512_dpbf16_ps(acc[m][g], (__m512bh)av[g], (__m512bh)xv);
    }
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512i av[G];
    for (int g = 0; g < G; ++g) av[g] = _mm512_maskz_loadu_epi16(mask, a + g * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
      for (int g = 0; g < G; ++g)
        acc[m][g] = _mm512_dpbf16_ps(acc[m][g], (__m512bh)av[g], (__m512bh)xv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) h[m * ldh + g] = _mm512_reduce_add_ps(acc[m][g]);
}
#endif

#if defined(__AVX512F__)
template <int M, int G>
inline void shrink_fast(const float* x, int64_t ldx, const float* a, int64_t K, float* h,
                        int64_t ldh) {
  __m512 acc[M][G];
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) acc[m][g] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 av[G];
    for (int g = 0; g < G; ++g) av[g] = _mm512_loadu_ps(a + g * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int g = 0; g < G; ++g) acc[m][g] = _mm512_fmadd_ps(av[g], xv, acc[m][g]);
    }
  }
  if (k < K) {
    const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
    __m512 av[G];
    for (int g = 0; g < G; ++g) av[g] = _mm512_maskz_loadu_ps(mask, a + g * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
      for (int g = 0; g < G; ++g) acc[m][g] = _mm512_fmadd_ps(av[g], xv, acc[m][g]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) h[m * ldh + g] = _mm512_reduce_add_ps(acc[m][g]);
}
#endif

template <typename T>
constexpr bool has_fast_path() {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, BF16>) return true;
#endif
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return true;
#endif
  return false;
}

template <int M, int G, typename T>
inline void shrink_portable(const T* x, int64_t ldx, const T* a, int64_t K, float* h,
                            int64_t ldh) {
  vf acc[M][G];
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) acc[m][g] = splat(0.f);
  const int64_t vec_end = K - K % kLanes;
  for (int64_t k = 0; k < vec_end; k += kLanes) {
    vf av[G];
    for (int g = 0; g < G; ++g) av[g] = load(a + g * K + k);
    for (int m = 0; m < M; ++m) {
      const vf xv = load(x + m * ldx + k);
      for (int g = 0; g < G; ++g) acc[m][g] += av[g] * xv;
    }
  }
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) {
      float s = hsum(acc[m][g]);
      for (int64_t k = vec_end; k < K; ++k) s += load1(a + g * K + k) * load1(x + m * ldx + k);
      h[m * ldh + g] = s;
    }
}

// h[m * ldh + j] = x[m] . a[j] for the M input rows and r consecutive rows a[j]
template <bool Fast, int M, typename T>
inline void shrink(const T* x, int64_t ldx, const T* a, int64_t r, int64_t K, float* h,
                   int64_t ldh) {
  int64_t j = 0;
  if constexpr (Fast && has_fast_path<T>()) {
#if defined(__AVX512F__)
    for (; j + kGroup <= r; j += kGroup) shrink_fast<M, kGroup>(x, ldx, a + j * K, K, h + j, ldh);
    for (; j < r; ++j) shrink_fast<M, 1>(x, ldx, a + j * K, K, h + j, ldh);
#endif
  }
  for (; j + kGroup <= r; j += kGroup) shrink_portable<M, kGroup>(x, ldx, a + j * K, K, h + j, ldh);
  for (; j < r; ++j) shrink_portable<M, 1>(x, ldx, a + j * K, K, h + j, ldh);
}

// out[m][n] += sum_j h[m * ldh + j] * b[j * N + n] over C 16-column vectors from n:
// M x C independent sums, each B vector loaded once for the M rows
template <int M, int C, typename T, typename TB>
inline void expand_block(T* const* out, const float* h, int64_t ldh, const TB* b, int64_t r,
                         int64_t N, int64_t n) {
  vf acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = load(out[m] + n + c * kLanes);
  for (int64_t j = 0; j < r; ++j) {
    vf bv[C];
    for (int c = 0; c < C; ++c) bv[c] = load(b + j * N + n + c * kLanes);
    for (int m = 0; m < M; ++m) {
      const vf hv = splat(h[m * ldh + j]);
      for (int c = 0; c < C; ++c) acc[m][c] += hv * bv[c];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) store(out[m] + n + c * kLanes, acc[m][c]);
}

// out[m][c0 .. c1) += h[m] @ b[0 .. r)[c0 .. c1) for the M rows; one rounding per element
template <int M, typename T, typename TB>
inline void expand(T* const* out, const float* h, int64_t ldh, const TB* b, int64_t r,
                   int64_t N, int64_t c0, int64_t c1) {
  int64_t n = c0;
  for (; n + kChunks * kLanes <= c1; n += kChunks * kLanes)
    expand_block<M, kChunks>(out, h, ldh, b, r, N, n);
  for (; n + kLanes <= c1; n += kLanes) expand_block<M, 1>(out, h, ldh, b, r, N, n);
  for (; n < c1; ++n)
    for (int m = 0; m < M; ++m) {
      float acc = load1(out[m] + n);
      for (int64_t j = 0; j < r; ++j) acc += h[m * ldh + j] * load1(b + j * N + n);
      store1(out[m] + n, acc);
    }
}

// M rows of one slot: the input rows are gathered (by pointer) into a dense copy
// so that the shrink reads them at one stride
template <bool Fast, int M, typename T, typename TB>
void lora_tile(const int64_t* rows, T* out, int64_t out_stride, const T* x, int64_t x_stride,
               const T* a, const TB* b, const int32_t* ranks, const int32_t* spans, int64_t s,
               int64_t P, int64_t R, int64_t K, int64_t N, T* xbuf, float* h) {
  T* orow[M];
  for (int m = 0; m < M; ++m) {
    orow[m] = out + rows[m] * out_stride;
    std::memcpy(xbuf + m * K, x + rows[m] * x_stride, K * sizeof(T));
  }
  for (int64_t p = 0; p < P; ++p) {
    const int64_t r = ranks[s * P + p];
    if (r == 0) continue;
    shrink<Fast, M>(xbuf, K, a + (s * P * R + p * R) * K, r, K, h, R);
    expand<M>(orow, h, R, b + s * R * N, r, N, spans[2 * p], spans[2 * p + 1]);
  }
}

template <bool Fast, typename T, typename TB>
void lora_rows(T* out, int64_t out_stride, const T* x, int64_t x_stride, const T* a,
               const TB* b, const int32_t* ranks, const int32_t* spans, const int32_t* slots,
               int64_t T_rows, int64_t S, int64_t P, int64_t R, int64_t K, int64_t N) {
  // the rows of each slot together (base-model rows left out), cut into tiles of
  // up to kTile rows of one slot
  std::vector<int64_t> order;
  struct Tile {
    int64_t start, size, slot;  // rows order[start .. start + size), all of `slot`
  };
  std::vector<Tile> tiles;
  order.reserve(T_rows);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t first = static_cast<int64_t>(order.size());
    for (int64_t t = 0; t < T_rows; ++t)
      if (slots[t] == s) order.push_back(t);
    const int64_t last = static_cast<int64_t>(order.size());
    for (int64_t i = first; i < last; i += kTile)
      tiles.push_back({i, std::min<int64_t>(kTile, last - i), s});
  }
  // a tile's work is at most kTile * (P*R*K + R*N) multiply-adds: a few tiles per
  // task, so that small batches do not pay for waking threads they cannot keep busy
  const int64_t per_tile = std::max<int64_t>(1, kTile * (P * R * K + R * N));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 19) / per_tile);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), grain, [&](int64_t begin, int64_t end) {
    std::vector<T> xbuf(kTile * K);
    std::vector<float> h(kTile * R);
    for (int64_t i = begin; i < end; ++i) {
      const Tile& tile = tiles[i];
      const int64_t* rows = order.data() + tile.start;
      const int64_t s = tile.slot;
      switch (tile.size) {
        case 1: lora_tile<Fast, 1>(rows, out, out_stride, x, x_stride, a, b, ranks, spans, s, P, R, K, N, xbuf.data(), h.data()); break;
        case 2: lora_tile<Fast, 2>(rows, out, out_stride, x, x_stride, a, b, ranks, spans, s, P, R, K, N, xbuf.data(), h.data()); break;
        case 3: lora_tile<Fast, 3>(rows, out, out_stride, x, x_stride, a, b, ranks, spans, s, P, R, K, N, xbuf.data(), h.data()); break;
        default: lora_tile<Fast, 4>(rows, out, out_stride, x, x_stride, a, b, ranks, spans, s, P, R, K, N, xbuf.data(), h.data()); break;
      }
    }
  });
}

void check_index(const at::Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.sizes() == sizes,
              "lora_add: ", name, " must be a contiguous int32 tensor of shape ", sizes,
              ", got ", t.scalar_type(), " ", t.sizes());
}

void lora_add(at::Tensor out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& ranks, const at::Tensor& spans, const at::Tensor& slots,
              bool portable) {
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && a.dim() == 3 && b.dim() == 3,
              "lora_add: out and x must be 2-D, a and b 3-D");
  const int64_t T_rows = x.size(0), K = x.size(1), S = a.size(0), R = b.size(1), N = b.size(2);
  const int64_t P = ranks.dim() == 2 ? ranks.size(1) : 0;
  TORCH_CHECK(P >= 1 && a.size(1) == P * R && a.size(2) == K,
              "lora_add: a must be [S, P*R, K] = [", S, ", ", P * R, ", ", K, "], got ", a.sizes());
  TORCH_CHECK(b.size(0) == S, "lora_add: b must be [", S, ", R, N], got ", b.sizes());
  TORCH_CHECK(out.size(0) == T_rows && out.size(1) == N, "lora_add: out must be [", T_rows,
              ", ", N, "], got ", out.sizes());
  check_index(ranks, "ranks", {S, P});
  check_index(spans, "spans", {P, 2});
  check_index(slots, "slots", {T_rows});
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "lora_add: float32 or bfloat16 only, got ", dtype);
  TORCH_CHECK(a.scalar_type() == dtype && out.scalar_type() == dtype &&
                  (b.scalar_type() == dtype || b.scalar_type() == at::kFloat),
              "lora_add: x, a and out must share one dtype, b that one or float32");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && x.stride(1) == 1 && out.stride(1) == 1,
              "lora_add: a and b contiguous, x and out with contiguous rows");
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const int32_t* sp = spans.data_ptr<int32_t>();
  const int32_t* sl = slots.data_ptr<int32_t>();
  for (int64_t i = 0; i < S * P; ++i)
    TORCH_CHECK(rk[i] >= 0 && rk[i] <= R, "lora_add: ranks must lie in [0, ", R, "]");
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(0 <= sp[2 * p] && sp[2 * p] <= sp[2 * p + 1] && sp[2 * p + 1] <= N,
                "lora_add: spans must lie in [0, ", N, "]");
  for (int64_t t = 0; t < T_rows; ++t)
    TORCH_CHECK(sl[t] >= -1 && sl[t] < S, "lora_add: slots must lie in [-1, ", S, ")");
  if (dtype == at::kFloat) {
    const float* bp = b.data_ptr<float>();
    if (portable)
      lora_rows<false>(out.data_ptr<float>(), out.stride(0), x.data_ptr<float>(), x.stride(0),
                       a.data_ptr<float>(), bp, rk, sp, sl, T_rows, S, P, R, K, N);
    else
      lora_rows<true>(out.data_ptr<float>(), out.stride(0), x.data_ptr<float>(), x.stride(0),
                      a.data_ptr<float>(), bp, rk, sp, sl, T_rows, S, P, R, K, N);
  } else {
    auto run = [&](auto* bp) {
      if (portable)
        lora_rows<false>(out.data_ptr<BF16>(), out.stride(0), x.data_ptr<BF16>(), x.stride(0),
                         a.data_ptr<BF16>(), bp, rk, sp, sl, T_rows, S, P, R, K, N);
      else
        lora_rows<true>(out.data_ptr<BF16>(), out.stride(0), x.data_ptr<BF16>(), x.stride(0),
                        a.data_ptr<BF16>(), bp, rk, sp, sl, T_rows, S, P, R, K, N);
    };
    if (b.scalar_type() == at::kFloat)
      run(b.data_ptr<float>());
    else
      run(b.data_ptr<BF16>());
  }
}

std::string lora_add_path(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return has_fast_path<BF16>() ? "avx512_bf16" : "portable";
  if (dtype == at::kFloat) return has_fast_path<float>() ? "avx512" : "portable";
  TORCH_CHECK(false, "lora_add: float32 or bfloat16 only, got ", dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine_kernels, m) {
  m.def("lora_add(Tensor(a!) out, Tensor x, Tensor a, Tensor b, Tensor ranks, Tensor spans, "
        "Tensor slots, bool portable=False) -> ()");
  m.def("lora_add_path(ScalarType dtype) -> str");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("lora_add", &lora_add);
}

TORCH_LIBRARY_IMPL(engine_kernels, CompositeExplicitAutograd, m) {
  m.impl("lora_add_path", &lora_add_path);
}
