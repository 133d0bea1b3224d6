// Small SIMD helpers shared by the engine's CPU kernels, written with GCC/Clang
// vector extensions: 16 float32 lanes per `vf`. On an AVX-512 CPU (the library is
// built with -march=native) one `vf` is one register; elsewhere the compiler
// splits it into the widest registers the CPU has, so every kernel stays portable.
//
// bfloat16 is handled as the top half of a float32: widening is a shift, and
// narrowing rounds to nearest-even (NaN stays NaN), the same result as
// torch's float32 -> bfloat16 conversion.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__) || (defined(__AVX__) && !defined(__AVX512F__))
#include <immintrin.h>
#endif

namespace engine_kernels {

typedef float vf __attribute__((vector_size(64)));      // 16 x float32
typedef uint32_t vu __attribute__((vector_size(64)));   // 16 x uint32
typedef int32_t vi __attribute__((vector_size(64)));    // 16 x int32
typedef uint16_t vh __attribute__((vector_size(32)));   // 16 x bfloat16 bits

constexpr int64_t kLanes = 16;

inline vf splat(float x) { return vf{} + x; }

#if defined(__AVX__) && !defined(__AVX512F__)
// A `vf` as the two 256-bit registers it lives in on a CPU without AVX-512, for
// lane permutations: GCC lowers a 16-lane shuffle of two sources there one element
// at a time (about 50 instructions where 3 do), see `fold` in paged_attention.cpp.
struct VfHalves {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
inline VfHalves halves(vf v) {
  VfHalves h;
  std::memcpy(&h, &v, sizeof(v));
  return h;
}
inline vf join(__m256 lo, __m256 hi) {
  const VfHalves h{lo, hi};
  vf v;
  std::memcpy(&v, &h, sizeof(v));
  return v;
}
#endif

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vf load(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

#if defined(__AVX2__) && !defined(__AVX512F__)
// `store`'s rounding of 8 lanes, in the low 16 bits of each 32-bit lane
inline __m256i bf16_bits_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  // both sides below 2^31: the signed compare is the unsigned one
  const __m256i is_nan = _mm256_cmpgt_epi32(
      _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  return _mm256_or_si256(_mm256_andnot_si256(is_nan, rounded),
                         _mm256_and_si256(is_nan, _mm256_set1_epi32(0x7fc0)));
}
#endif

inline void store(c10::BFloat16* p, vf v) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  // on the two 256-bit halves: GCC lowers the generic code's 16-lane unsigned
  // compare and its u32 -> u16 narrowing one lane at a time without AVX-512 (the
  // bfloat16 paths' vpextrd / vpinsrw). The same bits: the packing saturates, and
  // every value is below 2^16; it interleaves 128-bit lanes, the permute puts them back.
  const VfHalves h = halves(v);
  const __m256i packed = _mm256_packus_epi32(bf16_bits_avx2(h.lo), bf16_bits_avx2(h.hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
#else
  vu u;
  std::memcpy(&u, &v, sizeof(u));
  vu rounded = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
  // NaN (exponent all ones, mantissa non-zero): a quiet NaN, never rounded to inf
  vi is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  rounded = (vu)((vi)rounded & ~is_nan) | ((vu)is_nan & 0x7fc0u);
  vh h = __builtin_convertvector(rounded, vh);
  std::memcpy(p, &h, sizeof(h));
#endif
}

// scalar versions, for the tails of rows that are not a multiple of 16
inline float load1(const float* p) { return *p; }
inline float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline void store1(float* p, float x) { *p = x; }
inline void store1(c10::BFloat16* p, float x) { *p = c10::BFloat16(x); }

// round a float32 to the nearest bfloat16 and back (what a bfloat16 op's result holds)
inline vf round_bf16(vf v) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const VfHalves h = halves(v);  // in registers: the rounded bits shifted back up
  return join(_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits_avx2(h.lo), 16)),
              _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits_avx2(h.hi), 16)));
#else
  c10::BFloat16 tmp[kLanes];
  store(tmp, v);
  return load(tmp);
#endif
}

// float32 -> bfloat16, round to nearest even. A CPU with AVX512-BF16 (Xeon since
// Cooper Lake, AMD Zen 4) does it in one instruction, where the portable `store`
// above takes about ten; the results are the same except that the instruction
// flushes denormals (below 1.2e-38) to zero and keeps a NaN's sign and payload
// where torch writes its canonical NaN.
#if defined(__AVX512BF16__)
inline void store_out(c10::BFloat16* p, vf v) {
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  const __m256bh h = _mm512_cvtneps_pbh(m);
  std::memcpy(p, &h, sizeof(h));
}
// the same rounding without leaving the registers (widening is a shift)
inline vf round_out(vf v) {
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  const __m256bh h = _mm512_cvtneps_pbh(m);
  __m256i bits;
  std::memcpy(&bits, &h, sizeof(bits));
  const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
  vf out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}
