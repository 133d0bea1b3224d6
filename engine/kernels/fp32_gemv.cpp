// float32 matrix times a few rows (1 to 32), straight from the weight as it is
// stored ([N, K], row-major): the decode-time float32 linear layer. At these row
// counts the product is bound by reading the weight once, so the kernel streams
// weight rows in order, a group at a time, each group against every input row
// (the group stays in L1 while the input rows go past it; the input rows stay in
// L2), with software prefetch a few groups ahead.
//
// engine_kernels::fp32_gemv(out [M, N], x [M, K], weight [N, K], bias [N] or None,
//                           bool portable)
//     out = x @ weight.T + bias in float32 (FMA: rounding differs from a BLAS
//     sgemm by float32 reassociation only). M is 1 to 32.
// engine_kernels::fp32_gemv_path() -> str: the path `portable=False` takes here
//
// Three paths: AVX-512F intrinsics (where the library was built for, and the CPU
// has, AVX-512), AVX2 + FMA intrinsics (where it was built for a CPU with those and
// without AVX-512), and the 16-lane vector-extension code of vec.h, which compiles to
// whatever vectors the CPU has (AVX2, NEON, ...). `portable=True` forces the last,
// so that it is tested on every machine. On AVX2 the portable code's 16-lane
// accumulators are two registers each: 6 input rows x 4 weight rows of them is 48
// of the 16 ymm registers, and the compiler spills them; the AVX2 path keeps
// 8-lane accumulators for at most 3 input rows at a time (12 registers).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <string>

#if defined(__AVX512F__)
#include <immintrin.h>
#define ENGINE_FP32_AVX512 1
#else
#define ENGINE_FP32_AVX512 0
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ENGINE_FP32_AVX2 1
#else
#define ENGINE_FP32_AVX2 0
#endif

#include "vec.h"

