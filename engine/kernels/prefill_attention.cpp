// Prefill attention straight from the paged KV cache: whole prompts, prompt
// chunks (chunked prefill) and prompts whose first blocks were prefix-cache hits
// are all the same case here, because the step's own keys and values are written
// to the cache before attention runs. Causal, grouped-query.
//
// engine_kernels::paged_prefill_attention(out [T, H, D], query [T, H, D], kv_cache
//     [2, num_blocks, block_size, Hkv, D], block_tables [S, max_blocks] int64,
//     seq_lens [S] int64, query_start_loc [S + 1] int64, seqs [n] int64, scale)
// For each sequence s in `seqs`, its query rows query_start_loc[s] ..
// query_start_loc[s + 1] are the LAST tokens of its seq_lens[s]-token context;
// query row j (at position p) attends to context positions 0..p.
//
// One task per (sequence, KV head, tile of kTileQ query tokens): the tile's
// G * kTileQ query rows (the heads sharing that KV head) go over the cache 32 keys
// at a time, only as far as the tile's last position (causal). Each 32-key step
// is converted to float32 once, K transposed, so that a row's 32 scores are 2 D
// vector FMAs and its value update D / 16 per key, a few rows at a time (their
// chains independent, their accumulators in registers); softmax is online
// (running max and sum), so nothing grows with the context. float32 accumulation
// in any dtype. Head sizes: multiples of 16 up to 128.
// GCC/Clang vector extensions (vec.h): one code path, AVX-512 registers where the
// CPU has them, narrower ones elsewhere.
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "vec.h"

