// bfloat16 matrix times a few rows, straight from the weight as it is stored
// ([N, K], row-major): the decode-time linear layer. With one to a few rows the
// product is bound by reading the weight once, so the kernel streams weight rows
// in order (four at a time, each against every input row) and does nothing else;
// oneDNN stays the better choice for many rows (engine/ops/linear.py decides).
//
// engine_kernels::bf16_gemv(out [M, N], x [M, K], weight [N, K], bias [N] or None)
//     out = x @ weight.T + bias, float32 accumulation, rounded once to bfloat16
// M is at most 8. On CPUs with AVX512-BF16 each instruction multiplies 32 pairs
// (vdpbf16ps); elsewhere, or with `portable` (bool, default false), the 16-lane
// float code of vec.h does the same sum. bf16_gemv_path() names the default path.
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <string>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "vec.h"

namespace {

using namespace engine_kernels;

constexpr int64_t kRowsPerTask = 4;  // weight rows per inner step
constexpr int64_t kMaxM = 8;
constexpr int64_t kAhead = 4;  // tasks between a row's prefetch and its use

#if defined(__AVX512BF16__)
// dot products of R weight rows with M input rows: out[m * R + r]
template <int M, int R>
inline void dot_rows_avx512bf16(const c10::BFloat16* const* w, const c10::BFloat16* x, int64_t K,
                                float* out, const char* ahead) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    // the weight rows a few tasks ahead: R cache lines per step keeps the stream fed
    for (int r = 0; r < R; ++r) __builtin_prefetch(ahead + (r * K + k) * 2);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w[r] + k);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < R; ++r)
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w[r] + k);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int r = 0; r < R; ++r)
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}
#endif

// the portable path (vec.h's vector extensions): CPUs without AVX512-BF16, and
// any CPU when the caller forces it (`portable`), so that it is tested everywhere
template <int M, int R>
inline void dot_rows_portable(const c10::BFloat16* const* w, const c10::BFloat16* x, int64_t K,
                              float* out, const char* ahead) {
  vf acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = splat(0.f);
  const int64_t vec_end = K - K % kLanes;
  for (int64_t k = 0; k < vec_end; k += kLanes) {
    if (k % 32 == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(ahead + (r * K + k) * 2);
    vf wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load(w[r] + k);
    for (int m = 0; m < M; ++m) {
      const vf xv = load(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] += wv[r] * xv;
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t k = vec_end; k < K; ++k) s += load1(w[r] + k) * load1(x + m * K + k);
      out[m * R + r] = s;
    }
}

template <bool Fast, int M, int R>
inline void dot_rows(const c10::BFloat16* const* w, const c10::BFloat16* x, int64_t K,
                     float* out, const char* ahead) {
#if defined(__AVX512BF16__)
  if constexpr (Fast) {
    dot_rows_avx512bf16<M, R>(w, x, K, out, ahead);
    return;
  }
#endif
  dot_rows_portable<M, R>(w, x, K, out, ahead);
}

template <bool Fast, int M>
void gemv_rows(c10::BFloat16* out, const c10::BFloat16* x, const c10::BFloat16* weight,
               const c10::BFloat16* bias, int64_t N, int64_t K) {
  const int64_t groups = (N + kRowsPerTask - 1) / kRowsPerTask;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), groups)));
  // static: each thread streams one contiguous range of weight rows
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n0 = g * kRowsPerTask;
    float dots[M * kRowsPerTask];
    if (n0 + kRowsPerTask <= N) {
      const c10::BFloat16* w[kRowsPerTask];
      for (int r = 0; r < kRowsPerTask; ++r) w[r] = weight + (n0 + r) * K;
      // prefetch kAhead tasks ahead (clamped to the matrix)
      const int64_t ahead_row = std::min(n0 + kAhead * kRowsPerTask, N - kRowsPerTask);
      dot_rows<Fast, M, kRowsPerTask>(w, x, K, dots,
                                reinterpret_cast<const char*>(weight + ahead_row * K));
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < kRowsPerTask; ++r) {
          float v = dots[m * kRowsPerTask + r];
          if (bias) v += static_cast<float>(bias[n0 + r]);
          out[m * N + n0 + r] = c10::BFloat16(v);
        }
    } else {
      for (int64_t n = n0; n < N; ++n) {
        const c10::BFloat16* w[1] = {weight + n * K};
        dot_rows<Fast, M, 1>(w, x, K, dots, reinterpret_cast<const char*>(w[0]));
        for (int m = 0; m < M; ++m) {
          float v = dots[m];
          if (bias) v += static_cast<float>(bias[n]);
          out[m * N + n] = c10::BFloat16(v);
        }
      }
    }
  }
}

template <bool Fast>
void gemv_dispatch(c10::BFloat16* o, const c10::BFloat16* xp, const c10::BFloat16* w,
                   const c10::BFloat16* b, int64_t M, int64_t N, int64_t K) {
  switch (M) {
    case 1: gemv_rows<Fast, 1>(o, xp, w, b, N, K); break;
    case 2: gemv_rows<Fast, 2>(o, xp, w, b, N, K); break;
    case 3: gemv_rows<Fast, 3>(o, xp, w, b, N, K); break;
    case 4: gemv_rows<Fast, 4>(o, xp, w, b, N, K); break;
    case 5: gemv_rows<Fast, 5>(o, xp, w, b, N, K); break;
    case 6: gemv_rows<Fast, 6>(o, xp, w, b, N, K); break;
    case 7: gemv_rows<Fast, 7>(o, xp, w, b, N, K); break;
    default: gemv_rows<Fast, 8>(o, xp, w, b, N, K); break;
  }
}

void bf16_gemv(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
               const c10::optional<at::Tensor>& bias, bool portable) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && out.dim() == 2, "x, weight and out must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight must be [N, ", K, "], got ", weight.sizes());
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "out must be [", M, ", ", N, "]");
  TORCH_CHECK(M >= 1 && M <= kMaxM, "bf16_gemv takes 1 to ", kMaxM, " rows, got ", M);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16, "bf16_gemv: bfloat16 tensors only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous(),
              "bf16_gemv: contiguous tensors only");
  const c10::BFloat16* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == at::kBFloat16, "bias must be a contiguous bfloat16 [N]");
    b = bias->data_ptr<c10::BFloat16>();
  }
  auto* o = out.data_ptr<c10::BFloat16>();
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* w = weight.data_ptr<c10::BFloat16>();
  if (portable)
    gemv_dispatch<false>(o, xp, w, b, M, N, K);
  else
    gemv_dispatch<true>(o, xp, w, b, M, N, K);
}

std::string bf16_gemv_path() {
#if defined(__AVX512BF16__)
  return "avx512_bf16";
#else
  return "portable";
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine_kernels, m) {
  m.def("bf16_gemv(Tensor(a!) out, Tensor x, Tensor weight, Tensor? bias, "
        "bool portable=False) -> ()");
  m.def("bf16_gemv_path() -> str");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("bf16_gemv", &bf16_gemv);
}

TORCH_LIBRARY_IMPL(engine_kernels, CompositeExplicitAutograd, m) {
  m.impl("bf16_gemv_path", &bf16_gemv_path);
}
