// Decode attention straight from the paged KV cache: each decoding sequence's
// single query row attends over its context, reading K/V block by block through
// its block table (no gathered copy of the context).
//
// engine_kernels::paged_decode_attention(out, query, kv_cache, block_tables,
//     seq_lens, query_start_loc, decode_seqs, scale, portable=False)
//   query, out:       [T, H, D]   the step's rows; only the decode rows are written
//   kv_cache:         [2, num_blocks, block_size, Hkv, D]
//   block_tables:     [S, max_blocks] int64, seq_lens [S] int64,
//   query_start_loc:  [S + 1] int64 (sequence s's decode row is query_start_loc[s])
//   decode_seqs:      [n] int64, the sequences to compute
//   portable:         vec.h's vector extensions even where the CPU has a path of
//                     its own (so that code is tested everywhere): AVX512-BF16
//                     scores of a bfloat16 cache, or the AVX2 task (both dtypes)
// engine_kernels::paged_decode_attention_path() -> str: the path a bfloat16 cache
//   takes with portable=False here ("avx512_bf16", "avx2" or "portable"; a
//   float32 cache takes "avx2" where that is the answer, else the portable code).
//
// A task is one (sequence, KV head) pair: its K and V rows are read once, 16
// tokens at a time, for the whole group of query heads sharing that KV head,
// with an online softmax; when there are fewer pairs than threads can share, long
// contexts are split into pieces merged at the end. Head sizes that are not a
// multiple of 16 take a scalar path. Scores, softmax and the weighted sum are
// accumulated in float32.
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "vec.h"

namespace {

using namespace engine_kernels;

// Scalar reference path, for head sizes that are not a multiple of 16.
template <typename scalar_t>
void decode_item_scalar(const scalar_t* q_row, scalar_t* o_row, const scalar_t* k_base,
                        const scalar_t* v_base, const int64_t* table, int64_t len,
                        int64_t block_size, int64_t cache_stride, int64_t token_stride,
                        int64_t G, int64_t D, float scale, float* scores) {
  for (int64_t g = 0; g < G; ++g) {
    const scalar_t* q = q_row + g * D;
    float* sg = scores + g * len;
    float mx = -INFINITY;
    for (int64_t t = 0; t < len; ++t) {
      const scalar_t* k = k_base + table[t / block_size] * cache_stride +
                          (t % block_size) * token_stride;
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += load1(q + d) * load1(k + d);
      sg[t] = dot * scale;
      mx = sg[t] > mx ? sg[t] : mx;
    }
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      sg[t] = exp_approx(sg[t] - mx);
      sum += sg[t];
    }
    for (int64_t d = 0; d < D; ++d) {
      float acc = 0.f;
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* v = v_base + table[t / block_size] * cache_stride +
                            (t % block_size) * token_stride;
        acc += sg[t] * load1(v + d);
      }
      store1(o_row + g * D + d, acc / sum);
    }
  }
}

// Prefetch one token row of the next cache block while this block is computed
// (blocks are scattered: the hardware prefetcher cannot guess the next one), into
// L2 rather than L1: a chunk requests 64 lines ahead, more than L1 tracks at once
// (4-7% faster at 32 sequences x 300 tokens, one thread, bench in docs/decode-attention.md).
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