namespace {

using namespace engine_kernels;

constexpr int64_t kTileQ = 16;  // query tokens per task
// keys per step of the vector path: two vectors of scores per row, so that the
// softmax's reductions and the accumulators' rescale come once per 32 keys
constexpr int64_t kVecKeys = 2 * kLanes;

struct Task {
  int64_t seq, kv_head, first;  // `first`: the tile's first query token (0-based in the chunk)
};

// rows handled together: their scores are independent FMA chains, and their
// value accumulators (RB x DV vectors) stay in registers
template <int DV>
constexpr int rows_per_pass() { return DV <= 2 ? 8 : (DV <= 4 ? 4 : 2); }

template <typename scalar_t, int DV>
void prefill_tile(const Task& t, const scalar_t* q_ptr, int64_t q_row_stride, scalar_t* o_ptr,
                  int64_t o_row_stride, const scalar_t* k_base, const scalar_t* v_base,
                  const int64_t* table, int64_t seq_len, int64_t q_start, int64_t q_len,
                  int64_t block_size, int64_t cache_stride, int64_t token_stride, int64_t G,
                  float scale, float* qf, float* acc, float* kt, float* vbuf, float* m_run,
                  float* l_run) {
  constexpr int64_t D = DV * kLanes;
  constexpr int RB = rows_per_pass<DV>();
  const int64_t nq = std::min(kTileQ, q_len - t.first);
  const int64_t rows = nq * G;
  const int64_t pos0 = seq_len - q_len + t.first;  // position of the tile's first token
  const int64_t last = pos0 + nq - 1;               // the furthest key any row needs
  // the tile's queries in float32, pre-scaled; row r = token r / G, head r % G
  for (int64_t j = 0; j < nq; ++j) {
    const scalar_t* src = q_ptr + (q_start + t.first + j) * q_row_stride + t.kv_head * G * D;
    for (int64_t h = 0; h < G; ++h)
      for (int64_t x = 0; x < DV; ++x)
        store(qf + (j * G + h) * D + x * kLanes, load(src + h * D + x * kLanes) * scale);
  }
  // rows past `rows` (up to a pass of RB) are computed and thrown away: keep them finite
  std::fill(qf + rows * D, qf + (rows + RB) * D, 0.f);
  std::fill(acc, acc + (rows + RB) * D, 0.f);
  std::fill(m_run, m_run + rows + RB, -std::numeric_limits<float>::infinity());
  std::fill(l_run, l_run + rows + RB, 0.f);
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vf minus_inf = splat(-std::numeric_limits<float>::infinity());

  for (int64_t key0 = 0; key0 <= last; key0 += kVecKeys) {
    const int64_t nk = std::min(kVecKeys, last + 1 - key0);
    // the step's keys (transposed: kt[d * kVecKeys + key]) and values, in float32
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t pos = key0 + c;
      const int64_t off = table[pos / block_size] * cache_stride + (pos % block_size) * token_stride;
      const scalar_t* kr = k_base + off;
      const scalar_t* vr = v_base + off;
      for (int64_t d = 0; d < D; ++d) kt[d * kVecKeys + c] = load1(kr + d);
      for (int64_t x = 0; x < DV; ++x) store(vbuf + c * D + x * kLanes, load(vr + x * kLanes));
    }
    for (int64_t c = nk; c < kVecKeys; ++c)
      for (int64_t d = 0; d < D; ++d) kt[d * kVecKeys + c] = 0.f;
    // rows are in position order: the first rows may see none of this step
    int64_t r_begin = (std::max<int64_t>(key0 - pos0, 0)) * G;
    for (int64_t r0 = r_begin; r0 < rows; r0 += RB) {
      // scores of keys 0-15 (s) and 16-31 (s2) of the step: 2 * RB independent chains
      vf s[RB], s2[RB];
      for (int i = 0; i < RB; ++i) s[i] = s2[i] = splat(0.f);
      const float* q0 = qf + r0 * D;
      for (int64_t d = 0; d < D; ++d) {
        const vf k0 = load(kt + d * kVecKeys), k1 = load(kt + d * kVecKeys + kLanes);
        for (int i = 0; i < RB; ++i) {
          s[i] += q0[i * D + d] * k0;
          s2[i] += q0[i * D + d] * k1;
        }
      }
      float pv[RB][kVecKeys];
      float corr[RB];
      for (int i = 0; i < RB; ++i) {
        const int64_t r = r0 + i;
        const int64_t pos = pos0 + r / G;
        // causal and step-end mask: keys at positions > pos (none visible: p = 0)
        const int64_t visible = std::max<int64_t>(0, std::min(nk, pos - key0 + 1));
        const auto keep = lane < (vi)(vi{} + static_cast<int32_t>(visible));
        const auto keep2 = lane < (vi)(vi{} + static_cast<int32_t>(visible - kLanes));
        if (visible == 0 || r >= rows) {
          store(pv[i], splat(0.f));
          store(pv[i] + kLanes, splat(0.f));
          corr[i] = 1.f;
          continue;
        }
        const vf sc = keep ? s[i] : minus_inf, sc2 = keep2 ? s2[i] : minus_inf;
        const float mx = std::max(m_run[r], hmax(vmax(sc, sc2)));
        // 0 on the first step (the running maximum is -inf)
        corr[i] = m_run[r] == -std::numeric_limits<float>::infinity()
                      ? 0.f : exp_approx(m_run[r] - mx);
        const vf p = keep ? exp_approx(sc - mx) : splat(0.f);
        const vf p2 = keep2 ? exp_approx(sc2 - mx) : splat(0.f);
        store(pv[i], p);
        store(pv[i] + kLanes, p2);
        l_run[r] = l_run[r] * corr[i] + hsum(p + p2);
        m_run[r] = mx;
      }
      vf a[RB][DV];
      for (int i = 0; i < RB; ++i)
        for (int x = 0; x < DV; ++x) a[i][x] = load(acc + (r0 + i) * D + x * kLanes) * corr[i];
      for (int64_t c = 0; c < nk; ++c) {
        vf v[DV];
        for (int x = 0; x < DV; ++x) v[x] = load(vbuf + c * D + x * kLanes);
        for (int i = 0; i < RB; ++i) {
          const float pc = pv[i][c];
          for (int x = 0; x < DV; ++x) a[i][x] += pc * v[x];
        }
      }
      for (int i = 0; i < RB; ++i)
        for (int x = 0; x < DV; ++x) store(acc + (r0 + i) * D + x * kLanes, a[i][x]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t j = r / G, h = r % G;
    scalar_t* dst = o_ptr + (q_start + t.first + j) * o_row_stride + (t.kv_head * G + h) * D;
    const vf inv = splat(1.f / l_run[r]);
    for (int64_t x = 0; x < DV; ++x) store(dst + x * kLanes, load(acc + r * D + x * kLanes) * inv);
  }
}


#if ENGINE_HAS_AMX && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define ENGINE_PREFILL_AMX 1

// ---- the AMX path (bfloat16) ----------------------------------------------------
// One task is the same (sequence, KV head, 16 query tokens) tile. For each head of
// the group and each step of 32 keys:
//   scores^T [32 keys, 16 queries] = K . Q^T on the tiles: K's rows are the A
//     operand as the cache holds them (16 keys of one block at the cache's token
//     stride, no copy); Q^T in the pair-interleaved B layout is built once per task;
//   the online softmax runs down the 32 key rows, one query per lane: running max,
//     sum and rescale are plain vector ops, no reductions across lanes;
//   P [16 queries, 32 keys] (bf16) . V [32 keys, D] accumulates into the float32
//     output rows, loaded into the C tiles and stored back after the rescale. V is
//     interleaved by key pairs once per step for all heads of the group.
// Causal and end-of-context masking are selects on the scores; keys past the
// context are read as zeros, so stale cache contents never reach the sums.

constexpr int64_t kKeyStep = 32;  // keys per step: two score tiles, one P tile
constexpr int64_t kKeyRun = 512;  // keys whose V is interleaved at once (resident path)

// r[i] <- column i of the 16 x 16 matrix of 32-bit elements held in r
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3
  __m512i u[16];
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

inline __m512i as_int(vf v) { return reinterpret_cast<__m512i>(v); }
inline __m512 as_ps(vf v) { return reinterpret_cast<__m512>(v); }

// one thread's buffers (tile operands are 64-byte rows)
struct AmxScratch {
  AmxScratch(int64_t G, int64_t D)
      : qt(G * D * kTileQ), vt(kKeyRun * D), acc(G * kTileQ * D), m(G * kTileQ),
        l(G * kTileQ) {}
  std::vector<c10::BFloat16> qt;  // [G][D / 32][16 pairs][16 queries x 2]: B tiles of Q^T
  std::vector<c10::BFloat16> vt;  // [D / 16][16 key pairs][16 dims x 2]: B tiles of V
  std::vector<float> acc;         // [G][16 queries][D]
  std::vector<float> m, l;        // [G][16 queries]: running max and sum
  alignas(64) float s[kKeyStep * kTileQ];            // scores^T [key][query]
  alignas(64) c10::BFloat16 p[kTileQ * kKeyStep];    // probabilities [query][key]: A tile
  alignas(64) float corr[kTileQ];
};

// The probabilities of a step's keys from their scores (w.s, [key][query]; -inf:
// masked), `prob(score)` each, as bf16 pairs of keys for the P.V tile (pairs[r]:
// keys 2r and 2r + 1 of every query, lanes interleaved by `pair_idx`); returns
// each query's sum of them
template <typename Prob>
inline vf probability_pairs(const AmxScratch& w, int64_t nk, vf minus_inf, __m512i pair_idx,
                            __m512i pairs[16], Prob prob) {
  vf sum = splat(0.f);
  for (int64_t r = 0; r < 16; ++r) {
    vf pe = splat(0.f), po = splat(0.f);
    if (2 * r < nk) {
      const vf x = load(w.s + 2 * r * kTileQ);
      pe = x > minus_inf ? prob(x) : splat(0.f);
    }
    if (2 * r + 1 < nk) {
      const vf x = load(w.s + (2 * r + 1) * kTileQ);
      po = x > minus_inf ? prob(x) : splat(0.f);
    }
    sum += pe + po;
    pairs[r] = _mm512_permutexvar_epi16(
        pair_idx, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(as_ps(po), as_ps(pe))));
  }
  return sum;
}

// (a, b) 16-bit halves interleaved: lanes 0-15 of each (kLo; +16: lanes 16-31)
alignas(64) const uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                      37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                      11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
// one bf16 pair per lane from (even row, odd row) converted together
alignas(64) const uint16_t kPair[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                        21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                        11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// Q^T of the task's query tile, pair-interleaved, per head and 32-wide chunk, into
// w.qt (rows past the tile's `nq` tokens: zeros): the B tiles of K.Q^T
void stage_queries(const Task& t, const c10::BFloat16* q_ptr, int64_t q_row_stride,
                   int64_t q_start, int64_t nq, int64_t G, int64_t D, AmxScratch& w) {
  const int64_t DC = D / 32;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t h = 0; h < G; ++h) {
    const c10::BFloat16* qh = q_ptr + (q_start + t.first) * q_row_stride + (t.kv_head * G + h) * D;
    for (int64_t c = 0; c < DC; ++c) {
      __m512i r[16];
      for (int64_t j = 0; j < 16; ++j)
        r[j] = j < nq ? _mm512_loadu_si512(qh + j * q_row_stride + c * 32) : zero;
      transpose16x16(r);
      c10::BFloat16* dst = w.qt.data() + (h * DC + c) * 512;
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + j * 32, r[j]);
    }
  }
}