#else
inline void store_out(c10::BFloat16* p, vf v) { store(p, v); }
inline vf round_out(vf v) { return round_bf16(v); }
#endif
inline void store_out(float* p, vf v) { store(p, v); }

// lane i <- lane i ^ step: the butterfly of a tree reduction
template <int step>
inline vf swap_lanes(vf v) {
  const vi idx = {0 ^ step, 1 ^ step, 2 ^ step, 3 ^ step, 4 ^ step, 5 ^ step, 6 ^ step, 7 ^ step,
                  8 ^ step, 9 ^ step, 10 ^ step, 11 ^ step, 12 ^ step, 13 ^ step, 14 ^ step,
                  15 ^ step};
#if defined(__clang__)
  (void)idx;
  return __builtin_shufflevector(v, v, 0 ^ step, 1 ^ step, 2 ^ step, 3 ^ step, 4 ^ step,
                                 5 ^ step, 6 ^ step, 7 ^ step, 8 ^ step, 9 ^ step, 10 ^ step,
                                 11 ^ step, 12 ^ step, 13 ^ step, 14 ^ step, 15 ^ step);
#else
  return __builtin_shuffle(v, idx);
#endif
}

// sum of the 16 lanes, as a tree (4 shuffles and 4 adds)
inline float hsum(vf v) {
#if defined(__AVX__) && !defined(__AVX512F__)
  // the same tree on the two 256-bit halves: 9 instructions where GCC's lowering
  // of the 16-lane shuffles takes 19 (a float32 GEMV sums one vector per output)
  const VfHalves h = halves(v);
  __m256 s = h.lo + h.hi;                         // lane i + lane i ^ 8
  s = s + _mm256_permute2f128_ps(s, s, 0x01);     // ^ 4
  s = s + _mm256_permute_ps(s, 0x4E);             // ^ 2
  s = s + _mm256_permute_ps(s, 0xB1);             // ^ 1
  return s[0];
#else
  v += swap_lanes<8>(v);
  v += swap_lanes<4>(v);
  v += swap_lanes<2>(v);
  v += swap_lanes<1>(v);
  return v[0];
#endif
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

inline float hmax(vf v) {
  v = vmax(v, swap_lanes<8>(v));
  v = vmax(v, swap_lanes<4>(v));
  v = vmax(v, swap_lanes<2>(v));
  v = vmax(v, swap_lanes<1>(v));
  return v[0];
}

// exp(x) within ~2 ulp over the float range (Cody-Waite range reduction, then
// Cephes' polynomial), branch-free so that loops over it vectorise
inline float exp_approx(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float k = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// always inlined: a 16-lane vector is passed through memory to a call without AVX-512
__attribute__((always_inline)) inline vf exp_approx(vf x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  x = x > splat(88.f) ? splat(88.f) : x;
  const vf y = x * 1.44269504088896341f + 0.5f;
#if defined(__AVX2__) && !defined(__AVX512F__)
  // k = floor(y) and 2^k on the two 256-bit halves: without AVX-512, GCC lowers the
  // 16-lane integer conversions, compare and add of the generic code below one
  // lane at a time (vpextrd / cmp / cmova / vpinsrd: thousands of instructions in
  // SiLU's loop, ~10% of its time). The same operations, the same bits.
  const VfHalves yh = halves(y);
  __m256i k_lo = _mm256_cvttps_epi32(yh.lo), k_hi = _mm256_cvttps_epi32(yh.hi);  // truncation
  k_lo = _mm256_add_epi32(k_lo, _mm256_castps_si256(  // -1 where trunc(y) > y: floor
      _mm256_cmp_ps(_mm256_cvtepi32_ps(k_lo), yh.lo, _CMP_GT_OQ)));
  k_hi = _mm256_add_epi32(k_hi, _mm256_castps_si256(
      _mm256_cmp_ps(_mm256_cvtepi32_ps(k_hi), yh.hi, _CMP_GT_OQ)));
  const vf kf = join(_mm256_cvtepi32_ps(k_lo), _mm256_cvtepi32_ps(k_hi));
  const __m256i bias = _mm256_set1_epi32(127);
  const vf scale = join(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k_lo, bias), 23)),
                        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k_hi, bias), 23)));
#else
  vi k = __builtin_convertvector(y, vi);  // truncation; floor below
  k += (vi)(__builtin_convertvector(k, vf) > y);  // true is -1
  const vf kf = __builtin_convertvector(k, vf);
  const vi bits = (k + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
#endif
  const vf r = (x - kf * 0.693359375f) - kf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * scale;
}

}  // namespace engine_kernels