// Two vectors folded into one, each lane of the result the sum of two lanes of x
// (lanes whose bit log2(s) is clear) or of y (set): one level of reducing 16 vectors
// to the vector of their 16 sums, with two lane permutations and one add per pair
// instead of a horizontal sum (four of each) per vector.
template <int s>
inline vf fold(vf x, vf y) {
#if defined(__AVX__) && !defined(__AVX512F__)
  // the same lanes, added in the same pairs, with two 256-bit registers a vector:
  // the generic shuffles below become ~50 scalar moves each on such a CPU (5-10%
  // of a call with the K/V in cache: docs/decode-attention.md)
  const VfHalves a = halves(x), b = halves(y);
  if constexpr (s == 8) {
    return join(a.lo + a.hi, b.lo + b.hi);
  } else if constexpr (s == 4) {  // 128-bit halves: x's, then y's
    return join(_mm256_permute2f128_ps(a.lo, b.lo, 0x20) + _mm256_permute2f128_ps(a.lo, b.lo, 0x31),
                _mm256_permute2f128_ps(a.hi, b.hi, 0x20) + _mm256_permute2f128_ps(a.hi, b.hi, 0x31));
  } else if constexpr (s == 2) {  // pairs: x0 x1 y0 y1 + x2 x3 y2 y3
    return join(_mm256_shuffle_ps(a.lo, b.lo, 0x44) + _mm256_shuffle_ps(a.lo, b.lo, 0xEE),
                _mm256_shuffle_ps(a.hi, b.hi, 0x44) + _mm256_shuffle_ps(a.hi, b.hi, 0xEE));
  } else {  // x0+x1 x2+x3 y0+y1 y2+y3, then reordered to x0+x1 y0+y1 x2+x3 y2+y3
    const __m256 lo = _mm256_shuffle_ps(a.lo, b.lo, 0x88) + _mm256_shuffle_ps(a.lo, b.lo, 0xDD);
    const __m256 hi = _mm256_shuffle_ps(a.hi, b.hi, 0x88) + _mm256_shuffle_ps(a.hi, b.hi, 0xDD);
    return join(_mm256_permute_ps(lo, 0xD8), _mm256_permute_ps(hi, 0xD8));
  }
#else
#define ENGINE_LO(L) (((L) % (2 * s) < s) ? (L) : (L) - s + 16)
#define ENGINE_HI(L) (ENGINE_LO(L) + s)
#if defined(__clang__)
  const vf lo = __builtin_shufflevector(x, y, ENGINE_LO(0), ENGINE_LO(1), ENGINE_LO(2), ENGINE_LO(3),
      ENGINE_LO(4), ENGINE_LO(5), ENGINE_LO(6), ENGINE_LO(7), ENGINE_LO(8), ENGINE_LO(9),
      ENGINE_LO(10), ENGINE_LO(11), ENGINE_LO(12), ENGINE_LO(13), ENGINE_LO(14), ENGINE_LO(15));
  const vf hi = __builtin_shufflevector(x, y, ENGINE_HI(0), ENGINE_HI(1), ENGINE_HI(2), ENGINE_HI(3),
      ENGINE_HI(4), ENGINE_HI(5), ENGINE_HI(6), ENGINE_HI(7), ENGINE_HI(8), ENGINE_HI(9),
      ENGINE_HI(10), ENGINE_HI(11), ENGINE_HI(12), ENGINE_HI(13), ENGINE_HI(14), ENGINE_HI(15));
#else
  const vi lo_idx = {ENGINE_LO(0), ENGINE_LO(1), ENGINE_LO(2), ENGINE_LO(3), ENGINE_LO(4),
                     ENGINE_LO(5), ENGINE_LO(6), ENGINE_LO(7), ENGINE_LO(8), ENGINE_LO(9),
                     ENGINE_LO(10), ENGINE_LO(11), ENGINE_LO(12), ENGINE_LO(13), ENGINE_LO(14),
                     ENGINE_LO(15)};
  const vi hi_idx = lo_idx + s;
  const vf lo = __builtin_shuffle(x, y, lo_idx);
  const vf hi = __builtin_shuffle(x, y, hi_idx);
#endif
#undef ENGINE_LO
#undef ENGINE_HI
  return lo + hi;
#endif
}

// r[j] = sum of the lanes of a[j], for 16 vectors stored in bit-reversed order
// (a[bitrev4(j)] holds token j's vector): the four folding levels put the vector at
// index i into lane bitrev4(i), so the stored order brings token j to lane j.
__attribute__((always_inline)) inline vf reduce16(const vf* a) {
  vf b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) b[i] = fold<8>(a[2 * i], a[2 * i + 1]);
  for (int i = 0; i < 4; ++i) c[i] = fold<4>(b[2 * i], b[2 * i + 1]);
  for (int i = 0; i < 2; ++i) d[i] = fold<2>(c[2 * i], c[2 * i + 1]);
  return fold<1>(d[0], d[1]);
}

constexpr int kBitrev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
// query heads one task keeps in registers (a larger group is split into tiles)
constexpr int64_t kMaxGroup = 8;
// a context shorter than this is never split between threads
constexpr int64_t kMinSplitTokens = 256;