void configure_prefill_tiles() {
  // every tile 16 rows x 64 bytes; which holds what: see the two tile functions
  const int64_t rows[8] = {16, 16, 16, 16, 16, 16, 16, 16};
  configure_tiles(rows, 8);
}

void amx_prefill_tile(const Task& t, const c10::BFloat16* q_ptr, int64_t q_row_stride,
                      c10::BFloat16* o_ptr, int64_t o_row_stride, const c10::BFloat16* k_base,
                      const c10::BFloat16* v_base, const int64_t* table, int64_t seq_len,
                      int64_t q_start, int64_t q_len, int64_t block_size, int64_t cache_stride,
                      int64_t token_stride, int64_t G, int64_t D, float scale, AmxScratch& w) {
  const int64_t nq = std::min(kTileQ, q_len - t.first);
  const int64_t pos0 = seq_len - q_len + t.first;
  const int64_t last = pos0 + nq - 1;
  const int64_t DC = D / 32;  // 32-wide chunks of a head
  stage_queries(t, q_ptr, q_row_stride, q_start, nq, G, D, w);
  const __m512i zero = _mm512_setzero_si512();
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.end(), 0.f);
  const __m512i lo_idx = _mm512_load_si512(kLo);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  const __m512i pair_idx = _mm512_load_si512(kPair);
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vi qpos = lane + static_cast<int32_t>(pos0);
  const vf minus_inf = splat(-std::numeric_limits<float>::infinity());
  const int64_t ts_bytes = token_stride * 2;
  auto key_row = [&](const c10::BFloat16* base, int64_t pos) {
    return base + table[pos / block_size] * cache_stride + (pos % block_size) * token_stride;
  };

  for (int64_t key0 = 0; key0 <= last; key0 += kKeyStep) {
    const int64_t nk = std::min(kKeyStep, last + 1 - key0);
    const bool two = nk > 16;
    const c10::BFloat16* k0 = key_row(k_base, key0);
    const c10::BFloat16* k1 = two ? key_row(k_base, key0 + 16) : k0;
    // V by key pairs: row r of tile x holds (V[2r][16x + i], V[2r + 1][16x + i]) for i < 16;
    // each run of 16 keys lies in one cache block
    const c10::BFloat16* v0 = key_row(v_base, key0);
    const c10::BFloat16* v1 = two ? key_row(v_base, key0 + 16) : v0;
    for (int64_t r = 0; r < 16; ++r) {
      const c10::BFloat16* run = r < 8 ? v0 + 2 * r * token_stride : v1 + (2 * r - 16) * token_stride;
      const bool has_a = 2 * r < nk, has_b = 2 * r + 1 < nk;
      for (int64_t c = 0; c < DC; ++c) {
        const __m512i a = has_a ? _mm512_loadu_si512(run + c * 32) : zero;
        const __m512i b = has_b ? _mm512_loadu_si512(run + token_stride + c * 32) : zero;
        _mm512_storeu_si512(w.vt.data() + ((2 * c) * 16 + r) * 32,
                            _mm512_permutex2var_epi16(a, lo_idx, b));
        _mm512_storeu_si512(w.vt.data() + ((2 * c + 1) * 16 + r) * 32,
                            _mm512_permutex2var_epi16(a, hi_idx, b));
      }
    }
    // keys past some query's position: the step holds the causal diagonal
    const bool diagonal = key0 + nk - 1 > pos0;
    for (int64_t h = 0; h < G; ++h) {
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t c = 0; c < DC; ++c) {
        _tile_loadd(5, w.qt.data() + (h * DC + c) * 512, 64);
        _tile_loadd(4, k0 + c * 32, ts_bytes);
        _tile_dpbf16ps(0, 4, 5);
        if (two) {
          _tile_loadd(6, k1 + c * 32, ts_bytes);
          _tile_dpbf16ps(1, 6, 5);
        }
      }
      _tile_stored(0, w.s, 64);
      if (two) _tile_stored(1, w.s + 16 * kTileQ, 64);
      // online softmax down the key rows, one query per lane
      float* m_h = w.m.data() + h * kTileQ;
      float* l_h = w.l.data() + h * kTileQ;
      const vf m_old = load(m_h);
      vf m_new = m_old;
      for (int64_t k = 0; k < nk; ++k) {
        vf x = load(w.s + k * kTileQ) * scale;
        if (diagonal) x = (qpos >= static_cast<int32_t>(key0 + k)) ? x : minus_inf;
        store(w.s + k * kTileQ, x);
        m_new = vmax(m_new, x);
      }
      // every query sees key 0 in the first step, so m_new is finite from there on
      const vf corr = exp_approx(m_old - m_new);
      __m512i pairs[16];
      const vf sum = probability_pairs(w, nk, minus_inf, pair_idx, pairs,
                                       [&](vf x) { return exp_approx(x - m_new); });
      store(l_h, load(l_h) * corr + sum);
      store(m_h, m_new);
      transpose16x16(pairs);  // row q: query q's 16 key pairs
      for (int q = 0; q < 16; ++q) _mm512_storeu_si512(w.p + q * kKeyStep, pairs[q]);
      float* acc = w.acc.data() + h * kTileQ * D;
      const auto rescale = corr != splat(1.f);
      bool any = false;  // the first step's accumulator is zero: nothing to rescale
      for (int i = 0; i < kLanes && key0 > 0; ++i) any |= rescale[i] != 0;
      if (any) {
        store(w.corr, corr);
        for (int64_t q = 0; q < kTileQ; ++q)
          for (int64_t x = 0; x < D; x += kLanes) store(acc + q * D + x, load(acc + q * D + x) * w.corr[q]);
      }
      // acc += P . V, four 16-dim tiles at a time (D / 16 is even)
      _tile_loadd(4, w.p, 64);
      for (int64_t x = 0; x < D / 16; x += 4) {
        const int64_t stride = D * 4;
        const c10::BFloat16* vt = w.vt.data() + x * 512;
        _tile_loadd(0, acc + x * 16, stride);
        _tile_loadd(1, acc + (x + 1) * 16, stride);
        _tile_loadd(5, vt, 64);
        _tile_loadd(6, vt + 512, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        _tile_stored(0, acc + x * 16, stride);
        _tile_stored(1, acc + (x + 1) * 16, stride);
        if (x + 2 < D / 16) {
          _tile_loadd(2, acc + (x + 2) * 16, stride);
          _tile_loadd(3, acc + (x + 3) * 16, stride);
          _tile_loadd(5, vt + 2 * 512, 64);
          _tile_loadd(6, vt + 3 * 512, 64);
          _tile_dpbf16ps(2, 4, 5);
          _tile_dpbf16ps(3, 4, 6);
          _tile_stored(2, acc + (x + 2) * 16, stride);
          _tile_stored(3, acc + (x + 3) * 16, stride);
        }
      }
    }
  }
  for (int64_t h = 0; h < G; ++h) {
    const float* acc = w.acc.data() + h * kTileQ * D;
    for (int64_t q = 0; q < nq; ++q) {
      c10::BFloat16* dst = o_ptr + (q_start + t.first + q) * o_row_stride + (t.kv_head * G + h) * D;
      const vf inv = splat(1.f / w.l[h * kTileQ + q]);
      for (int64_t x = 0; x < D; x += kLanes) store(dst + x, load(acc + q * D + x) * inv);
    }
  }
}