namespace {

using namespace engine_kernels;

constexpr int64_t kMaxM = 32;
constexpr int64_t kRowsPerGroup = 4;   // weight rows per task
constexpr int64_t kMaxChunk = 6;       // input rows per pass: 6 x 4 accumulators + 4 weights
constexpr int64_t kAhead = 4;          // groups between a row's prefetch and its use

bool cpu_has_avx512() {
#if ENGINE_FP32_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

// the intrinsics path this library has and this CPU runs, if any
bool native_path() {
#if ENGINE_FP32_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return cpu_has_avx512();
#endif
}

#if ENGINE_FP32_AVX512
// dot products of R weight rows with C input rows: out[c * R + r]
template <int C, int R>
inline void dot_avx512(const float* const* w, const float* x, int64_t ldx, int64_t K,
                       float* out, const char* ahead) {
  __m512 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  int64_t k = 0;
  if constexpr (C == 1) {
    // one input row: a second set of accumulators, so that FMA latency does not
    // limit the weight stream
    __m512 acc2[R];
    for (int r = 0; r < R; ++r) acc2[r] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
      if (ahead)
        for (int r = 0; r < R; ++r) {
          __builtin_prefetch(ahead + (r * K + k) * 4);
          __builtin_prefetch(ahead + (r * K + k + 16) * 4);
        }
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      for (int r = 0; r < R; ++r) {
        acc[0][r] = _mm512_fmadd_ps(_mm512_loadu_ps(w[r] + k), x0, acc[0][r]);
        acc2[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w[r] + k + 16), x1, acc2[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc[0][r] = _mm512_add_ps(acc[0][r], acc2[r]);
  }
  for (; k + 16 <= K; k += 16) {
    if (ahead)  // one cache line per weight row per step: the stream stays fed
      for (int r = 0; r < R; ++r) __builtin_prefetch(ahead + (r * K + k) * 4);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w[r] + k);
    for (int c = 0; c < C; ++c) {
      const __m512 xv = _mm512_loadu_ps(x + c * ldx + k);
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_fmadd_ps(wv[r], xv, acc[c][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w[r] + k);
    for (int c = 0; c < C; ++c) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + c * ldx + k);
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_fmadd_ps(wv[r], xv, acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) out[c * R + r] = _mm512_reduce_add_ps(acc[c][r]);
}
#endif

#if ENGINE_FP32_AVX2
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// dot products of R weight rows with C (at most 3) input rows: out[c * R + r]
template <int C, int R>
inline void dot_avx2(const float* const* w, const float* x, int64_t ldx, int64_t K,
                     float* out, const char* ahead) {
  static_assert(C >= 1 && C <= 3, "C x R accumulators must fit the 16 ymm registers");
  __m256 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  int64_t k = 0;
  if constexpr (C == 1) {
    // one input row: a second set of accumulators, so that FMA latency does not
    // limit the weight stream
    __m256 acc2[R];
    for (int r = 0; r < R; ++r) acc2[r] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      if (ahead)  // one cache line per weight row per step
        for (int r = 0; r < R; ++r) __builtin_prefetch(ahead + (r * K + k) * 4);
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int r = 0; r < R; ++r) {
        acc[0][r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + k), x0, acc[0][r]);
        acc2[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + k + 8), x1, acc2[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc[0][r] = _mm256_add_ps(acc[0][r], acc2[r]);
  }
  for (; k + 8 <= K; k += 8) {
    if (ahead && k % 16 == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(ahead + (r * K + k) * 4);
    for (int c = 0; c < C; ++c) {
      const __m256 xv = _mm256_loadu_ps(x + c * ldx + k);
      for (int r = 0; r < R; ++r)
        acc[c][r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + k), xv, acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      float s = hsum8(acc[c][r]);
      for (int64_t j = k; j < K; ++j) s += w[r][j] * x[c * ldx + j];
      out[c * R + r] = s;
    }
}

// C input rows in passes of at most 3 (the weight rows stay in L1 between passes;
// only the first pass prefetches)
template <int C, int R>
inline void dot_avx2_rows(const float* const* w, const float* x, int64_t ldx, int64_t K,
                          float* out, const char* ahead) {
  if constexpr (C <= 3) {
    dot_avx2<C, R>(w, x, ldx, K, out, ahead);
  } else {
    dot_avx2<3, R>(w, x, ldx, K, out, ahead);
    dot_avx2_rows<C - 3, R>(w, x + 3 * ldx, ldx, K, out + 3 * R, nullptr);
  }
}
#endif

template <int C, int R>
inline void dot_portable(const float* const* w, const float* x, int64_t ldx, int64_t K,
                         float* out, const char* ahead) {
  vf acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = splat(0.f);
  const int64_t vec_end = K - K % kLanes;
  for (int64_t k = 0; k < vec_end; k += kLanes) {
    if (ahead)
      for (int r = 0; r < R; ++r) __builtin_prefetch(ahead + (r * K + k) * 4);
    vf wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load(w[r] + k);
    for (int c = 0; c < C; ++c) {
      const vf xv = load(x + c * ldx + k);
      for (int r = 0; r < R; ++r) acc[c][r] += wv[r] * xv;
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[c][r]);
      for (int64_t k = vec_end; k < K; ++k) s += w[r][k] * x[c * ldx + k];
      out[c * R + r] = s;
    }
}

template <bool Fast, int C, int R>
inline void dot(const float* const* w, const float* x, int64_t ldx, int64_t K, float* out,
                const char* ahead) {
#if ENGINE_FP32_AVX512
  if constexpr (Fast) {
    dot_avx512<C, R>(w, x, ldx, K, out, ahead);
    return;
  }
#elif ENGINE_FP32_AVX2
  if constexpr (Fast) {
    dot_avx2_rows<C, R>(w, x, ldx, K, out, ahead);
    return;
  }
#endif
  dot_portable<C, R>(w, x, ldx, K, out, ahead);
}

// R weight rows against all M input rows, in chunks of up to kMaxChunk rows
template <bool Fast, int R>
inline void group_rows(const float* const* w, const float* x, int64_t M, int64_t K, float* dots,
                       const char* ahead) {
  int64_t m = 0;
  for (; m + kMaxChunk <= M; m += kMaxChunk) {
    dot<Fast, kMaxChunk, R>(w, x + m * K, K, K, dots + m * R, m == 0 ? ahead : nullptr);
  }
  const char* a = m == 0 ? ahead : nullptr;  // only the first pass reads from memory
  switch (M - m) {
    case 1: dot<Fast, 1, R>(w, x + m * K, K, K, dots + m * R, a); break;
    case 2: dot<Fast, 2, R>(w, x + m * K, K, K, dots + m * R, a); break;
    case 3: dot<Fast, 3, R>(w, x + m * K, K, K, dots + m * R, a); break;
    case 4: dot<Fast, 4, R>(w, x + m * K, K, K, dots + m * R, a); break;
    case 5: dot<Fast, 5, R>(w, x + m * K, K, K, dots + m * R, a); break;
    default: break;
  }
}

template <bool Fast>
void gemv(float* out, const float* x, const float* weight, const float* bias, int64_t M,
          int64_t N, int64_t K) {
  const int64_t groups = (N + kRowsPerGroup - 1) / kRowsPerGroup;
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), groups)));
  // static: each thread streams one contiguous range of weight rows
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n0 = g * kRowsPerGroup;
    float dots[kMaxM * kRowsPerGroup];
    if (n0 + kRowsPerGroup <= N) {
      const float* w[kRowsPerGroup];
      for (int r = 0; r < kRowsPerGroup; ++r) w[r] = weight + (n0 + r) * K;
      const int64_t ahead_row = std::min(n0 + kAhead * kRowsPerGroup, N - kRowsPerGroup);
      group_rows<Fast, kRowsPerGroup>(w, x, M, K, dots,
                                      reinterpret_cast<const char*>(weight + ahead_row * K));
      for (int64_t m = 0; m < M; ++m)
        for (int r = 0; r < kRowsPerGroup; ++r)
          out[m * N + n0 + r] = dots[m * kRowsPerGroup + r] + (bias ? bias[n0 + r] : 0.f);
    } else {
      for (int64_t n = n0; n < N; ++n) {
        const float* w[1] = {weight + n * K};
        group_rows<Fast, 1>(w, x, M, K, dots, nullptr);
        for (int64_t m = 0; m < M; ++m) out[m * N + n] = dots[m] + (bias ? bias[n] : 0.f);
      }
    }
  }
}

void fp32_gemv(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
               const c10::optional<at::Tensor>& bias, bool portable) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && out.dim() == 2,
              "fp32_gemv: x, weight and out must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "fp32_gemv: weight must be [N, ", K, "], got ",
              weight.sizes());
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "fp32_gemv: out must be [", M, ", ", N, "]");
  TORCH_CHECK(M >= 1 && M <= kMaxM, "fp32_gemv takes 1 to ", kMaxM, " rows, got ", M);
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat, "fp32_gemv: float32 tensors only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous(),
              "fp32_gemv: contiguous tensors only");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat, "fp32_gemv: bias must be a contiguous float32 [N]");
    b = bias->data_ptr<float>();
  }
  if (!portable && native_path())
    gemv<true>(out.data_ptr<float>(), x.data_ptr<float>(), weight.data_ptr<float>(), b, M, N, K);
  else
    gemv<false>(out.data_ptr<float>(), x.data_ptr<float>(), weight.data_ptr<float>(), b, M, N, K);
}

std::string fp32_gemv_path() {
  if (!native_path()) return "portable";
  return ENGINE_FP32_AVX2 ? "avx2" : "avx512";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine_kernels, m) {
  m.def("fp32_gemv(Tensor(a!) out, Tensor x, Tensor weight, Tensor? bias, bool portable=False) -> ()");
  m.def("fp32_gemv_path() -> str");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("fp32_gemv", &fp32_gemv);
}

TORCH_LIBRARY_IMPL(engine_kernels, CompositeExplicitAutograd, m) {
  m.impl("fp32_gemv_path", &fp32_gemv_path);
}