// One task: query heads [g0, g0 + G) of KV head kvh of one sequence, over its
// context's tokens [t_begin, t_end): every K and V row of that KV head read once,
// 16 tokens at a time, scored against the whole query group (the group's scaled
// queries and output accumulators stay in registers), online softmax in float32.
// The result is the unnormalised accumulator with its running max and sum, which
// the caller normalises (or merges with the other pieces of a split context).
// NC_T / G_T: the head size in 16-lane chunks and the group size, compile-time for
// the common shapes (0: taken from nc / g at run time, for the rest). kDot: a
// bfloat16 cache on an AVX512-BF16 CPU scores with vdpbf16ps straight from the
// stored bfloat16 pairs (the query is bfloat16 too: the products are exact and
// summed in float32; the scale is applied to the sums), no widening of K.
template <typename scalar_t, int NC_T, int G_T, bool kDot>
void decode_task(const scalar_t* q_rows, const scalar_t* k_base, const scalar_t* v_base,
                 const int64_t* table, int64_t t_begin, int64_t t_end, int64_t block_size,
                 int64_t cache_stride, int64_t token_stride, int nc_rt, int g_rt, float scale,
                 float* acc_out, float* m_out, float* l_out) {
  const int NC = NC_T > 0 ? NC_T : nc_rt;
  const int G = G_T > 0 ? G_T : g_rt;
  constexpr int NCA = NC_T > 0 ? NC_T : 16;
  constexpr int GA = G_T > 0 ? G_T : static_cast<int>(kMaxGroup);
  const int64_t D = NC * kLanes;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  vf q[GA][NCA], acc[GA][NCA];
  float m[GA];
  vf l[GA];  // per lane: the sums are added up once, at the end
#if defined(__AVX512BF16__)
  __m512i q2[GA][NCA / 2 > 0 ? NCA / 2 : 1];
  if constexpr (kDot)
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < NC / 2; ++c) q2[g][c] = _mm512_loadu_si512(q_rows + g * D + c * 2 * kLanes);
#endif
  const vf score_scale = splat(kDot ? scale : 1.f);
  for (int g = 0; g < G; ++g) {
    for (int c = 0; c < NC; ++c) {
      q[g][c] = load(q_rows + g * D + c * kLanes) * (kDot ? 1.f : scale);
      acc[g][c] = splat(0.f);
    }
    m[g] = -INFINITY;
    l[g] = splat(0.f);
  }
  vf part[GA][16];
  alignas(64) float p[GA][16];
  const scalar_t* k_rows[16];
  const scalar_t* v_rows[16];
  int64_t b = t_begin / block_size, off = t_begin % block_size;
  const int64_t last_block = t_end > 0 ? (t_end - 1) / block_size : 0;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, t_end - t0));
    // this chunk's rows; with each row, the same row of the next block prefetched
    // (a few requests in flight at a time, not a whole block's at once)
    for (int j = 0; j < count; ++j) {
      const int64_t base = table[b] * cache_stride + off * token_stride;
      k_rows[j] = k_base + base;
      v_rows[j] = v_base + base;
      if (b < last_block) {
        const int64_t next = table[b + 1] * cache_stride + off * token_stride;
        prefetch_row(k_base + next, row_bytes);
        prefetch_row(v_base + next, row_bytes);
      }
      if (++off == block_size) {
        off = 0;
        ++b;
      }
    }
    // scores: each K row loaded once for the whole group
#if defined(__AVX512BF16__)
    if constexpr (kDot) {
      for (int j = 0; j < count; ++j) {
        __m512i k[NCA / 2 > 0 ? NCA / 2 : 1];
        for (int c = 0; c < NC / 2; ++c) k[c] = _mm512_loadu_si512(k_rows[j] + c * 2 * kLanes);
        for (int g = 0; g < G; ++g) {
          __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)q2[g][0], (__m512bh)k[0]);
          for (int c = 1; c < NC / 2; ++c) a = _mm512_dpbf16_ps(a, (__m512bh)q2[g][c], (__m512bh)k[c]);
          part[g][kBitrev4[j]] = (vf)a;
        }
      }
    } else