// ---- heads of up to 64 dims: the output accumulators stay in tiles ----------------
// Tiles 0 .. DT-1 hold one head's [16 queries, D] float32 output for a whole run of
// keys, 4-5 the two score tiles, 6 the A operand (K, then P), 7 the B operand (Q^T,
// then V). The softmax's reference maximum is updated lazily: only when a new score
// exceeds it by more than kMaxSlack (log2 units) are the accumulators stored,
// rescaled and reloaded, so the probabilities P = 2^(s - m) stay <= 2^kMaxSlack
// (bf16 keeps its relative precision at any scale) and most steps never leave the
// tiles. V is interleaved once per kKeyRun keys for all heads of the group.

constexpr float kMaxSlack = 8.f;

// 2^y (y >= -126 after the clamp; below, the result is the smallest normal): a
// degree-5 polynomial on the fraction in [-0.5, 0.5] (relative error ~2e-6, far
// below the bfloat16 rounding of P), the integer part through the exponent
inline vf exp2_fast(vf y) {
  const __m512 v = _mm512_max_ps(as_ps(y), _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(v, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return reinterpret_cast<vf>(_mm512_scalef_ps(p, n));
}

template <int DT>
inline void acc_tiles_load(const float* acc, int64_t stride) {
  _tile_loadd(0, acc, stride);
  _tile_loadd(1, acc + 16, stride);
  if constexpr (DT == 4) {
    _tile_loadd(2, acc + 32, stride);
    _tile_loadd(3, acc + 48, stride);
  }
}

template <int DT>
inline void acc_tiles_store(float* acc, int64_t stride) {
  _tile_stored(0, acc, stride);
  _tile_stored(1, acc + 16, stride);
  if constexpr (DT == 4) {
    _tile_stored(2, acc + 32, stride);
    _tile_stored(3, acc + 48, stride);
  }
}

template <int DT>
void amx_prefill_tile_resident(const Task& t, const c10::BFloat16* q_ptr, int64_t q_row_stride,
                               c10::BFloat16* o_ptr, int64_t o_row_stride,
                               const c10::BFloat16* k_base, const c10::BFloat16* v_base,
                               const int64_t* table, int64_t seq_len, int64_t q_start,
                               int64_t q_len, int64_t block_size, int64_t cache_stride,
                               int64_t token_stride, int64_t G, float scale, AmxScratch& w) {
  constexpr int64_t D = DT * 16, DC = D / 32;
  const int64_t nq = std::min(kTileQ, q_len - t.first);
  const int64_t pos0 = seq_len - q_len + t.first;
  const int64_t last = pos0 + nq - 1;
  stage_queries(t, q_ptr, q_row_stride, q_start, nq, G, D, w);
  const __m512i zero = _mm512_setzero_si512();
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.end(), 0.f);
  const __m512i lo_idx = _mm512_load_si512(kLo);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  const __m512i pair_idx = _mm512_load_si512(kPair);
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vi qpos = lane + static_cast<int32_t>(pos0);
  const vf minus_inf = splat(-std::numeric_limits<float>::infinity());
  const float log2_scale = scale * 1.44269504088896341f;  // scores in log2 units
  const int64_t ts_bytes = token_stride * 2;
  const int64_t acc_stride = D * 4;
  auto key_row = [&](const c10::BFloat16* base, int64_t pos) {
    return base + table[pos / block_size] * cache_stride + (pos % block_size) * token_stride;
  };

  for (int64_t run0 = 0; run0 <= last; run0 += kKeyRun) {
    const int64_t run1 = std::min(last + 1, run0 + kKeyRun);
    // V of the run by key pairs: step i, tile x, row r holds (V[2r][16x + j], V[2r + 1][16x + j])
    for (int64_t key0 = run0; key0 < run1; key0 += kKeyStep) {
      const int64_t nk = std::min(kKeyStep, run1 - key0);
      const c10::BFloat16* v0 = key_row(v_base, key0);
      const c10::BFloat16* v1 = nk > 16 ? key_row(v_base, key0 + 16) : v0;
      c10::BFloat16* vt = w.vt.data() + (key0 - run0) / kKeyStep * DT * 512;
      for (int64_t r = 0; r < 16; ++r) {
        const c10::BFloat16* run = r < 8 ? v0 + 2 * r * token_stride : v1 + (2 * r - 16) * token_stride;
        const bool has_a = 2 * r < nk, has_b = 2 * r + 1 < nk;
        for (int64_t c = 0; c < DC; ++c) {
          const __m512i a = has_a ? _mm512_loadu_si512(run + c * 32) : zero;
          const __m512i b = has_b ? _mm512_loadu_si512(run + token_stride + c * 32) : zero;
          _mm512_storeu_si512(vt + ((2 * c) * 16 + r) * 32, _mm512_permutex2var_epi16(a, lo_idx, b));
          _mm512_storeu_si512(vt + ((2 * c + 1) * 16 + r) * 32,
                              _mm512_permutex2var_epi16(a, hi_idx, b));
        }
      }
    }
    for (int64_t h = 0; h < G; ++h) {
      float* acc = w.acc.data() + h * kTileQ * D;
      float* m_h = w.m.data() + h * kTileQ;
      float* l_h = w.l.data() + h * kTileQ;
      if (run0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
        if constexpr (DT == 4) {
          _tile_zero(2);
          _tile_zero(3);
        }
      } else {
        acc_tiles_load<DT>(acc, acc_stride);
      }
      const c10::BFloat16* qt = w.qt.data() + h * DC * 512;
      for (int64_t key0 = run0; key0 < run1; key0 += kKeyStep) {
        const int64_t nk = std::min(kKeyStep, run1 - key0);
        const bool two = nk > 16;
        const c10::BFloat16* k0 = key_row(k_base, key0);
        const c10::BFloat16* k1 = two ? key_row(k_base, key0 + 16) : k0;
        _tile_zero(4);
        _tile_zero(5);
        for (int64_t c = 0; c < DC; ++c) {
          _tile_loadd(7, qt + c * 512, 64);
          _tile_loadd(6, k0 + c * 32, ts_bytes);
          _tile_dpbf16ps(4, 6, 7);
          if (two) {
            _tile_loadd(6, k1 + c * 32, ts_bytes);
            _tile_dpbf16ps(5, 6, 7);
          }
        }
        _tile_stored(4, w.s, 64);
        if (two) _tile_stored(5, w.s + 16 * kTileQ, 64);
        const bool diagonal = key0 + nk - 1 > pos0;
        vf m_blk = minus_inf;
        for (int64_t k = 0; k < nk; ++k) {
          vf x = load(w.s + k * kTileQ) * log2_scale;
          if (diagonal) x = (qpos >= static_cast<int32_t>(key0 + k)) ? x : minus_inf;
          store(w.s + k * kTileQ, x);
          m_blk = vmax(m_blk, x);
        }
        vf m_ref = load(m_h);
        const auto over = m_blk > m_ref + kMaxSlack;
        bool rescale = false;
        for (int i = 0; i < kLanes; ++i) rescale |= over[i] != 0;
        if (rescale) {
          // every query sees key 0 in the first step: the new reference is finite
          const vf m_new = vmax(m_ref, m_blk);
          const vf corr = exp2_fast(m_ref - m_new);
          store(l_h, load(l_h) * corr);
          store(m_h, m_new);
          m_ref = m_new;
          if (key0 > 0) {
            store(w.corr, corr);
            acc_tiles_store<DT>(acc, acc_stride);
            for (int64_t q = 0; q < kTileQ; ++q)
              for (int64_t x = 0; x < D; x += kLanes)
                store(acc + q * D + x, load(acc + q * D + x) * w.corr[q]);
            acc_tiles_load<DT>(acc, acc_stride);
          }
        }
        __m512i pairs[16];
        const vf sum = probability_pairs(w, nk, minus_inf, pair_idx, pairs,
                                         [&](vf x) { return exp2_fast(x - m_ref); });
        store(l_h, load(l_h) + sum);
        transpose16x16(pairs);
        for (int q = 0; q < 16; ++q) _mm512_storeu_si512(w.p + q * kKeyStep, pairs[q]);
        const c10::BFloat16* vt = w.vt.data() + (key0 - run0) / kKeyStep * DT * 512;
        _tile_loadd(6, w.p, 64);
        _tile_loadd(7, vt, 64);
        _tile_dpbf16ps(0, 6, 7);
        _tile_loadd(7, vt + 512, 64);
        _tile_dpbf16ps(1, 6, 7);
        if constexpr (DT == 4) {
          _tile_loadd(7, vt + 2 * 512, 64);
          _tile_dpbf16ps(2, 6, 7);
          _tile_loadd(7, vt + 3 * 512, 64);
          _tile_dpbf16ps(3, 6, 7);
        }
      }
      acc_tiles_store<DT>(acc, acc_stride);
    }
  }
  for (int64_t h = 0; h < G; ++h) {
    const float* acc = w.acc.data() + h * kTileQ * D;
    for (int64_t q = 0; q < nq; ++q) {
      c10::BFloat16* dst = o_ptr + (q_start + t.first + q) * o_row_stride + (t.kv_head * G + h) * D;
      const vf inv = splat(1.f / w.l[h * kTileQ + q]);
      for (int64_t x = 0; x < D; x += kLanes) store(dst + x, load(acc + q * D + x) * inv);
    }
  }
}
#else
#define ENGINE_PREFILL_AMX 0
#endif

template <typename scalar_t>
void prefill_kernel(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                    const at::Tensor& block_tables, const at::Tensor& seq_lens,
                    const at::Tensor& query_start_loc, const at::Tensor& seqs, double scale,
                    bool amx) {
  const int64_t H = query.size(1), D = query.size(2);
  const int64_t block_size = kv_cache.size(2), Hkv = kv_cache.size(3), G = H / Hkv;
  const int64_t cache_stride = kv_cache.stride(1), token_stride = kv_cache.stride(2);
  const auto* q_ptr = query.data_ptr<scalar_t>();
  auto* o_ptr = out.data_ptr<scalar_t>();
  const auto* k_base = kv_cache.data_ptr<scalar_t>();
  const scalar_t* v_base = k_base + kv_cache.stride(0);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* starts = query_start_loc.data_ptr<int64_t>();
  const int64_t* ids = seqs.data_ptr<int64_t>();
  const int64_t num_blocks = kv_cache.size(1);

  std::vector<Task> tasks;
  for (int64_t i = 0; i < seqs.numel(); ++i) {
    const int64_t s = ids[i];
    TORCH_CHECK(s >= 0 && s < seq_lens.numel(), "paged_prefill_attention: sequence ", s,
                " out of range");
    const int64_t q_len = starts[s + 1] - starts[s];
    TORCH_CHECK(q_len >= 1 && q_len <= lens[s], "paged_prefill_attention: sequence ", s,
                " has ", q_len, " query rows for a context of ", lens[s]);
    TORCH_CHECK((lens[s] + block_size - 1) / block_size <= max_blocks,
                "paged_prefill_attention: sequence ", s, " has more tokens than its block table");
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[s * max_blocks + b] >= 0 && tables[s * max_blocks + b] < num_blocks,
                  "paged_prefill_attention: block id outside the cache");
    // the longest tiles first: dynamic scheduling then ends evenly
    for (int64_t first = 0; first < q_len; first += kTileQ)
      for (int64_t g = 0; g < Hkv; ++g) tasks.push_back({s, g, first});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    return lens[a.seq] - (starts[a.seq + 1] - starts[a.seq]) + a.first >
           lens[b.seq] - (starts[b.seq + 1] - starts[b.seq]) + b.first;
  });
  const int64_t n = static_cast<int64_t>(tasks.size());
  if (n == 0) return;
  const float fscale = static_cast<float>(scale);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)));