#endif
    for (int j = 0; j < count; ++j) {
      vf k[NCA];
      for (int c = 0; c < NC; ++c) k[c] = load(k_rows[j] + c * kLanes);
      for (int g = 0; g < G; ++g) {
        vf a = q[g][0] * k[0];
        for (int c = 1; c < NC; ++c) a += q[g][c] * k[c];
        part[g][kBitrev4[j]] = a;
      }
    }
    for (int j = count; j < 16; ++j)
      for (int g = 0; g < G; ++g) part[g][kBitrev4[j]] = splat(0.f);
    vi lane;
    for (int j = 0; j < 16; ++j) lane[j] = j;
    const vi valid = lane < count;
    for (int g = 0; g < G; ++g) {
      vf s = reduce16(part[g]) * score_scale;
      s = valid ? s : splat(-INFINITY);
      const float m_new = std::max(m[g], hmax(s));
      if (m_new > m[g]) {
        // a new maximum: what was summed so far shrinks (to 0 on the first chunk);
        // past the first chunks the maximum seldom moves, and this is skipped
        const vf alpha = splat(exp_approx(m[g] - m_new));
        for (int c = 0; c < NC; ++c) acc[g][c] *= alpha;
        l[g] *= alpha;
        m[g] = m_new;
      }
      vf e = exp_approx(s - m_new);
      e = valid ? e : splat(0.f);
      l[g] += e;
      store(p[g], e);
    }
    // values: each V row loaded once, accumulated into every head of the group
    for (int j = 0; j < count; ++j) {
      vf v[NCA];
      for (int c = 0; c < NC; ++c) v[c] = load(v_rows[j] + c * kLanes);
      for (int g = 0; g < G; ++g) {
        const vf pj = splat(p[g][j]);
        for (int c = 0; c < NC; ++c) acc[g][c] += pj * v[c];
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int c = 0; c < NC; ++c) store(acc_out + g * D + c * kLanes, acc[g][c]);
    m_out[g] = m[g];
    l_out[g] = hsum(l[g]);
  }
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define ENGINE_DECODE_AVX2 1
// The task for a CPU with AVX2 and no AVX-512 (AMD Zen 2/3, Intel before Skylake-SP),
// on 8-lane registers. The generic task above keeps a whole group's queries and
// accumulators in 16-lane vectors, 2 x 12-64 of the 16 ymm registers there: GCC
// spills them and shuffles the spilled halves through the stack, ~500 cycles a token
// and KV head on one thread (docs/decode-attention.md, "The AVX2 task"). Here only
// what one step of a loop needs is in registers: the queries are read from L1 by
// the FMAs, the output accumulators are loaded and stored once per 8-float column
// of 8 tokens, and heads go in tiles of at most 4 (one K/V chunk, then in L1, read
// once per tile).

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // widening is a shift
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// lane j = the sum of the lanes of v[j]
inline __m256 reduce8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // 4-lane sums
  return _mm256_permute2f128_ps(u0, u1, 0x20) + _mm256_permute2f128_ps(u0, u1, 0x31);
}

inline float hmax8(__m256 v) {
  v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 0x01));
  v = _mm256_max_ps(v, _mm256_permute_ps(v, 0x4E));
  v = _mm256_max_ps(v, _mm256_permute_ps(v, 0xB1));
  return v[0];
}

inline float hsum8(__m256 v) {
  v = v + _mm256_permute2f128_ps(v, v, 0x01);
  v = v + _mm256_permute_ps(v, 0x4E);
  v = v + _mm256_permute_ps(v, 0xB1);
  return v[0];
}

// vec.h's exp_approx on 8 lanes (the same range reduction and polynomial)
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 kf = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(-2.12194440e-4f),
                                    _mm256_fnmadd_ps(kf, _mm256_set1_ps(0.693359375f), x));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, r * r, r + _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(kf), _mm256_set1_epi32(127)), 23);
  return p * _mm256_castsi256_ps(bits);
}