#if ENGINE_PREFILL_AMX
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (amx) {
#pragma omp parallel num_threads(threads)
      {
        AmxScratch scratch(G, D);
        configure_prefill_tiles();
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; ++i) {
          const Task& t = tasks[i];
          const int64_t s = t.seq;
          const int64_t q_len = starts[s + 1] - starts[s];
          const c10::BFloat16* kb = k_base + t.kv_head * D;
          const c10::BFloat16* vb = v_base + t.kv_head * D;
          if (D == 64)
            amx_prefill_tile_resident<4>(t, q_ptr, query.stride(0), o_ptr, out.stride(0), kb, vb,
                                         tables + s * max_blocks, lens[s], starts[s], q_len,
                                         block_size, cache_stride, token_stride, G, fscale,
                                         scratch);
          else if (D == 32)
            amx_prefill_tile_resident<2>(t, q_ptr, query.stride(0), o_ptr, out.stride(0), kb, vb,
                                         tables + s * max_blocks, lens[s], starts[s], q_len,
                                         block_size, cache_stride, token_stride, G, fscale,
                                         scratch);
          else
            amx_prefill_tile(t, q_ptr, query.stride(0), o_ptr, out.stride(0), kb, vb,
                             tables + s * max_blocks, lens[s], starts[s], q_len, block_size,
                             cache_stride, token_stride, G, D, fscale, scratch);
        }
        _tile_release();
      }
      return;
    }
  }
#endif
#pragma omp parallel num_threads(threads)
  {
    const int64_t rows = kTileQ * G + 8;  // + the most rows a pass computes past the end
    std::vector<float> qf(rows * D), acc(rows * D), kt(D * kVecKeys), vbuf(kVecKeys * D),
        m_run(rows), l_run(rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) {
      const Task& t = tasks[i];
      const int64_t s = t.seq;
#define ENGINE_PREFILL_CASE(dv)                                                                  \
  case dv:                                                                                       \
    prefill_tile<scalar_t, dv>(t, q_ptr, query.stride(0), o_ptr, out.stride(0),                  \
                               k_base + t.kv_head * D, v_base + t.kv_head * D,                   \
                               tables + s * max_blocks, lens[s], starts[s],                      \
                               starts[s + 1] - starts[s], block_size, cache_stride,              \
                               token_stride, G, fscale, qf.data(), acc.data(), kt.data(),        \
                               vbuf.data(), m_run.data(), l_run.data());                         \
    break;
      switch (D / kLanes) {
        ENGINE_PREFILL_CASE(1)
        ENGINE_PREFILL_CASE(2)
        ENGINE_PREFILL_CASE(3)
        ENGINE_PREFILL_CASE(4)
        ENGINE_PREFILL_CASE(5)
        ENGINE_PREFILL_CASE(6)
        ENGINE_PREFILL_CASE(7)
        ENGINE_PREFILL_CASE(8)
        default: break;  // refused by the caller
      }
#undef ENGINE_PREFILL_CASE
    }
  }
}