// One chunk of at most 8 tokens (`count`) for a tile of GT query heads: scores,
// online softmax, values. q: the tile's scaled queries [GT, D] in float32; acc: its
// accumulators [GT, D] (in the task's output); m, l: its running maxima and
// per-lane sums.
template <typename scalar_t, int GT>
void chunk_avx2(const float* q, const scalar_t* const* k_rows, const scalar_t* const* v_rows,
                int count, int64_t D, float* acc, float* m, __m256* l) {
  // scores: token j's dot products with each head, two accumulators per head
  // (even and odd columns) so that the FMA chains overlap
  alignas(32) __m256 part[GT][8];
  for (int j = 0; j < count; ++j) {
    __m256 a0[GT], a1[GT];
    for (int g = 0; g < GT; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c += 16) {
      const __m256 k0 = load8(k_rows[j] + c), k1 = load8(k_rows[j] + c + 8);
      for (int g = 0; g < GT; ++g) {
        a0[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + c), k0, a0[g]);
        a1[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + c + 8), k1, a1[g]);
      }
    }
    for (int g = 0; g < GT; ++g) part[g][j] = a0[g] + a1[g];
  }
  for (int j = count; j < 8; ++j)
    for (int g = 0; g < GT; ++g) part[g][j] = _mm256_setzero_ps();
  const __m256 valid = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                                     _mm256_set1_ps(static_cast<float>(count)), _CMP_LT_OQ);
  alignas(32) float p[GT][8];
  for (int g = 0; g < GT; ++g) {
    const __m256 s = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), reduce8(part[g]), valid);
    const float m_new = std::max(m[g], hmax8(s));
    if (m_new > m[g]) {
      // a new maximum: what was summed so far shrinks (to 0 on the first chunk)
      const __m256 alpha = _mm256_set1_ps(exp_approx(m[g] - m_new));
      for (int64_t c = 0; c < D; c += 8)
        _mm256_storeu_ps(acc + g * D + c, _mm256_loadu_ps(acc + g * D + c) * alpha);
      l[g] = l[g] * alpha;
      m[g] = m_new;
    }
    const __m256 e = _mm256_and_ps(exp8(s - _mm256_set1_ps(m_new)), valid);
    l[g] = l[g] + e;
    _mm256_store_ps(p[g], e);
  }
  // values: two 8-float columns of the tile's accumulators at a time, in registers
  // over the chunk's tokens
  for (int64_t c = 0; c < D; c += 16) {
    __m256 a0[GT], a1[GT];
    for (int g = 0; g < GT; ++g) {
      a0[g] = _mm256_loadu_ps(acc + g * D + c);
      a1[g] = _mm256_loadu_ps(acc + g * D + c + 8);
    }
    for (int j = 0; j < count; ++j) {
      const __m256 v0 = load8(v_rows[j] + c), v1 = load8(v_rows[j] + c + 8);
      for (int g = 0; g < GT; ++g) {
        const __m256 pj = _mm256_broadcast_ss(&p[g][j]);
        a0[g] = _mm256_fmadd_ps(pj, v0, a0[g]);
        a1[g] = _mm256_fmadd_ps(pj, v1, a1[g]);
      }
    }
    for (int g = 0; g < GT; ++g) {
      _mm256_storeu_ps(acc + g * D + c, a0[g]);
      _mm256_storeu_ps(acc + g * D + c + 8, a1[g]);
    }
  }
}

// how many blocks ahead the AVX2 task prefetches each row
constexpr int64_t kAheadBlocks = 2;