void paged_prefill_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& kv_cache,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens,
                             const at::Tensor& query_start_loc, const at::Tensor& seqs,
                             double scale, bool amx) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(),
              "paged_prefill_attention: query/out must be [T, H, D]");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "paged_prefill_attention: kv_cache must be [2, N, B, Hkv, D]");
  TORCH_CHECK(kv_cache.size(4) == query.size(2) && query.size(2) % kLanes == 0 &&
                  query.size(2) <= 8 * kLanes,
              "paged_prefill_attention: head size must match the cache and be a multiple of ",
              kLanes, " up to ", 8 * kLanes);
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && kv_cache.is_contiguous() &&
                  query.stride(1) == query.size(2) && out.stride(1) == out.size(2),
              "paged_prefill_attention: head rows must be contiguous");
  TORCH_CHECK(query.size(1) % kv_cache.size(3) == 0,
              "paged_prefill_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "paged_prefill_attention: query, out and kv_cache dtypes differ");
  TORCH_CHECK(query_start_loc.numel() == seq_lens.numel() + 1 &&
                  block_tables.size(0) == seq_lens.numel(),
              "paged_prefill_attention: one block table, length and query start per sequence");
  for (const at::Tensor* t : {&block_tables, &seq_lens, &query_start_loc, &seqs}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(),
                "paged_prefill_attention: index tensors must be contiguous int64");
  }
  // the AMX path where asked for, built in, allowed by Linux, and the shapes fit its
  // tiles (32-wide head chunks, 16-key runs inside one cache block); the vector path
  // otherwise
  const bool use_amx = amx && ENGINE_PREFILL_AMX && query.scalar_type() == at::kBFloat16 &&
                       query.size(2) % 32 == 0 && kv_cache.size(2) % 16 == 0 &&
                       engine_kernels::amx_permitted();
  if (query.scalar_type() == at::kFloat) {
    prefill_kernel<float>(out, query, kv_cache, block_tables, seq_lens, query_start_loc, seqs,
                          scale, false);
  } else if (query.scalar_type() == at::kBFloat16) {
    prefill_kernel<at::BFloat16>(out, query, kv_cache, block_tables, seq_lens, query_start_loc,
                                 seqs, scale, use_amx);
  } else {
    TORCH_CHECK(false, "paged_prefill_attention: float32 or bfloat16 only");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine_kernels, m) {
  m.def("paged_prefill_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, "
        "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, Tensor seqs, "
        "float scale, bool amx=False) -> ()");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("paged_prefill_attention", &paged_prefill_attention);
}