// `decode_task`'s contract on 8-lane registers: the same arguments (nc_rt in 16-lane
// chunks, at most kMaxGroup heads, head size at most 256) and the same results.
template <typename scalar_t>
void decode_task_avx2(const scalar_t* q_rows, const scalar_t* k_base, const scalar_t* v_base,
                      const int64_t* table, int64_t t_begin, int64_t t_end, int64_t block_size,
                      int64_t cache_stride, int64_t token_stride, int nc_rt, int g_rt,
                      float scale, float* acc_out, float* m_out, float* l_out) {
  const int64_t D = static_cast<int64_t>(nc_rt) * kLanes;
  const int G = g_rt;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  alignas(32) float q[8 * 256];  // kMaxGroup heads of at most 256
  float m[8];
  __m256 l[8];
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int g = 0; g < G; ++g) {
    for (int64_t c = 0; c < D; c += 8) {
      _mm256_store_ps(q + g * D + c, load8(q_rows + g * D + c) * vscale);
      _mm256_storeu_ps(acc_out + g * D + c, _mm256_setzero_ps());
    }
    m[g] = -INFINITY;
    l[g] = _mm256_setzero_ps();
  }
  const scalar_t* k_rows[8];
  const scalar_t* v_rows[8];
  int64_t b = t_begin / block_size, off = t_begin % block_size;
  const int64_t first_block = b;
  const int64_t last_block = t_end > 0 ? (t_end - 1) / block_size : 0;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += 8) {
    const int count = static_cast<int>(std::min<int64_t>(8, t_end - t0));
    for (int j = 0; j < count; ++j) {
      // as `decode_task`, with each row the same row of a later block prefetched: two
      // blocks ahead (and in the first block, the next one too)
      const int64_t base = table[b] * cache_stride + off * token_stride;
      k_rows[j] = k_base + base;
      v_rows[j] = v_base + base;
      for (int64_t ahead = b == first_block ? 1 : kAheadBlocks; ahead <= kAheadBlocks; ++ahead) {
        if (b + ahead > last_block) break;
        const int64_t next = table[b + ahead] * cache_stride + off * token_stride;
        prefetch_row(k_base + next, row_bytes);
        prefetch_row(v_base + next, row_bytes);
      }
      if (++off == block_size) {
        off = 0;
        ++b;
      }
    }
    for (int g0 = 0; g0 < G; g0 += 4) {
      float* acc = acc_out + g0 * D;
      switch (std::min(4, G - g0)) {
        case 1: chunk_avx2<scalar_t, 1>(q + g0 * D, k_rows, v_rows, count, D, acc, m + g0, l + g0); break;
        case 2: chunk_avx2<scalar_t, 2>(q + g0 * D, k_rows, v_rows, count, D, acc, m + g0, l + g0); break;
        case 3: chunk_avx2<scalar_t, 3>(q + g0 * D, k_rows, v_rows, count, D, acc, m + g0, l + g0); break;
        default: chunk_avx2<scalar_t, 4>(q + g0 * D, k_rows, v_rows, count, D, acc, m + g0, l + g0);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    m_out[g] = m[g];
    l_out[g] = hsum8(l[g]);
  }
}
#endif

// whether this build has the vdpbf16ps scoring (a bfloat16 cache, head sizes 64 and 128)
constexpr bool kHaveDot =
#if defined(__AVX512BF16__)
    true;
#else
    false;
#endif

template <typename scalar_t>
using DecodeTaskFn = void (*)(const scalar_t*, const scalar_t*, const scalar_t*, const int64_t*,
                              int64_t, int64_t, int64_t, int64_t, int64_t, int, int, float,
                              float*, float*, float*);

// The task function for a head size of `nc` 16-lane chunks and a group tile of `g`
// heads: compiled for each group size at head sizes 64 and 128 (with vdpbf16ps
// scoring for a bfloat16 cache unless `portable`), at run time otherwise. Where the
// AVX2 task exists, the 16-lane task serves only `portable` and head sizes over 256,
// in its run-time form alone: its 32 compiled shapes were 26 of this source's 34 s
// of compile time, for a path kept to check the others and to fall back on.
template <typename scalar_t>
DecodeTaskFn<scalar_t> pick_task(int nc, int g, bool portable) {
#if defined(ENGINE_DECODE_AVX2)
  (void)g;
  if (!portable && nc <= 16) return &decode_task_avx2<scalar_t>;
  return &decode_task<scalar_t, 0, 0, false>;
#else
  constexpr bool kDot = std::is_same_v<scalar_t, c10::BFloat16> && kHaveDot;
  const bool dot = kDot && !portable;
#define ENGINE_TASK_CASE(NC, G) \
  case G: return dot ? &decode_task<scalar_t, NC, G, kDot> : &decode_task<scalar_t, NC, G, false>;
#define ENGINE_TASK_CASES(NC)                                                             \
  switch (g) {                                                                            \
    ENGINE_TASK_CASE(NC, 1) ENGINE_TASK_CASE(NC, 2) ENGINE_TASK_CASE(NC, 3)               \
    ENGINE_TASK_CASE(NC, 4) ENGINE_TASK_CASE(NC, 5) ENGINE_TASK_CASE(NC, 6)               \
    ENGINE_TASK_CASE(NC, 7) ENGINE_TASK_CASE(NC, 8)                                       \
  }
  if (nc == 4) ENGINE_TASK_CASES(4)
  if (nc == 8) ENGINE_TASK_CASES(8)
#undef ENGINE_TASK_CASES
#undef ENGINE_TASK_CASE
  return &decode_task<scalar_t, 0, 0, false>;
#endif
}

template <typename scalar_t>
void decode_kernel(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                   const at::Tensor& query_start_loc, const at::Tensor& decode_seqs,
                   double scale, bool portable) {
  const int64_t H = query.size(1), D = query.size(2);
  const int64_t block_size = kv_cache.size(2), Hkv = kv_cache.size(3);
  const int64_t G = H / Hkv;
  const int64_t n = decode_seqs.size(0);
  if (n == 0) return;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t cache_stride = kv_cache.stride(1);  // one block
  const int64_t token_stride = kv_cache.stride(2);
  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  scalar_t* o_ptr = out.data_ptr<scalar_t>();
  const scalar_t* k_base = kv_cache.data_ptr<scalar_t>();
  const scalar_t* v_base = k_base + kv_cache.stride(0);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* starts = query_start_loc.data_ptr<int64_t>();
  const int64_t* seqs = decode_seqs.data_ptr<int64_t>();
  const int64_t q_row_stride = query.stride(0), o_row_stride = out.stride(0);
  const float fscale = static_cast<float>(scale);
  int64_t longest = 1;
  for (int64_t i = 0; i < n; ++i) longest = std::max(longest, lens[seqs[i]]);
  const int max_threads = std::max(1, at::get_num_threads());

  if (D % kLanes != 0 || D / kLanes > 16) {
    // scalar path: one task per (sequence, KV head)
    const int threads = static_cast<int>(std::min<int64_t>(max_threads, std::max<int64_t>(1, n * Hkv)));
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> scores(G * longest);
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < n * Hkv; ++task) {
        const int64_t s = seqs[task / Hkv], kvh = task % Hkv, qrow = starts[s];
        decode_item_scalar(q_ptr + qrow * q_row_stride + kvh * G * D,
                           o_ptr + qrow * o_row_stride + kvh * G * D, k_base + kvh * D,
                           v_base + kvh * D, tables + s * max_blocks, lens[s], block_size,
                           cache_stride, token_stride, G, D, fscale, scores.data());
      }
    }
    return;
  }

  // tasks: (sequence, KV head, tile of at most kMaxGroup query heads, piece of the
  // context). A context is split only when there are too few (sequence, head)
  // pairs to keep every thread busy; the pieces' partial results are merged after.
  const int64_t tiles = (G + kMaxGroup - 1) / kMaxGroup;
  const int64_t tile = (G + tiles - 1) / tiles;
  const int64_t pairs = n * Hkv * tiles;
  int64_t pieces = 1;
  if (max_threads > 1 && pairs < 4 * max_threads)
    pieces = std::max<int64_t>(1, std::min((4 * max_threads + pairs - 1) / pairs,
                                           longest / kMinSplitTokens));
  // a piece is a whole number of 16-token chunks
  const int64_t piece_len = ((longest + pieces - 1) / pieces + 15) / 16 * 16;
  const int64_t tasks = pairs * pieces;
  const int nc = static_cast<int>(D / kLanes);
  // per task: the accumulators of its heads, then their maxima, then their sums
  const int64_t task_floats = tile * (D + 2);
  std::vector<float> partial(pieces > 1 ? tasks * task_floats : 0);
  const int threads = static_cast<int>(std::min<int64_t>(max_threads, tasks));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> own(pieces > 1 ? 0 : task_floats);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t piece = task % pieces, pair = task / pieces;
      const int64_t i = pair / (Hkv * tiles), kvh = pair / tiles % Hkv, ti = pair % tiles;
      const int64_t s = seqs[i], len = lens[s];
      const int64_t g0 = ti * tile, g = std::min(tile, G - g0);
      const int64_t t_begin = std::min(len, piece * piece_len);
      const int64_t t_end = std::min(len, t_begin + piece_len);
      float* acc = pieces > 1 ? partial.data() + task * task_floats : own.data();
      float* m = acc + tile * D;
      float* l = m + tile;
      const int64_t head = kvh * G + g0;
      pick_task<scalar_t>(nc, static_cast<int>(g), portable)(
          q_ptr + starts[s] * q_row_stride + head * D, k_base + kvh * D, v_base + kvh * D,
          tables + s * max_blocks, t_begin, t_end, block_size, cache_stride, token_stride, nc,
          static_cast<int>(g), fscale, acc, m, l);
      if (pieces == 1) {
        scalar_t* o = o_ptr + starts[s] * o_row_stride + head * D;
        for (int64_t h = 0; h < g; ++h) {
          const vf inv = splat(1.f / l[h]);
          for (int c = 0; c < nc; ++c) store(o + h * D + c * kLanes, load(acc + h * D + c * kLanes) * inv);
        }
      }
    }
    if (pieces > 1) {
      // merge the pieces of each (sequence, KV head, tile): rescale each to the
      // largest maximum, sum, normalise (an empty piece has max -inf, sum 0)
#pragma omp for schedule(static)
      for (int64_t pair = 0; pair < pairs; ++pair) {
        const int64_t i = pair / (Hkv * tiles), kvh = pair / tiles % Hkv, ti = pair % tiles;
        const int64_t s = seqs[i];
        const int64_t g0 = ti * tile, g = std::min(tile, G - g0);
        scalar_t* o = o_ptr + starts[s] * o_row_stride + (kvh * G + g0) * D;
        const float* first = partial.data() + pair * pieces * task_floats;
        for (int64_t h = 0; h < g; ++h) {
          float mx = -INFINITY;
          for (int64_t p = 0; p < pieces; ++p) mx = std::max(mx, first[p * task_floats + tile * D + h]);
          float sum = 0.f;
          vf res[16];
          for (int c = 0; c < nc; ++c) res[c] = splat(0.f);
          for (int64_t p = 0; p < pieces; ++p) {
            const float* piece_acc = first + p * task_floats;
            const float lp = piece_acc[tile * D + tile + h];
            if (lp == 0.f) continue;
            const float w = exp_approx(piece_acc[tile * D + h] - mx);
            sum += w * lp;
            const vf vw = splat(w);
            for (int c = 0; c < nc; ++c) res[c] += vw * load(piece_acc + h * D + c * kLanes);
          }
          const vf inv = splat(1.f / sum);
          for (int c = 0; c < nc; ++c) store(o + h * D + c * kLanes, res[c] * inv);
        }
      }
    }
  }
}

void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& kv_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            const at::Tensor& query_start_loc, const at::Tensor& decode_seqs,
                            double scale, bool portable) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(), "query/out must be [T, H, D]");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2, "kv_cache must be [2, N, B, Hkv, D]");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && kv_cache.stride(4) == 1 &&
                  query.stride(1) == query.size(2) && out.stride(1) == out.size(2) &&
                  kv_cache.stride(3) == kv_cache.size(4),
              "head rows must be contiguous");
  TORCH_CHECK(query.size(1) % kv_cache.size(3) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(), "query, out and kv_cache dtypes differ");
  for (const at::Tensor* t : {&block_tables, &seq_lens, &query_start_loc, &decode_seqs}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors must be int64");
  }
  if (query.scalar_type() == at::kFloat) {
    decode_kernel<float>(out, query, kv_cache, block_tables, seq_lens, query_start_loc,
                         decode_seqs, scale, portable);
  } else if (query.scalar_type() == at::kBFloat16) {
    decode_kernel<at::BFloat16>(out, query, kv_cache, block_tables, seq_lens, query_start_loc,
                                decode_seqs, scale, portable);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only");
  }
}

// the path a bfloat16 cache takes here with `portable=False` (float32: the AVX2 task
// on such a CPU, else the vector-extension code)
std::string paged_decode_attention_path() {
#if defined(ENGINE_DECODE_AVX2)
  return "avx2";
#else
  return kHaveDot ? "avx512_bf16" : "portable";
#endif
}

}  // namespace

TORCH_LIBRARY(engine_kernels, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, "
        "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, Tensor decode_seqs, "
        "float scale, bool portable=False) -> ()");
  m.def("paged_decode_attention_path() -> str");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}

TORCH_LIBRARY_IMPL(engine_kernels, CompositeExplicitAutograd, m) {
  m.impl("paged_decode_attention_path", &paged_decode_attention_path);
}
