// Linear layers and embeddings on GGUF block-quantized weights, read in place.
//
// A weight [N, K] stays as GGUF stores it: each row a run of blocks (32 values
// for Q4_0 Q4_1 Q5_0 Q5_1 Q8_0, 256 for the K-quants Q4_K Q5_K Q6_K), rows packed
// back to back in a uint8 tensor [N, row_bytes]. Every kernel here sees a block
// as 32-value chunks: chunk c of a row decodes to 32 small integers q (at most
// 8 bits), two scales (one per 16 values: Q6_K scales each 16) and an offset, so
// that value i is scale[i / 16] * q[i] + offset. The weight is never widened in
// memory; decode steps read each block once.
//
// engine_kernels::ggml_linear(out [M, N], x [M, K], blocks, type, bias [N] or None, path)
//     out = x @ W.T + bias for a few rows (decode steps). path 0 ("float"): each
//     chunk decoded to float32 and multiplied with x as it is (float32 and bf16
//     activations; the result is the dequantize-then-matmul product up to
//     summation order). path 1..3: x is quantized to int8 per 32-value chunk
//     (scale = max |x| / 127) and each chunk is an integer dot product, as
//     llama.cpp does: 1 "portable" (plain C++), 2 "avx2" (vpmaddubsw),
//     3 "avx512_vnni" (vpdpbusd: two blocks a step on 512-bit registers for the
//     32-value formats, one on 256-bit registers for the K-quants). Python picks
//     the path from /proc/cpuinfo (engine/quantization/ggml.py).
// engine_kernels::ggml_matmul(out [M, N], x [M, K], blocks, type, bias, tile_bytes)
//     out = x @ W.T + bias for many rows (prompts): tiles of about tile_bytes of
//     W dequantized into one reused buffer, each multiplied by ATen's matmul
// engine_kernels::ggml_dequantize(out [N, K], blocks, type): float32 or bf16 out
// engine_kernels::ggml_embedding(out [T, K], ids [T], blocks, type): the rows `ids`
// engine_kernels::ggml_compiled_paths() -> int: bit p set when path p is built in
#include <torch/library.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// ggml type ids (the GGUF tensor_type field)
enum GgmlType : int64_t {
  kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14,
};

enum Path : int64_t { kFloat = 0, kPortable = 1, kAvx2 = 2, kVnni = 3 };

constexpr int64_t kChunk = 32;
constexpr int64_t kMaxRowsPerPass = 4;  // activation rows sharing one decoded weight chunk

struct Format {
  int64_t block_values;
  int64_t block_bytes;
};

Format format_of(int64_t type) {
  switch (type) {
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ5_0: return {32, 22};
    case kQ5_1: return {32, 24};
    case kQ8_0: return {32, 34};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    default: TORCH_CHECK(false, "ggml type ", type, " is not supported by the quantized kernels");
  }
  return {0, 0};
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);  // one instruction; read once or twice per 32 weights
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// the 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block (12 packed bytes)
inline void k_scale_min(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// One decoded 32-value chunk: value i = scale[i / 16] * q[i] + offset.
struct Chunk {
  int8_t q[kChunk];
  float scale[2];
  float offset;
};

// chunk c of the row starting at `row` (portable; the reference for every path)
void decode_chunk(int64_t type, const uint8_t* row, int64_t c, Chunk* out) {
  out->offset = 0.f;
  switch (type) {
    case kQ8_0: {
      const uint8_t* b = row + c * 34;
      out->scale[0] = out->scale[1] = half_at(b);
      std::memcpy(out->q, b + 2, 32);
      return;
    }
    case kQ4_0: case kQ4_1: {
      const bool has_min = type == kQ4_1;
      const uint8_t* b = row + c * (has_min ? 20 : 18);
      const float d = half_at(b);
      const uint8_t* qs = b + (has_min ? 4 : 2);
      for (int i = 0; i < 16; ++i) {
        out->q[i] = static_cast<int8_t>(qs[i] & 0xF);
        out->q[i + 16] = static_cast<int8_t>(qs[i] >> 4);
      }
      out->scale[0] = out->scale[1] = d;
      out->offset = has_min ? half_at(b + 2) : -8.f * d;
      return;
    }
    case kQ5_0: case kQ5_1: {
      const bool has_min = type == kQ5_1;
      const uint8_t* b = row + c * (has_min ? 24 : 22);
      const float d = half_at(b);
      uint32_t qh;
      std::memcpy(&qh, b + (has_min ? 4 : 2), 4);
      const uint8_t* qs = b + (has_min ? 8 : 6);
      for (int i = 0; i < 16; ++i) {
        out->q[i] = static_cast<int8_t>((qs[i] & 0xF) | (((qh >> i) & 1) << 4));
        out->q[i + 16] = static_cast<int8_t>((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
      }
      out->scale[0] = out->scale[1] = d;
      out->offset = has_min ? half_at(b + 2) : -16.f * d;
      return;
    }
    case kQ4_K: case kQ5_K: {
      const bool five = type == kQ5_K;
      const uint8_t* b = row + (c / 8) * (five ? 176 : 144);
      const int j = static_cast<int>(c % 8);
      int sc, m;
      k_scale_min(b + 4, j, &sc, &m);
      const uint8_t* qs = b + (five ? 48 : 16) + (j / 2) * 32;
      const int shift = (j % 2) * 4;
      for (int i = 0; i < 32; ++i) {
        int v = (qs[i] >> shift) & 0xF;
        if (five) v |= ((b[16 + i] >> j) & 1) << 4;
        out->q[i] = static_cast<int8_t>(v);
      }
      out->scale[0] = out->scale[1] = half_at(b) * sc;
      out->offset = -half_at(b + 2) * m;
      return;
    }
    case kQ6_K: {
      const uint8_t* b = row + (c / 8) * 210;
      const int half = static_cast<int>((c % 8) / 4), r = static_cast<int>(c % 4);
      const uint8_t* ql = b + 64 * half + (r & 1) * 32;
      const uint8_t* qh = b + 128 + 32 * half;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * half + 2 * r;
      const int shift = (r / 2) * 4;
      for (int i = 0; i < 32; ++i)
        out->q[i] = static_cast<int8_t>((((ql[i] >> shift) & 0xF) | (((qh[i] >> (2 * r)) & 3) << 4)) - 32);
      const float d = half_at(b + 208);
      out->scale[0] = d * sc[0];
      out->scale[1] = d * sc[1];
      return;
    }
    default: TORCH_CHECK(false, "ggml type ", type, " is not supported by the quantized kernels");
  }
}

template <typename T>
void dequantize_row(int64_t type, const uint8_t* row, int64_t K, T* out) {
  Chunk ch;
  for (int64_t c = 0; c < K / kChunk; ++c) {
    decode_chunk(type, row, c, &ch);
    for (int i = 0; i < kChunk; ++i)
      out[c * kChunk + i] = static_cast<T>(ch.scale[i / 16] * ch.q[i] + ch.offset);
  }
}

// ---------------------------------------------------------------- activations

// x quantized per 32-value chunk: q = round(x / d) with d = max|x| / 127; `sum`
// is d * sum(q), which multiplies a chunk's offset, and `qsum` sum(q) itself (the
// offset of Q8_0 Q4_0 Q5_0 is a whole multiple of the scale: their kernels take
// it in integers)
struct QuantizedRows {
  std::vector<int8_t> q;       // [M, K]
  std::vector<float> d;        // [M, K / 32]
  std::vector<float> sum;      // [M, K / 32]
  std::vector<int32_t> qsum;   // [M, K / 32]
  // q with each 128-value half of a 256-value super-block in the order the
  // K-quant kernel reads it (its 32-value chunks 0, 2, 1, 3): one load a register
  std::vector<int8_t> q_k;     // [M, K], filled by arrange_for_k_super
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 values of x as float32
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// 16 float32 values stored as T (bfloat16: rounded to nearest even, as torch's
// float32 -> bfloat16 conversion)
template <typename T>
inline void store16_as(T* at, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(at, v);
  } else {
#if defined(__AVX512BF16__)
    // round to nearest even, as torch's float32 -> bfloat16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(at), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
    engine_kernels::store(at, reinterpret_cast<engine_kernels::vf>(v));
#endif
  }
}
#endif

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, QuantizedRows* out) {
  const int64_t chunks = K / kChunk;
  out->q.resize(M * K);
  out->d.resize(M * chunks);
  out->sum.resize(M * chunks);
  out->qsum.resize(M * chunks);
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // the same arithmetic as the loop below, 16 values a register (the rounding
  // of _mm512_cvtps_epi32 is nearbyint's: to nearest, ties to even)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const T* xs = x + m * K + c * kChunk;
      const __m512 lo = load16(xs), hi = load16(xs + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
      const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
      int8_t* q = out->q.data() + m * K + c * kChunk;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qlo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qhi));
      const int32_t qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
      out->d[m * chunks + c] = d;
      out->sum[m * chunks + c] = d * static_cast<float>(qsum);
      out->qsum[m * chunks + c] = qsum;
    }
  return;
#endif
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const T* xs = x + m * K + c * kChunk;
      float v[kChunk], amax = 0.f;
      for (int i = 0; i < kChunk; ++i) {
        v[i] = static_cast<float>(xs[i]);
        amax = std::max(amax, std::fabs(v[i]));
      }
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = out->q.data() + m * K + c * kChunk;
      int s = 0;
      for (int i = 0; i < kChunk; ++i) {
        q[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
        s += q[i];
      }
      out->d[m * chunks + c] = d;
      out->sum[m * chunks + c] = d * static_cast<float>(s);
      out->qsum[m * chunks + c] = s;
    }
}

// ---------------------------------------------------------------- interleaved groups
//
// The 32-value formats (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) repacked once at load into the
// same number of bytes, in the order the decode kernel reads them. Rows go in
// groups of kGroup; a group is stored block column by block column (block c of
// its 16 rows together), and a block column as
//   the 16 rows' float16 scales (32 bytes),
//   their float16 minimums (Q4_1, Q5_1: 32 bytes),
//   their fifth bits (Q5_0, Q5_1: a 32-bit word a row, bit 8k + r of it the fifth
//     bit of value 4r + k, so that one shift and one mask put it in place),
//   their values in 4-value runs: run j of row 0, of row 1, ... of row 15, then
//     run j + 1 (64 bytes a run): for the 4-bit formats run j is the block's bytes
//     4j..4j+3 (values 4j..4j+3 in the low nibbles, 16+4j.. in the high ones), for
//     Q8_0 values 4j..4j+3 plus 128, so that they are unsigned.
// A 64-byte load then holds 4 values of each of 16 rows: one vpdpbusd against 4
// activation values broadcast gives the 16 rows' partial sums in its 16 lanes,
// and the weight streams from memory strictly in order. Rows past the last whole
// group stay as the file has them.
constexpr int64_t kGroup = 16;

constexpr bool interleavable(int64_t type) {
  return type == kQ4_0 || type == kQ4_1 || type == kQ5_0 || type == kQ5_1 || type == kQ8_0;
}

// where the parts of one block sit: in the file's block, and in a block column
struct BlockParts {
  int64_t bytes;                    // of one block
  int64_t min_at, qh_at, qs_at;     // in the file's block (-1: none)
  int64_t col_min, col_qh, col_qs;  // in the block column (-1: none)
  int runs;                         // 4-byte runs of values
};

constexpr BlockParts block_parts(int64_t type) {
  switch (type) {
    case kQ4_0: return {18, -1, -1, 2, -1, -1, 32, 4};
    case kQ4_1: return {20, 2, -1, 4, 32, -1, 64, 4};
    case kQ5_0: return {22, -1, 2, 6, -1, 32, 96, 4};
    case kQ5_1: return {24, 2, 4, 8, 32, 64, 128, 4};
    default: return {34, -1, -1, 2, -1, -1, 32, 8};  // Q8_0
  }
}

inline uint32_t fifth_bits_to_column(uint32_t qh) {
  uint32_t out = 0;
  for (int r = 0; r < 8; ++r)
    for (int k = 0; k < 4; ++k) out |= ((qh >> (4 * r + k)) & 1u) << (8 * k + r);
  return out;
}

inline uint32_t fifth_bits_from_column(uint32_t packed) {
  uint32_t out = 0;
  for (int r = 0; r < 8; ++r)
    for (int k = 0; k < 4; ++k) out |= ((packed >> (8 * k + r)) & 1u) << (4 * r + k);
  return out;
}

// block `src` of a row into lane `lane` of the block column `col`, or back (`unpack`)
// block `block` of a row into lane `lane` of the block column `col`, or back
// (`kUnpack`); whole 4-byte runs at a time, since prompts unpack every row
template <int64_t Type, bool kUnpack>
inline void move_block(uint8_t* block, uint8_t* col, int lane) {
  constexpr BlockParts p = block_parts(Type);
  auto copy = [](uint8_t* in_block, uint8_t* in_col, int64_t n) {
    if (kUnpack) std::memcpy(in_block, in_col, n);
    else std::memcpy(in_col, in_block, n);
  };
  copy(block, col + 2 * lane, 2);
  if constexpr (p.min_at >= 0) copy(block + p.min_at, col + p.col_min + 2 * lane, 2);
  if constexpr (p.qh_at >= 0) {
    uint32_t qh;
    if (kUnpack) {
      std::memcpy(&qh, col + p.col_qh + 4 * lane, 4);
      qh = fifth_bits_from_column(qh);
      std::memcpy(block + p.qh_at, &qh, 4);
    } else {
      std::memcpy(&qh, block + p.qh_at, 4);
      qh = fifth_bits_to_column(qh);
      std::memcpy(col + p.col_qh + 4 * lane, &qh, 4);
    }
  }
  constexpr uint32_t flip = Type == kQ8_0 ? 0x80808080u : 0u;
  for (int j = 0; j < p.runs; ++j) {
    uint8_t* b = block + p.qs_at + 4 * j;
    uint8_t* c = col + p.col_qs + 64 * j + 4 * lane;
    uint32_t run;
    std::memcpy(&run, kUnpack ? c : b, 4);
    run ^= flip;
    std::memcpy(kUnpack ? b : c, &run, 4);
  }
}

// every block of one row: the row's plain blocks <-> lane `lane` of its group
template <int64_t Type, bool kUnpack>
void move_row(uint8_t* row, uint8_t* group, int64_t row_bytes, int lane) {
  constexpr int64_t bytes = block_parts(Type).bytes;
  for (int64_t c = 0; c < row_bytes / bytes; ++c)
    move_block<Type, kUnpack>(row + c * bytes, group + c * kGroup * bytes, lane);
}

template <bool kUnpack>
void move_row(int64_t type, uint8_t* row, uint8_t* group, int64_t row_bytes, int lane) {
  switch (type) {
    case kQ4_0: return move_row<kQ4_0, kUnpack>(row, group, row_bytes, lane);
    case kQ4_1: return move_row<kQ4_1, kUnpack>(row, group, row_bytes, lane);
    case kQ5_0: return move_row<kQ5_0, kUnpack>(row, group, row_bytes, lane);
    case kQ5_1: return move_row<kQ5_1, kUnpack>(row, group, row_bytes, lane);
    case kQ8_0: return move_row<kQ8_0, kUnpack>(row, group, row_bytes, lane);
    default: TORCH_CHECK(false, "ggml type ", type, " has no interleaved layout");
  }
}

// Row n of a weight [N, row_bytes] as the file stores it: the row itself when
// it is not interleaved, else rebuilt into `scratch` (row_bytes)
const uint8_t* file_row(const uint8_t* w, int64_t n, int64_t N, int64_t row_bytes, int64_t type,
                        bool interleaved, uint8_t* scratch) {
  if (!interleaved || n >= N / kGroup * kGroup) return w + n * row_bytes;
  uint8_t* group = const_cast<uint8_t*>(w) + (n / kGroup) * kGroup * row_bytes;
  move_row<true>(type, scratch, group, row_bytes, static_cast<int>(n % kGroup));
  return scratch;
}

// ---------------------------------------------------------------- row dot products

// rows [m0, m0 + R) of x against weight row `row`: float chunks (path 0)
template <typename T, int R>
void dot_float(int64_t type, const uint8_t* row, const T* x, int64_t K, float* out) {
  float acc[R] = {};
  Chunk ch;
  float w[kChunk];
  for (int64_t c = 0; c < K / kChunk; ++c) {
    decode_chunk(type, row, c, &ch);
    for (int i = 0; i < kChunk; ++i) w[i] = ch.scale[i / 16] * ch.q[i] + ch.offset;
    for (int r = 0; r < R; ++r) {
      const T* xs = x + r * K + c * kChunk;
      float s = 0.f;
      for (int i = 0; i < kChunk; ++i) s += w[i] * static_cast<float>(xs[i]);
      acc[r] += s;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

// int8 chunks, plain C++ (path 1)
template <int R>
void dot_portable(int64_t type, const uint8_t* row, const QuantizedRows& xq, int64_t m0,
                  int64_t K, float* out) {
  const int64_t chunks = K / kChunk;
  float acc[R] = {};
  Chunk ch;
  for (int64_t c = 0; c < chunks; ++c) {
    decode_chunk(type, row, c, &ch);
    for (int r = 0; r < R; ++r) {
      const int8_t* qx = xq.q.data() + (m0 + r) * K + c * kChunk;
      int32_t lo = 0, hi = 0;
      for (int i = 0; i < 16; ++i) lo += ch.q[i] * qx[i];
      for (int i = 16; i < 32; ++i) hi += ch.q[i] * qx[i];
      const int64_t at = (m0 + r) * chunks + c;
      acc[r] += xq.d[at] * (ch.scale[0] * lo + ch.scale[1] * hi) + ch.offset * xq.sum[at];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

#if defined(__AVX2__)
// A chunk as 32 bytes in one register. `is_signed`: q may be negative (Q8_0,
// Q6_K) and goes through the sign trick; otherwise q is 0..31 and is the
// unsigned operand itself. scale: 8 lanes, lanes 0-3 the first 16 values.
struct VecChunk {
  __m256i q;
  __m256 scale;
  float offset;
  bool is_signed;
};

inline __m256i nibbles(const uint8_t* qs) {  // 16 bytes -> low nibbles then high nibbles
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
}

// 32 bits -> 32 bytes, 0x10 where the bit is set (the fifth bit of Q5_0/Q5_1)
inline __m256i fifth_bits(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// `Type` is a compile-time constant: the switch folds away, so the hot loops
// below carry no per-chunk branch on the format
template <int64_t Type>
inline void decode_vec(const uint8_t* row, int64_t c, VecChunk* out) {
  out->is_signed = false;
  out->offset = 0.f;
  float s0, s1;
  switch (Type) {
    case kQ8_0: {
      const uint8_t* b = row + c * 34;
      s0 = s1 = half_at(b);
      out->q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
      out->is_signed = true;
      break;
    }
    case kQ4_0: case kQ4_1: {
      const bool has_min = Type == kQ4_1;
      const uint8_t* b = row + c * (has_min ? 20 : 18);
      s0 = s1 = half_at(b);
      out->q = nibbles(b + (has_min ? 4 : 2));
      out->offset = has_min ? half_at(b + 2) : -8.f * s0;
      break;
    }
    case kQ5_0: case kQ5_1: {
      const bool has_min = Type == kQ5_1;
      const uint8_t* b = row + c * (has_min ? 24 : 22);
      s0 = s1 = half_at(b);
      uint32_t qh;
      std::memcpy(&qh, b + (has_min ? 4 : 2), 4);
      out->q = _mm256_or_si256(nibbles(b + (has_min ? 8 : 6)), fifth_bits(qh));
      out->offset = has_min ? half_at(b + 2) : -16.f * s0;
      break;
    }
    case kQ4_K: case kQ5_K: {
      const bool five = Type == kQ5_K;
      const uint8_t* b = row + (c / 8) * (five ? 176 : 144);
      const int j = static_cast<int>(c % 8);
      int sc, m;
      k_scale_min(b + 4, j, &sc, &m);
      const __m256i bytes = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(b + (five ? 48 : 16) + (j / 2) * 32));
      __m256i q = _mm256_and_si256(_mm256_srli_epi16(bytes, (j % 2) * 4), _mm256_set1_epi8(0x0F));
      if (five) {
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
        const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)),
                                             _mm256_set1_epi8(1));
        q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
      }
      out->q = q;
      s0 = s1 = half_at(b) * sc;
      out->offset = -half_at(b + 2) * m;
      break;
    }
    case kQ6_K: {
      const uint8_t* b = row + (c / 8) * 210;
      const int half = static_cast<int>((c % 8) / 4), r = static_cast<int>(c % 4);
      const __m256i ql = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(b + 64 * half + (r & 1) * 32));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * half));
      const __m256i lo = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128((r / 2) * 4)),
                                          _mm256_set1_epi8(0x0F));
      const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * r)),
                                          _mm256_set1_epi8(3));
      out->q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
      out->is_signed = true;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * half + 2 * r;
      const float d = half_at(b + 208);
      s0 = d * sc[0];
      s1 = d * sc[1];
      break;
    }
    default: TORCH_CHECK(false, "ggml type ", Type, " is not supported by the quantized kernels");
  }
  out->scale = _mm256_setr_m128(_mm_set1_ps(s0), _mm_set1_ps(s1));
}

// formats with one scale per 32 values (the others scale each 16)
constexpr bool one_scale(int64_t type) { return type != kQ6_K; }
// formats whose values are signed (the others are 0..31 plus an offset)
constexpr bool signed_values(int64_t type) { return type == kQ8_0 || type == kQ6_K; }

// 8 int32 lanes: lane l holds the sum over bytes 4l..4l+3 of u[i] * s[i]
template <bool kVnni>
inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  if constexpr (kVnni) return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#endif
  // u <= 128 and |s| <= 127: the pairwise 16-bit sums of vpmaddubsw cannot saturate
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

template <int64_t Type, bool kVnni, int R>
inline void dot_chunk(const uint8_t* row, const QuantizedRows& xq, int64_t m0, int64_t K,
                      int64_t c, __m256* acc, __m256* offsets) {
  const int64_t chunks = K / kChunk;
  VecChunk ch;
  decode_vec<Type>(row, c, &ch);
  const __m256i u = signed_values(Type) ? _mm256_sign_epi8(ch.q, ch.q) : ch.q;
  for (int r = 0; r < R; ++r) {
    const int64_t at = (m0 + r) * chunks + c;
    __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + (m0 + r) * K + c * kChunk));
    if constexpr (signed_values(Type)) qx = _mm256_sign_epi8(qx, ch.q);
    const __m256 dots = _mm256_cvtepi32_ps(dot_u8_s8<kVnni>(u, qx));
    const __m256 dx = _mm256_set1_ps(xq.d[at]);
    acc[r] = _mm256_fmadd_ps(dots, one_scale(Type) ? _mm256_mul_ps(_mm256_set1_ps(_mm256_cvtss_f32(ch.scale)), dx)
                                                   : _mm256_mul_ps(ch.scale, dx), acc[r]);
    // the offset times the chunk's sum of x, in lane 0 (lanes 1..7 stay 0)
    if constexpr (!signed_values(Type))
      offsets[r] = _mm256_fmadd_ps(_mm256_set_m128(_mm_setzero_ps(), _mm_set_ss(ch.offset)),
                                   _mm256_set1_ps(xq.sum[at]), offsets[r]);
  }
}

inline float hsum(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// two chunks a step into two sets of accumulators: the float adds of one chunk
// do not wait for the previous chunk's
template <int64_t Type, bool kVnni, int R>
void dot_vec(const uint8_t* row, const QuantizedRows& xq, int64_t m0, int64_t K, float* out) {
  const int64_t chunks = K / kChunk;
  __m256 acc[2][R], offsets[2][R];
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < R; ++r) acc[h][r] = offsets[h][r] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) {
    dot_chunk<Type, kVnni, R>(row, xq, m0, K, c, acc[0], offsets[0]);
    dot_chunk<Type, kVnni, R>(row, xq, m0, K, c + 1, acc[1], offsets[1]);
  }
  if (c < chunks) dot_chunk<Type, kVnni, R>(row, xq, m0, K, c, acc[0], offsets[0]);
  for (int r = 0; r < R; ++r)
    out[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0][r], acc[1][r]),
                                _mm256_add_ps(offsets[0][r], offsets[1][r])));
}

// How far ahead of the bytes being multiplied the group and K-quant kernels ask
// for the weight (software prefetch into L2): one core's hardware prefetchers
// alone keep too few lines in flight to stream at the rate the memory delivers
// (benchmarks/profile_quant_decode.py; docs/benchmarks.md)
constexpr int64_t kPrefetchBytes = 2048;

constexpr bool k_super_kernel(int64_t type) {
  return type == kQ4_K || type == kQ5_K || type == kQ6_K;
}

#if defined(__AVX2__)
// the 8 six-bit scales (`sc`) and minimums (`m`) of a Q4_K/Q5_K super-block from
// its 12 packed bytes, all at once (k_scale_min gives one)
inline void k_scales_mins(const uint8_t* s, uint8_t* sc, uint8_t* m) {
  uint32_t w[3];
  std::memcpy(w, s, 12);
  const uint32_t low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu, top2 = 0x03030303u;
  const uint32_t sc_lo = w[0] & low6, m_lo = w[1] & low6;
  const uint32_t sc_hi = (w[2] & low4) | (((w[0] >> 6) & top2) << 4);
  const uint32_t m_hi = ((w[2] >> 4) & low4) | (((w[1] >> 6) & top2) << 4);
  std::memcpy(sc, &sc_lo, 4);
  std::memcpy(sc + 4, &sc_hi, 4);
  std::memcpy(m, &m_lo, 4);
  std::memcpy(m + 4, &m_hi, 4);
}

inline __m256 eight_bytes_ps(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// K-quant rows a super-block at a time on AVX2 (the avx2 path): the scales and
// minimums unpacked once per 256 values, each 32-value sub-block's 6-bit scale
// (Q6_K: its two 8-bit ones) folded into the vpmaddwd that sums vpmaddubsw's pairs,
// and x's chunk scale times the super-block's d applied once per chunk in float.
// The same integers as dot_vec's chunk-at-a-time arithmetic; the float sums in
// another order.
template <int64_t Type, int R>
void dot_k_super_avx2(const uint8_t* row, const QuantizedRows& xq, int64_t m0, int64_t K,
                      float* out) {
  constexpr int64_t bytes = Type == kQ4_K ? 144 : Type == kQ5_K ? 176 : 210;
  const int64_t chunks = K / kChunk;
  // two accumulators a row (even and odd sub-blocks): the adds of one do not wait
  // for the other's
  __m256 acc[2][R], mins[R];
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = mins[r] = _mm256_setzero_ps();
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    const uint8_t* b = row + sb * bytes;
    for (int64_t line = 0; line < bytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(b) + kPrefetchBytes + line),
                   _MM_HINT_T1);
    // per row: d times x's 8 chunk scales
    alignas(32) float dx[R][8];
    const __m256 d = _mm256_set1_ps(half_at(Type == kQ6_K ? b + 208 : b));
    for (int r = 0; r < R; ++r)
      _mm256_store_ps(dx[r], _mm256_mul_ps(d, _mm256_loadu_ps(xq.d.data() + (m0 + r) * chunks + sb * 8)));
    if constexpr (Type == kQ4_K || Type == kQ5_K) {
      alignas(16) uint8_t sc8[8], m8[8];
      k_scales_mins(b + 4, sc8, m8);
      const __m256 mn = _mm256_mul_ps(_mm256_set1_ps(half_at(b + 2)), eight_bytes_ps(m8));
      for (int r = 0; r < R; ++r)
        mins[r] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(xq.sum.data() + (m0 + r) * chunks + sb * 8), mins[r]);
      const uint8_t* qs = b + (Type == kQ5_K ? 48 : 16);
      __m256i qh;
      if constexpr (Type == kQ5_K) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
      for (int j = 0; j < 8; j += 2) {
        // sub-block j: the low nibbles of bytes 32 (j / 2).., j + 1 the high ones;
        // Q5_K's fifth bits are bit j of the 32 qh bytes
        const __m256i q32 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 16 * j));
        __m256i q[2] = {_mm256_and_si256(q32, nibble), _mm256_and_si256(_mm256_srli_epi16(q32, 4), nibble)};
        if constexpr (Type == kQ5_K) {
          const __m256i one = _mm256_set1_epi8(1);
          q[0] = _mm256_or_si256(q[0], _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
          q[1] = _mm256_or_si256(q[1], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4));
          qh = _mm256_srli_epi16(qh, 2);
        }
        for (int h = 0; h < 2; ++h) {
          const __m256i scale = _mm256_set1_epi16(sc8[j + h]);
          for (int r = 0; r < R; ++r) {
            const __m256i x32 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                xq.q.data() + (m0 + r) * K + sb * 256 + 32 * (j + h)));
            // q <= 31, |x| <= 127: vpmaddubsw's pair sums fit 16 bits, and times
            // a 6-bit scale vpmaddwd's sums 32
            const __m256i dots = _mm256_madd_epi16(_mm256_maddubs_epi16(q[h], x32), scale);
            acc[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(dx[r][j + h]), acc[h][r]);
          }
        }
      }
    } else {
      // Q6_K: value (q - 32) times its 16 values' int8 scale. Half h (values
      // 128h..) reads ql bytes 64h.. and qh bytes 128 + 32h..; its chunk c (of 4)
      // is the low (c < 2) or high nibbles of ql bytes 64h + 32 (c % 2).., with
      // bits 2c.. of the qh bytes on top
      const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
      const __m256i three = _mm256_set1_epi8(3), c32 = _mm256_set1_epi8(32);
      for (int h = 0; h < 2; ++h) {
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
        for (int c = 0; c < 4; ++c) {
          const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32 * (c % 2)));
          const __m256i lo = c < 2 ? _mm256_and_si256(ql, nibble)
                                   : _mm256_and_si256(_mm256_srli_epi16(ql, 4), nibble);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), three);
          // signed q through the sign trick: |q| <= 32 unsigned, x takes q's sign
          const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), c32);
          const __m256i u = _mm256_sign_epi8(q, q);
          const int s = 8 * h + 2 * c;
          const __m256i scale = _mm256_setr_m128i(_mm_set1_epi16(scales[s]), _mm_set1_epi16(scales[s + 1]));
          const int k = c % 2;
          for (int r = 0; r < R; ++r) {
            const __m256i x32 = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                xq.q.data() + (m0 + r) * K + sb * 256 + 128 * h + 32 * c)), q);
            const __m256i dots = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x32), scale);
            acc[k][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(dx[r][4 * h + c]), acc[k][r]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_sub_ps(_mm256_add_ps(acc[0][r], acc[1][r]), mins[r]));
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ENGINE_GGML_PAIRS 1
// The 32-value formats with one scale per block, two blocks a step on 512-bit
// registers: one vpdpbusd, one conversion and one multiply-add per 64 values.
constexpr bool pairs_kernel(int64_t type) {
  return type == kQ4_0 || type == kQ4_1 || type == kQ5_0 || type == kQ5_1 || type == kQ8_0;
}

// the 64 values of blocks b0 and b1 (one format) as bytes in value order
template <int64_t Type>
inline __m512i pair_values(const uint8_t* b0, const uint8_t* b1) {
  if constexpr (Type == kQ8_0) {
    return _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2)), 1);
  } else {
    constexpr int qs_at = Type == kQ4_0 ? 2 : Type == kQ4_1 ? 4 : Type == kQ5_0 ? 6 : 8;
    const __m256i y = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + qs_at))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + qs_at)), 1);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(y, mask), hi = _mm256_and_si256(_mm256_srli_epi16(y, 4), mask);
    // [b0 low nibbles, b1 low, b0 high, b1 high] -> b0's 32 values, then b1's
    const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    __m512i v = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));
    if constexpr (Type == kQ5_0 || Type == kQ5_1) {
      constexpr int qh_at = Type == kQ5_0 ? 2 : 4;
      uint32_t h0, h1;
      std::memcpy(&h0, b0 + qh_at, 4);
      std::memcpy(&h1, b1 + qh_at, 4);
      const __mmask64 fifth = static_cast<__mmask64>(h0) | (static_cast<__mmask64>(h1) << 32);
      v = _mm512_or_si512(v, _mm512_maskz_mov_epi8(fifth, _mm512_set1_epi8(0x10)));
    }
    return v;
  }
}

// scale and offset of one block
template <int64_t Type>
inline void block_scale(const uint8_t* b, float* d, float* offset) {
  *d = half_at(b);
  if constexpr (Type == kQ4_1 || Type == kQ5_1) *offset = half_at(b + 2);
  else if constexpr (Type == kQ4_0) *offset = -8.f * *d;
  else if constexpr (Type == kQ5_0) *offset = -16.f * *d;
  else *offset = 0.f;
}

template <int64_t Type, int R>
void dot_pairs(const uint8_t* row, const QuantizedRows& xq, int64_t m0, int64_t K, float* out) {
  constexpr int64_t bytes = Type == kQ4_0 ? 18 : Type == kQ4_1 ? 20 : Type == kQ5_0 ? 22
                          : Type == kQ5_1 ? 24 : 34;
  const int64_t chunks = K / kChunk;
  __m512 acc[R];
  float offsets[2][R] = {};
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) {
    const uint8_t* b0 = row + c * bytes;
    const uint8_t* b1 = b0 + bytes;
    const __m512i q = pair_values<Type>(b0, b1);
    float d0, d1, o0, o1;
    block_scale<Type>(b0, &d0, &o0);
    block_scale<Type>(b1, &d1, &o1);
    // Q8_0 values are signed: |q| is the unsigned operand and x takes q's sign
    const __m512i u = Type == kQ8_0 ? _mm512_abs_epi8(q) : q;
    const __mmask64 negative = Type == kQ8_0 ? _mm512_movepi8_mask(q) : 0;
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * chunks + c;
      __m512i qx = _mm512_loadu_si512(xq.q.data() + (m0 + r) * K + c * kChunk);
      if constexpr (Type == kQ8_0) qx = _mm512_mask_sub_epi8(qx, negative, _mm512_setzero_si512(), qx);
      const __m512 dots = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, qx));
      const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0 * xq.d[at]),
                                                _mm512_set1_ps(d1 * xq.d[at + 1]));
      acc[r] = _mm512_fmadd_ps(dots, scale, acc[r]);
      if constexpr (Type != kQ8_0) {
        offsets[0][r] += o0 * xq.sum[at];
        offsets[1][r] += o1 * xq.sum[at + 1];
      }
    }
  }
  float tail[R] = {};
  if (c < chunks) {  // an odd block count: the last block on 256-bit registers
    __m256 acc1[R], off1[R];
    for (int r = 0; r < R; ++r) acc1[r] = off1[r] = _mm256_setzero_ps();
    dot_chunk<Type, true, R>(row, xq, m0, K, c, acc1, off1);
    for (int r = 0; r < R; ++r) tail[r] = hsum(_mm256_add_ps(acc1[r], off1[r]));
  }
  for (int r = 0; r < R; ++r)
    out[r] = _mm512_reduce_add_ps(acc[r]) + offsets[0][r] + offsets[1][r] + tail[r];
}

// The K-quants (Q4_K Q5_K Q6_K) a super-block (256 values) a step on 512-bit
// registers: the scales unpacked once per super-block and row, 64 values of one
// row per vpdpbusd. Where dot_vec takes one 32-value chunk at a time, decoding
// its scales and offset each time (one K-quant row then cost 5x the time of a
// Q4_1 row of the same bytes), this spends the per-chunk work on whole
// super-blocks. Values stay unsigned (Q6_K's 0..63 before its -32, which enters
// as 32 times the sum of x's int8 values of each 4-value lane); each lane's
// integer sum covers 4 values of one 32-value sub-block (Q6_K: of one 16-value
// scale group), so it is scaled before it is added: the lanes' scales (weight
// scale times x's chunk scale) form one float vector per 64 values.
// lanes 0-7 `lo`, lanes 8-15 `hi`
inline __m512 halves_ps(float lo, float hi) {
  return _mm512_insertf32x8(_mm512_set1_ps(lo), _mm256_set1_ps(hi), 1);
}

// bytes 0-31 shifted right by `lo` bits, bytes 32-63 by `hi` (counts per 16-bit
// lane; callers mask each byte after, so bits moving between bytes do not matter)
inline __m512i shift_halves(__m512i v, int lo, int hi) {
  const __m512i counts = _mm512_inserti64x4(
      _mm512_set1_epi16(static_cast<int16_t>(lo)), _mm256_set1_epi16(static_cast<int16_t>(hi)), 1);
  return _mm512_srlv_epi16(v, counts);
}

// xq.q_k from xq.q: in every 128 values, the 32-value chunks 0, 2, 1, 3 (the
// sub-blocks a register of `even`, then of `odd`, holds: k_half)
void arrange_for_k_super(QuantizedRows* xq, int64_t M, int64_t K) {
  xq->q_k.resize(M * K);
  for (int64_t at = 0; at < M * K; at += 128)
    for (int c = 0; c < 4; ++c)
      std::memcpy(xq->q_k.data() + at + 32 * c, xq->q.data() + at + 32 * ((c % 2) * 2 + c / 2), 32);
}

// Half h (values 128h..128h+127) of a Q4_K/Q5_K super-block `b` as two registers
// of unsigned values: `even` holds sub-blocks 4h (bytes 0-31) and 4h + 2 (bytes
// 32-63), `odd` sub-blocks 4h + 1 and 4h + 3. A sub-block j's q are the low
// nibbles of bytes 32 (j / 2).. for even j, the high ones for odd j; Q5_K's fifth
// bits are bit j of its 32 qh bytes
template <int64_t Type>
inline void k_half(const uint8_t* b, int h, __m512i* even, __m512i* odd) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i q64 = _mm512_loadu_si512(b + (Type == kQ5_K ? 48 : 16) + 64 * h);
  *even = _mm512_and_si512(q64, nibble);
  *odd = _mm512_and_si512(_mm512_srli_epi16(q64, 4), nibble);
  if constexpr (Type == kQ5_K) {
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)));
    const __m512i one = _mm512_set1_epi8(1);
    *even = _mm512_or_si512(*even, _mm512_slli_epi16(
        _mm512_and_si512(shift_halves(qh, 4 * h, 4 * h + 2), one), 4));
    *odd = _mm512_or_si512(*odd, _mm512_slli_epi16(
        _mm512_and_si512(shift_halves(qh, 4 * h + 1, 4 * h + 3), one), 4));
  }
}

// Half h of a Q6_K super-block `b`: its values 0..63 (`low`) and 64..127 (`high`),
// unsigned 0..63 (the format's value is q - 32). Value i < 64 of the half is the
// low nibble of ql[i] with bits (qh[i % 32] >> 2 (i / 32)) & 3 on top, value
// 64 + i the high nibble with (qh[i % 32] >> 4 + 2 (i / 32)) & 3
inline void q6_half(const uint8_t* b, int h, __m512i* low, __m512i* high) {
  const __m512i nibble = _mm512_set1_epi8(0x0F), three = _mm512_set1_epi8(3);
  const __m512i ql = _mm512_loadu_si512(b + 64 * h);
  const __m512i qh = _mm512_broadcast_i64x4(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
  *low = _mm512_or_si512(_mm512_and_si512(ql, nibble),
                         _mm512_slli_epi16(_mm512_and_si512(shift_halves(qh, 0, 2), three), 4));
  *high = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), nibble),
                          _mm512_slli_epi16(_mm512_and_si512(shift_halves(qh, 4, 6), three), 4));
}

template <int64_t Type, int R>
void dot_k_super(const uint8_t* row, const QuantizedRows& xq, int64_t m0, int64_t K, float* out) {
  constexpr int64_t bytes = Type == kQ4_K ? 144 : Type == kQ5_K ? 176 : 210;
  const int64_t chunks = K / kChunk;
  // two accumulators a row (even and odd products): the adds of one do not wait
  // for the other's
  __m512 acc[2][R];
  __m256 mins[R];
  for (int r = 0; r < R; ++r) {
    acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    mins[r] = _mm256_setzero_ps();
  }
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    const uint8_t* b = row + sb * bytes;
    for (int64_t line = 0; line < bytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(b) + kPrefetchBytes + line),
                   _MM_HINT_T1);
    if constexpr (Type == kQ4_K || Type == kQ5_K) {
      // sub-block j (values 32j..32j+31) = d * sc[j] * q - dmin * m[j]; its q are
      // the low nibbles of bytes 32(j/2).. for even j, the high ones for odd j
      alignas(16) uint8_t sc8[8], m8[8];
      k_scales_mins(b + 4, sc8, m8);
      const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(half_at(b)), eight_bytes_ps(sc8));
      const __m256 mn = _mm256_mul_ps(_mm256_set1_ps(half_at(b + 2)), eight_bytes_ps(m8));
      // per row: the 8 sub-blocks' scales times x's chunk scales, and the minimums
      // times x's chunk sums
      __m512 scale[R];
      for (int r = 0; r < R; ++r) {
        const int64_t at = (m0 + r) * chunks + sb * 8;
        scale[r] = _mm512_castps256_ps512(_mm256_mul_ps(sc, _mm256_loadu_ps(xq.d.data() + at)));
        mins[r] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(xq.sum.data() + at), mins[r]);
      }
      for (int h = 0; h < 2; ++h) {
        __m512i even, odd;
        k_half<Type>(b, h, &even, &odd);
        // lanes 0-7 take sub-block 4h (+1 for odd), lanes 8-15 sub-block 4h + 2 (+1)
        const __m512i pick_even = _mm512_inserti64x4(
            _mm512_set1_epi32(4 * h), _mm256_set1_epi32(4 * h + 2), 1);
        const __m512i pick_odd = _mm512_add_epi32(pick_even, _mm512_set1_epi32(1));
        for (int r = 0; r < R; ++r) {
          const int8_t* xs = xq.q_k.data() + (m0 + r) * K + sb * 256 + 128 * h;
          const __m512i ie = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(xs));
          const __m512i io = _mm512_dpbusd_epi32(_mm512_setzero_si512(), odd, _mm512_loadu_si512(xs + 64));
          acc[0][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ie), _mm512_permutexvar_ps(pick_even, scale[r]),
                                      acc[0][r]);
          acc[1][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(io), _mm512_permutexvar_ps(pick_odd, scale[r]),
                                      acc[1][r]);
        }
      }
    } else {
      // Q6_K: (q - 32) times its 16 values' own int8 scale
      const float d = half_at(b + 208);
      const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
      const __m512i c32 = _mm512_set1_epi8(32);
      // lane l of a 64-value product belongs to scale group l / 4
      const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
      for (int h = 0; h < 2; ++h) {
        __m512i v[2];
        q6_half(b, h, &v[0], &v[1]);
        __m512 group_scale[2];
        for (int k = 0; k < 2; ++k) {
          int32_t four;
          std::memcpy(&four, scales + 8 * h + 4 * k, 4);
          const __m128 s4 = _mm_mul_ps(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(four))),
                                       _mm_set1_ps(d));
          group_scale[k] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4));
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* xs = xq.q.data() + (m0 + r) * K + sb * 256 + 128 * h;
          const float* dx = xq.d.data() + (m0 + r) * chunks + sb * 8 + 4 * h;
          for (int k = 0; k < 2; ++k) {
            const __m512i x64 = _mm512_loadu_si512(xs + 64 * k);
            const __m512i dots = _mm512_sub_epi32(
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[k], x64),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), c32, x64));
            acc[k][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots),
                                        _mm512_mul_ps(group_scale[k], halves_ps(dx[2 * k], dx[2 * k + 1])),
                                        acc[k][r]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 m = mins[r];
    const __m128 m4 = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    const __m128 m2 = _mm_add_ps(m4, _mm_movehl_ps(m4, m4));
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]))
             - _mm_cvtss_f32(_mm_add_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
  }
}

// 16 values a time: bytes 16i..16i+15 of `v` (unsigned) times `scale` plus `shift`
template <typename T>
inline void store_quarter(T* at, __m512i v, int i, float scale, float shift) {
  const __m128i q16 = i == 0 ? _mm512_extracti32x4_epi32(v, 0) : i == 1 ? _mm512_extracti32x4_epi32(v, 1)
                    : i == 2 ? _mm512_extracti32x4_epi32(v, 2) : _mm512_extracti32x4_epi32(v, 3);
  store16_as(at, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q16)), _mm512_set1_ps(scale),
                                 _mm512_set1_ps(shift)));
}

// A K-quant row as floats (prompts dequantize every weight tile by tile, and the
// embedding its looked-up rows), decoded as dot_k_super decodes it: a
// super-block a step, 64 values a register. Every product d * scale * q is exact
// in float32 (at most 24 significant bits), so this equals the reference bit
// for bit, as dequantize_row_vec does.
template <int64_t Type, typename T>
void dequantize_row_k_super(const uint8_t* row, int64_t K, T* out) {
  constexpr int64_t bytes = Type == kQ4_K ? 144 : Type == kQ5_K ? 176 : 210;
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    const uint8_t* b = row + sb * bytes;
    T* o = out + sb * 256;
    if constexpr (Type == kQ4_K || Type == kQ5_K) {
      alignas(16) uint8_t sc8[8], m8[8];
      k_scales_mins(b + 4, sc8, m8);
      const float d = half_at(b), dmin = half_at(b + 2);
      for (int h = 0; h < 2; ++h) {
        __m512i even, odd;
        k_half<Type>(b, h, &even, &odd);
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          // bfloat16 out: the sub-block's 32 possible values rounded once into a
          // table, then one word permute looks 32 values up (the same numbers as
          // rounding each product: each entry is one)
          const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
          const __m512 iota16 = _mm512_add_ps(iota, _mm512_set1_ps(16.f));
          auto sub_block = [&](__m256i q32, int j) {
            const __m512 scale = _mm512_set1_ps(d * sc8[j]), shift = _mm512_set1_ps(-dmin * m8[j]);
            const __m512i table = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(
                _mm512_fmadd_ps(iota16, scale, shift), _mm512_fmadd_ps(iota, scale, shift)));
            _mm512_storeu_si512(o + 32 * j, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(q32), table));
          };
          sub_block(_mm512_castsi512_si256(even), 4 * h);
          sub_block(_mm512_castsi512_si256(odd), 4 * h + 1);
          sub_block(_mm512_extracti64x4_epi64(even, 1), 4 * h + 2);
          sub_block(_mm512_extracti64x4_epi64(odd, 1), 4 * h + 3);
          continue;
        }
#endif
        // quarter i of `even`: sub-block 4h (i < 2) or 4h + 2, values 16 (i % 2)..
        for (int i = 0; i < 4; ++i) {
          const int j = 4 * h + (i < 2 ? 0 : 2);
          store_quarter(o + 32 * j + 16 * (i % 2), even, i, d * sc8[j], -dmin * m8[j]);
          store_quarter(o + 32 * (j + 1) + 16 * (i % 2), odd, i, d * sc8[j + 1], -dmin * m8[j + 1]);
        }
      }
    } else {
      const float d = half_at(b + 208);
      const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
      for (int h = 0; h < 2; ++h) {
        __m512i v0, v1;
        q6_half(b, h, &v0, &v1);
        // 16 values a scale: (q - 32) * d * scale
        for (int i = 0; i < 4; ++i) {
          const float s0 = d * scales[8 * h + i], s1 = d * scales[8 * h + 4 + i];
          store_quarter(o + 128 * h + 16 * i, v0, i, s0, -32.f * s0);
          store_quarter(o + 128 * h + 64 + 16 * i, v1, i, s1, -32.f * s1);
        }
      }
    }
  }
}
#endif

// The offset of Q8_0 (stored +128), Q4_0 and Q5_0 as a whole number of scale
// steps (0: the format's own float16 minimum, Q4_1 Q5_1)
constexpr int32_t integer_offset(int64_t type) {
  return type == kQ8_0 ? -128 : type == kQ4_0 ? -8 : type == kQ5_0 ? -16 : 0;
}

// R activation rows against one interleaved group of 16 weight rows:
// out[r * 16 + l] = x row m0 + r . weight row l
using GroupKernel = void (*)(const uint8_t* group, const QuantizedRows& xq, int64_t m0, int64_t K,
                             float* out);

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define ENGINE_GGML_GROUPS 1
// block column `col` of a group: w[j] the values 4j..4j+3 of its 16 rows (unsigned
// bytes, one row a 32-bit lane), each row's value = d * q + offset
template <int64_t Type>
inline void decode_column(const uint8_t* col, __m512i* w, __m512* d, __m512* offset) {
  constexpr BlockParts p = block_parts(Type);
  const __m512i nibble = _mm512_set1_epi8(0x0F), fifth = _mm512_set1_epi32(0x10101010);
  if constexpr (Type == kQ8_0) {
    for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(col + p.col_qs + 64 * j);
  } else {
    for (int j = 0; j < 4; ++j) {
      const __m512i b = _mm512_loadu_si512(col + p.col_qs + 64 * j);
      w[j] = _mm512_and_si512(b, nibble);
      w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
    }
    if constexpr (p.col_qh >= 0) {
      const __m512i qh = _mm512_loadu_si512(col + p.col_qh);
      for (int j = 0; j < 8; ++j) {
        const __m512i bits = j < 4 ? _mm512_slli_epi32(qh, 4 - j) : _mm512_srli_epi32(qh, j - 4);
        w[j] = _mm512_or_si512(w[j], _mm512_and_si512(bits, fifth));
      }
    }
  }
  *d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(col)));
  if constexpr (p.col_min >= 0)
    *offset = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + p.col_min)));
  else
    *offset = _mm512_mul_ps(*d, _mm512_set1_ps(Type == kQ4_0 ? -8.f : Type == kQ5_0 ? -16.f : -128.f));
}

// R activation rows against one interleaved group of 16 weight rows (see
// "interleaved groups"): out[r * 16 + l] = x row m0 + r . weight row l
template <int64_t Type, int R>
void group_dot(const uint8_t* group, const QuantizedRows& xq, int64_t m0, int64_t K, float* out) {
  constexpr BlockParts p = block_parts(Type);
  constexpr int64_t column_bytes = kGroup * p.bytes;
  constexpr int32_t steps = integer_offset(Type);
  const int64_t chunks = K / kChunk;
  __m512 acc[R], off[R];
  for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* col = group + c * column_bytes;
    // the lines of the column kPrefetchBytes ahead (past the weight's end: a
    // prefetch never faults)
    for (int64_t line = 0; line < column_bytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(col) + kPrefetchBytes + line),
                   _MM_HINT_T1);
    __m512i w[8];  // w[j]: values 4j..4j+3 of the 16 rows, unsigned
    __m512 d, offset;  // value = d * q + offset, per row
    decode_column<Type>(col, w, &d, &offset);
    for (int r = 0; r < R; ++r) {
      const int8_t* xs = xq.q.data() + (m0 + r) * K + c * kChunk;
      const int64_t at = (m0 + r) * chunks + c;
      int32_t x4[8];
      std::memcpy(x4, xs, sizeof(x4));
      // two chains of four: the second does not wait for the first. An integer
      // offset starts the first: offset * sum(q of x), exact
      __m512i s0 = steps ? _mm512_set1_epi32(steps * xq.qsum[at]) : _mm512_setzero_si512();
      s0 = _mm512_dpbusd_epi32(s0, w[0], _mm512_set1_epi32(x4[0]));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_set1_epi32(x4[1]));
      for (int j = 2; j < 8; j += 2) {
        s0 = _mm512_dpbusd_epi32(s0, w[j], _mm512_set1_epi32(x4[j]));
        s1 = _mm512_dpbusd_epi32(s1, w[j + 1], _mm512_set1_epi32(x4[j + 1]));
      }
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)),
                               _mm512_mul_ps(d, _mm512_set1_ps(xq.d[at])), acc[r]);
      if constexpr (!steps) off[r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xq.sum[at]), off[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * kGroup, _mm512_add_ps(acc[r], off[r]));
}

#if defined(__AVX512BF16__)
#define ENGINE_GGML_GROUP_DEQUANTIZE 1
// the 16 rows of one interleaved group as floats (out: row l at out + l * K):
// each 16 bytes of a column's w[j] are 4 values of 4 rows, widened, scaled by
// their rows' d and offset, and stored 4 values to a row (prompts dequantize
// every weight this way, tile by tile)
template <int64_t Type, typename T>
void dequantize_group(const uint8_t* group, int64_t K, T* out) {
  constexpr int64_t column_bytes = kGroup * block_parts(Type).bytes;
  __m512i quarter_rows[4];  // lane i -> row 4q + i / 4
  for (int q = 0; q < 4; ++q)
    quarter_rows[q] = _mm512_add_epi32(_mm512_set1_epi32(4 * q),
                                       _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8,
                                                                           9, 10, 11, 12, 13, 14, 15), 2));
  for (int64_t c = 0; c < K / kChunk; ++c) {
    __m512i w[8];
    __m512 d, offset;
    decode_column<Type>(group + c * column_bytes, w, &d, &offset);
    __m512 scale[4], shift[4];
    for (int q = 0; q < 4; ++q) {
      scale[q] = _mm512_permutexvar_ps(quarter_rows[q], d);
      shift[q] = _mm512_permutexvar_ps(quarter_rows[q], offset);
    }
    // the column's 16 rows x 32 values go to `column` first (row stride kChunk),
    // then out a row's 32 values at a time: stored 4 values at a time straight
    // into rows K apart, the 16 rows' lines share one L1 set when K is a multiple
    // of 2,048 (the 4,096-wide layers) and are evicted between partial writes
    // (3.2x the time of the same dequantization at K = 1,024)
    alignas(64) T column[kGroup * kChunk];
    constexpr int64_t ld = kChunk;
    for (int j = 0; j < 8; ++j)
      for (int q = 0; q < 4; ++q) {
        const __m512 v = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(w[j], q))), scale[q], shift[q]);
        T* at = column + (4 * q) * ld + 4 * j;
        if constexpr (std::is_same_v<T, float>) {
          _mm_store_ps(at, _mm512_castps512_ps128(v));
          _mm_store_ps(at + ld, _mm512_extractf32x4_ps(v, 1));
          _mm_store_ps(at + 2 * ld, _mm512_extractf32x4_ps(v, 2));
          _mm_store_ps(at + 3 * ld, _mm512_extractf32x4_ps(v, 3));
        } else {
          // round to nearest even, as torch's float32 -> bfloat16
          const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
          const __m128i lo = _mm256_castsi256_si128(h), hi = _mm256_extracti128_si256(h, 1);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(at), lo);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(at + ld), _mm_unpackhi_epi64(lo, lo));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(at + 2 * ld), hi);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(at + 3 * ld), _mm_unpackhi_epi64(hi, hi));
        }
      }
    for (int64_t r = 0; r < kGroup; ++r)
      std::memcpy(out + r * K + c * kChunk, column + r * ld, kChunk * sizeof(T));
  }
}

template <typename T>
void dequantize_group(int64_t type, const uint8_t* group, int64_t K, T* out) {
  switch (type) {
    case kQ4_0: return dequantize_group<kQ4_0, T>(group, K, out);
    case kQ4_1: return dequantize_group<kQ4_1, T>(group, K, out);
    case kQ5_0: return dequantize_group<kQ5_0, T>(group, K, out);
    case kQ5_1: return dequantize_group<kQ5_1, T>(group, K, out);
    case kQ8_0: return dequantize_group<kQ8_0, T>(group, K, out);
    default: TORCH_CHECK(false, "ggml type ", type, " has no interleaved layout");
  }
}
#endif

template <int64_t Type>
void group_kernels_for(GroupKernel* fn) {
  fn[0] = group_dot<Type, 1>;
  fn[1] = group_dot<Type, 2>;
  fn[2] = group_dot<Type, 3>;
  fn[3] = group_dot<Type, 4>;
}

// the group kernels of `type` by rows per pass (1..kMaxRowsPerPass)
void group_kernels(int64_t type, GroupKernel* fn) {
  switch (type) {
    case kQ4_0: return group_kernels_for<kQ4_0>(fn);
    case kQ4_1: return group_kernels_for<kQ4_1>(fn);
    case kQ5_0: return group_kernels_for<kQ5_0>(fn);
    case kQ5_1: return group_kernels_for<kQ5_1>(fn);
    case kQ8_0: return group_kernels_for<kQ8_0>(fn);
    default: TORCH_CHECK(false, "ggml type ", type, " has no interleaved layout");
  }
}
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define ENGINE_GGML_GROUPS_AVX2 1
// The interleaved groups on 256-bit registers (the avx2 path: CPUs without
// AVX512-VNNI). A 64-byte run of a block column is two halves of 8 rows (bytes
// 0-31: rows 0-7, 32-63: rows 8-15); a group is taken one half at a time over
// the whole row, the second half coming back from L1/L2. There is no vpdpbusd:
// vpmaddubsw multiplies unsigned weight bytes by signed x bytes into 16-bit
// pair sums, vpmaddwd adds pairs of those into the 32-bit lanes. Values of at
// most 31 (the 4- and 5-bit formats) keep four runs' pair sums below 2^15
// (4 x 2 x 31 x 127 = 31,496), so four runs add in 16 bits before one
// vpmaddwd. Q8_0's values (stored plus 128) would overflow a pair: they are made
// signed again and multiplied as |w| times x with w's sign, a run at a time.
template <int64_t Type>
inline void decode_half_column(const uint8_t* col, int half, __m256i* w, __m256* d,
                               __m256* minimum) {
  constexpr BlockParts p = block_parts(Type);
  auto at = [&](int64_t offset) { return reinterpret_cast<const __m256i*>(col + offset + 32 * half); };
  if constexpr (Type == kQ8_0) {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int j = 0; j < 8; ++j) w[j] = _mm256_xor_si256(_mm256_loadu_si256(at(p.col_qs + 64 * j)), flip);
  } else {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {
      const __m256i b = _mm256_loadu_si256(at(p.col_qs + 64 * j));
      w[j] = _mm256_and_si256(b, nibble);
      w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
    }
    if constexpr (p.col_qh >= 0) {
      const __m256i qh = _mm256_loadu_si256(at(p.col_qh)), fifth = _mm256_set1_epi32(0x10101010);
      for (int j = 0; j < 8; ++j) {
        const __m256i bits = j < 4 ? _mm256_slli_epi32(qh, 4 - j) : _mm256_srli_epi32(qh, j - 4);
        w[j] = _mm256_or_si256(w[j], _mm256_and_si256(bits, fifth));
      }
    }
  }
  *d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col + 16 * half)));
  if constexpr (p.col_min >= 0)
    *minimum = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col + p.col_min + 16 * half)));
}

template <int64_t Type, int R>
void group_dot_avx2(const uint8_t* group, const QuantizedRows& xq, int64_t m0, int64_t K, float* out) {
  constexpr BlockParts p = block_parts(Type);
  constexpr int64_t column_bytes = kGroup * p.bytes;
  constexpr bool kSigned = Type == kQ8_0;
  constexpr bool kMinimum = p.col_min >= 0;
  constexpr int32_t steps = kSigned ? 0 : integer_offset(Type);  // Q4_0: -8, Q5_0: -16
  const int64_t chunks = K / kChunk;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const uint8_t* col = group + c * column_bytes;
      if (half == 0)  // the first pass reads the group from memory: ask ahead
        for (int64_t line = 0; line < column_bytes; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(col) + kPrefetchBytes + line),
                       _MM_HINT_T1);
      __m256i w[8];  // w[j]: values 4j..4j+3 of the half's 8 rows
      __m256 d, minimum = _mm256_setzero_ps();
      decode_half_column<Type>(col, half, w, &d, &minimum);
      for (int r = 0; r < R; ++r) {
        const int8_t* xs = xq.q.data() + (m0 + r) * K + c * kChunk;
        const int64_t at = (m0 + r) * chunks + c;
        int32_t x4[8];
        std::memcpy(x4, xs, sizeof(x4));
        __m256i sum;
        if constexpr (kSigned) {
          // |w| (unsigned; -128 becomes 128) times x with w's sign: pairs stay in 16 bits
          auto run = [&](int j) {
            return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w[j], w[j]),
                                                          _mm256_sign_epi8(_mm256_set1_epi32(x4[j]), w[j])),
                                     ones);
          };
          sum = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(run(0), run(1)), _mm256_add_epi32(run(2), run(3))),
                                 _mm256_add_epi32(_mm256_add_epi32(run(4), run(5)), _mm256_add_epi32(run(6), run(7))));
        } else {
          auto run = [&](int j) { return _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(x4[j])); };
          const __m256i lo = _mm256_add_epi16(_mm256_add_epi16(run(0), run(1)), _mm256_add_epi16(run(2), run(3)));
          const __m256i hi = _mm256_add_epi16(_mm256_add_epi16(run(4), run(5)), _mm256_add_epi16(run(6), run(7)));
          sum = _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones));
          // an offset of whole scale steps: offset * sum(q of x), exact
          if constexpr (steps != 0) sum = _mm256_add_epi32(sum, _mm256_set1_epi32(steps * xq.qsum[at]));
        }
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, _mm256_set1_ps(xq.d[at])), acc[r]);
        if constexpr (kMinimum) acc[r] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(xq.sum[at]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * kGroup + 8 * half, acc[r]);
  }
}

template <int64_t Type>
void group_kernels_avx2_for(GroupKernel* fn) {
  fn[0] = group_dot_avx2<Type, 1>;
  fn[1] = group_dot_avx2<Type, 2>;
  fn[2] = group_dot_avx2<Type, 3>;
  fn[3] = group_dot_avx2<Type, 4>;
}

void group_kernels_avx2(int64_t type, GroupKernel* fn) {
  switch (type) {
    case kQ4_0: return group_kernels_avx2_for<kQ4_0>(fn);
    case kQ4_1: return group_kernels_avx2_for<kQ4_1>(fn);
    case kQ5_0: return group_kernels_avx2_for<kQ5_0>(fn);
    case kQ5_1: return group_kernels_avx2_for<kQ5_1>(fn);
    case kQ8_0: return group_kernels_avx2_for<kQ8_0>(fn);
    default: TORCH_CHECK(false, "ggml type ", type, " has no interleaved layout");
  }
}
#endif

// a row decoded to floats with the vector decoder: the prefill path dequantizes
// every weight once per prompt chunk, so this runs over the whole model per chunk
template <int64_t Type, typename T>
void dequantize_row_vec(const uint8_t* row, int64_t K, T* out) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // 16 values a register: widen, scale, offset, narrow in one pass
  VecChunk c512;
  for (int64_t c = 0; c < K / kChunk; ++c) {
    decode_vec<Type>(row, c, &c512);
    const __m512 offset = _mm512_set1_ps(c512.offset);
    const __m512 s0 = _mm512_set1_ps(_mm256_cvtss_f32(c512.scale));
    const __m512 s1 = _mm512_set1_ps(_mm_cvtss_f32(_mm256_extractf128_ps(c512.scale, 1)));
    // q < 128 in every format, so the bytes widen as signed
    const __m512 lo = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c512.q))), s0, offset);
    const __m512 hi = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c512.q, 1))), s1, offset);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(out + c * kChunk, lo);
      _mm512_storeu_ps(out + c * kChunk + 16, hi);
    } else {
#if defined(__AVX512BF16__)
      // round to nearest even, as torch's float32 -> bfloat16
      _mm512_storeu_si512(out + c * kChunk, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
#else
      engine_kernels::store(out + c * kChunk, reinterpret_cast<engine_kernels::vf>(lo));
      engine_kernels::store(out + c * kChunk + 16, reinterpret_cast<engine_kernels::vf>(hi));
#endif
    }
  }
  return;
#endif
  VecChunk ch;
  alignas(64) float tmp[kChunk];
  for (int64_t c = 0; c < K / kChunk; ++c) {
    decode_vec<Type>(row, c, &ch);
    const __m256 offset = _mm256_set1_ps(ch.offset);
    const __m256 s0 = _mm256_permutevar8x32_ps(ch.scale, _mm256_setzero_si256());
    const __m256 s1 = _mm256_permutevar8x32_ps(ch.scale, _mm256_set1_epi32(4));
    const __m128i lo = _mm256_castsi256_si128(ch.q), hi = _mm256_extracti128_si256(ch.q, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int p = 0; p < 4; ++p) {
      // q < 128 in every format, so the bytes widen as signed
      const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[p]));
      _mm256_store_ps(tmp + 8 * p, _mm256_fmadd_ps(v, p < 2 ? s0 : s1, offset));
    }
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(out + c * kChunk, tmp, sizeof(tmp));
    } else {
      for (int h = 0; h < 2; ++h) engine_kernels::store(out + c * kChunk + 16 * h, engine_kernels::load(tmp + 16 * h));
    }
  }
}
#endif

// the dot products of rows m0..m0+R of x with one weight row: out[0..R)
template <typename T>
using RowKernel = void (*)(const uint8_t* row, const T* x, const QuantizedRows& xq, int64_t m0,
                           int64_t K, float* out);

// one kernel per rows-per-pass count (1..kMaxRowsPerPass), for one type and path
template <typename T>
struct RowKernels {
  RowKernel<T> fn[kMaxRowsPerPass];
};

template <typename T, int64_t Type, int64_t P>
RowKernels<T> kernels_for() {
  RowKernels<T> k;
  auto set = [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    k.fn[R - 1] = [](const uint8_t* row, const T* x, const QuantizedRows& xq, int64_t m0,
                     int64_t K, float* out) {
#if defined(__AVX2__)
      if constexpr (P == kAvx2 && k_super_kernel(Type)) return dot_k_super_avx2<Type, R>(row, xq, m0, K, out);
      if constexpr (P == kAvx2) return dot_vec<Type, false, R>(row, xq, m0, K, out);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#if defined(ENGINE_GGML_PAIRS)
      if constexpr (P == kVnni && pairs_kernel(Type)) return dot_pairs<Type, R>(row, xq, m0, K, out);
      if constexpr (P == kVnni && k_super_kernel(Type)) return dot_k_super<Type, R>(row, xq, m0, K, out);
#endif
      if constexpr (P == kVnni) return dot_vec<Type, true, R>(row, xq, m0, K, out);
#endif
#endif
      if constexpr (P == kPortable) return dot_portable<R>(Type, row, xq, m0, K, out);
      dot_float<T, R>(Type, row, x + m0 * K, K, out);
    };
  };
  set(std::integral_constant<int, 1>{});
  set(std::integral_constant<int, 2>{});
  set(std::integral_constant<int, 3>{});
  set(std::integral_constant<int, 4>{});
  return k;
}

template <typename T, int64_t P>
RowKernels<T> kernels_for_path(int64_t type) {
  switch (type) {
    case kQ4_0: return kernels_for<T, kQ4_0, P>();
    case kQ4_1: return kernels_for<T, kQ4_1, P>();
    case kQ5_0: return kernels_for<T, kQ5_0, P>();
    case kQ5_1: return kernels_for<T, kQ5_1, P>();
    case kQ8_0: return kernels_for<T, kQ8_0, P>();
    case kQ4_K: return kernels_for<T, kQ4_K, P>();
    case kQ5_K: return kernels_for<T, kQ5_K, P>();
    case kQ6_K: return kernels_for<T, kQ6_K, P>();
    default: TORCH_CHECK(false, "ggml type ", type, " is not supported by the quantized kernels");
  }
}

template <typename T>
RowKernels<T> row_kernels(int64_t path, int64_t type) {
  switch (path) {
    case kAvx2: return kernels_for_path<T, kAvx2>(type);
    case kVnni: return kernels_for_path<T, kVnni>(type);
    case kPortable: return kernels_for_path<T, kPortable>(type);
    default: return kernels_for_path<T, kFloat>(type);
  }
}

template <typename T>
void store_row_outputs(T* op, int64_t out_stride, int64_t m0, int64_t rows, int64_t n,
                       int64_t width, const float* dots, int64_t dots_stride, const T* b) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t l = 0; l < width; ++l) {
      float v = dots[r * dots_stride + l];
      if (b) v += static_cast<float>(b[n + l]);
      op[(m0 + r) * out_stride + n + l] = static_cast<T>(v);
    }
}

#if defined(ENGINE_GGML_GROUPS)
// store_row_outputs for the 16 rows of one group, 16 lanes at a time (the LM
// head alone has thousands of groups a step)
template <typename T>
void store_group_outputs(T* op, int64_t out_stride, int64_t m0, int64_t rows, int64_t n,
                         const float* dots, const T* b) {
  const __m512 bias = b ? load16(b + n) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    store16_as(op + (m0 + r) * out_stride + n,
               _mm512_add_ps(_mm512_loadu_ps(dots + r * kGroup), bias));
  }
}
#endif

template <typename T>
void linear_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& blocks, int64_t type,
                 const c10::optional<at::Tensor>& bias, int64_t path, bool interleaved) {
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0);
  const int64_t out_stride = out.stride(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1);
  const T* b = bias.has_value() && bias->defined() ? bias->data_ptr<T>() : nullptr;
  // reused across calls (a decode step makes hundreds); a plain reference, so
  // that the worker threads below read this thread's copy, not their own
  thread_local QuantizedRows reused;
  QuantizedRows& xq = reused;
  if (path != kFloat) quantize_rows(xp, M, K, &xq);
#if defined(ENGINE_GGML_PAIRS)
  if (path == kVnni && (type == kQ4_K || type == kQ5_K)) arrange_for_k_super(&xq, M, K);
#endif
  const RowKernels<T> kernels = row_kernels<T>(path, type);
  const int64_t groups = interleaved ? N / kGroup : 0;
  GroupKernel group_fn[kMaxRowsPerPass] = {};
  bool wide_groups = false;  // 512-bit kernels: their outputs stored 16 lanes at a time
#if defined(ENGINE_GGML_GROUPS)
  if (groups > 0 && path == kVnni) {
    group_kernels(type, group_fn);
    wide_groups = true;
  }
#endif
#if defined(ENGINE_GGML_GROUPS_AVX2)
  if (groups > 0 && path == kAvx2) group_kernels_avx2(type, group_fn);
#endif
  const bool by_groups = group_fn[0] != nullptr;
  (void)wide_groups;  // read only where the 512-bit kernels are compiled in
  if (by_groups) {
    // whole groups split across threads: each streams one contiguous range
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float dots[kMaxRowsPerPass * kGroup];
      for (int64_t g = begin; g < end; ++g)
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerPass) {
          const int64_t rows = std::min(kMaxRowsPerPass, M - m0);
          group_fn[rows - 1](w + g * kGroup * row_bytes, xq, m0, K, dots);
#if defined(ENGINE_GGML_GROUPS)
          if (wide_groups) {
            store_group_outputs(op, out_stride, m0, rows, g * kGroup, dots, b);
            continue;
          }
#endif
          store_row_outputs(op, out_stride, m0, rows, g * kGroup, kGroup, dots, kGroup, b);
        }
    });
  }
  const int64_t first_row = by_groups ? groups * kGroup : 0;
  // other paths read an interleaved weight one row at a time, rebuilt as the file has it
  at::parallel_for(first_row, N, 16, [&](int64_t begin, int64_t end) {
    float dots[kMaxRowsPerPass];
    std::vector<uint8_t> scratch(interleaved ? row_bytes : 0);
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = file_row(w, n, N, row_bytes, type, interleaved, scratch.data());
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerPass) {
        const int64_t rows = std::min(kMaxRowsPerPass, M - m0);
        kernels.fn[rows - 1](row, xp, xq, m0, K, dots);
        store_row_outputs(op, out_stride, m0, rows, n, 1, dots, 1, b);
      }
    }
  });
}

void check_blocks(const at::Tensor& blocks, int64_t type, int64_t K, bool interleaved = false) {
  const Format f = format_of(type);
  TORCH_CHECK(!interleaved || interleavable(type), "ggml type ", type, " has no interleaved layout");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous(),
              "blocks must be a contiguous uint8 [N, row_bytes]");
  TORCH_CHECK(K % f.block_values == 0, "K = ", K, " is not a multiple of the block size ",
              f.block_values);
  TORCH_CHECK(blocks.size(1) == K / f.block_values * f.block_bytes, "blocks hold ",
              blocks.size(1), " bytes per row; K = ", K, " needs ", K / f.block_values * f.block_bytes);
}

void ggml_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& blocks, int64_t type,
                 const c10::optional<at::Tensor>& bias, int64_t path, bool interleaved) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2, "x and out must be 2-D");
  TORCH_CHECK(x.is_contiguous() && out.stride(1) == 1, "x must be contiguous, out rows dense");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "x and out must have one dtype");
  check_blocks(blocks, type, x.size(1), interleaved);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == blocks.size(0), "out must be [",
              x.size(0), ", ", blocks.size(0), "]");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == blocks.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(), "bias must be a contiguous [N] of x's dtype");
  TORCH_CHECK(path >= kFloat && path <= kVnni, "path must be 0..3");
  if (x.scalar_type() == at::kFloat)
    linear_impl<float>(out, x, blocks, type, bias, path, interleaved);
  else if (x.scalar_type() == at::kBFloat16)
    linear_impl<c10::BFloat16>(out, x, blocks, type, bias, path, interleaved);
  else
    TORCH_CHECK(false, "ggml_linear: float32 or bfloat16 activations only");
}

// the vector decoder where compiled in (AVX2), else the portable one
template <typename T>
void dequantize_row_best(int64_t type, const uint8_t* row, int64_t K, T* out) {
#if defined(__AVX2__)
  switch (type) {
    case kQ4_0: return dequantize_row_vec<kQ4_0>(row, K, out);
    case kQ4_1: return dequantize_row_vec<kQ4_1>(row, K, out);
    case kQ5_0: return dequantize_row_vec<kQ5_0>(row, K, out);
    case kQ5_1: return dequantize_row_vec<kQ5_1>(row, K, out);
    case kQ8_0: return dequantize_row_vec<kQ8_0>(row, K, out);
#if defined(ENGINE_GGML_PAIRS)
    case kQ4_K: return dequantize_row_k_super<kQ4_K>(row, K, out);
    case kQ5_K: return dequantize_row_k_super<kQ5_K>(row, K, out);
    case kQ6_K: return dequantize_row_k_super<kQ6_K>(row, K, out);
#else
    case kQ4_K: return dequantize_row_vec<kQ4_K>(row, K, out);
    case kQ5_K: return dequantize_row_vec<kQ5_K>(row, K, out);
    case kQ6_K: return dequantize_row_vec<kQ6_K>(row, K, out);
#endif
    default: TORCH_CHECK(false, "ggml type ", type, " is not supported by the quantized kernels");
  }
#else
  dequantize_row(type, row, K, out);
#endif
}

template <typename T>
void dequantize_impl(at::Tensor& out, const at::Tensor& blocks, int64_t type, bool interleaved) {
  const int64_t N = blocks.size(0), K = out.size(1), row_bytes = blocks.size(1);
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  T* o = out.data_ptr<T>();
#if defined(ENGINE_GGML_GROUP_DEQUANTIZE)
  if (interleaved) {  // whole groups at once, then the rows past the last one
    const int64_t groups = N / kGroup;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g)
        dequantize_group(type, w + g * kGroup * row_bytes, K, o + g * kGroup * K);
    });
    for (int64_t n = groups * kGroup; n < N; ++n) dequantize_row_best(type, w + n * row_bytes, K, o + n * K);
    return;
  }
#endif
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> scratch(interleaved ? row_bytes : 0);
    for (int64_t n = begin; n < end; ++n)
      dequantize_row_best(type, file_row(w, n, N, row_bytes, type, interleaved, scratch.data()), K,
                          o + n * K);
  });
}

void ggml_dequantize(at::Tensor out, const at::Tensor& blocks, int64_t type, bool interleaved) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == blocks.size(0),
              "out must be a contiguous [N, K]");
  check_blocks(blocks, type, out.size(1), interleaved);
  if (out.scalar_type() == at::kFloat)
    dequantize_impl<float>(out, blocks, type, interleaved);
  else if (out.scalar_type() == at::kBFloat16)
    dequantize_impl<c10::BFloat16>(out, blocks, type, interleaved);
  else
    TORCH_CHECK(false, "ggml_dequantize: float32 or bfloat16 out only");
}

// out = x @ W.T + bias for many rows (prompts): the weight dequantized a tile of
// rows at a time into one small buffer that stays in cache, each tile multiplied
// by ATen's dense matmul straight into its columns of out. The whole float weight
// is never allocated.
void ggml_matmul(at::Tensor out, const at::Tensor& x, const at::Tensor& blocks, int64_t type,
                 const c10::optional<at::Tensor>& bias, int64_t tile_bytes, bool interleaved) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2, "x and out must be 2-D");
  TORCH_CHECK(out.stride(1) == 1, "out rows must be dense");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "x and out must have one dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "ggml_matmul: float32 or bfloat16 activations only");
  const int64_t K = x.size(1), N = blocks.size(0);
  check_blocks(blocks, type, K, interleaved);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == N, "out must be [", x.size(0), ", ", N, "]");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type(),
                "bias must be a [N] of x's dtype");
  // tiles of equal size, whole groups of an interleaved weight each (kGroup
  // divides 16): a remainder tile of a few rows would be a poor matmul
  const int64_t most = std::max<int64_t>(16, tile_bytes / (K * x.element_size()) / 16 * 16);
  const int64_t tiles = (N + most - 1) / most;
  const int64_t rows = ((N + tiles - 1) / tiles + 15) / 16 * 16;
  at::Tensor tile = at::empty({std::min(rows, N), K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    at::Tensor t = tile.narrow(0, 0, n);
    at::Tensor part = blocks.narrow(0, n0, n);
    ggml_dequantize(t, part, type, interleaved);
    at::Tensor o = out.narrow(1, n0, n);
    if (has_bias)
      at::addmm_out(o, bias->narrow(0, n0, n), x, t.t());  // bias added before rounding, as F.linear
    else
      at::mm_out(o, x, t.t());
  }
}

void ggml_embedding(at::Tensor out, const at::Tensor& ids, const at::Tensor& blocks, int64_t type,
                    bool interleaved) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "ids must be a contiguous int64 [T]");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == ids.size(0),
              "out must be a contiguous [T, K]");
  check_blocks(blocks, type, out.size(1), interleaved);
  const int64_t N = blocks.size(0), K = out.size(1), row_bytes = blocks.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < ids.size(0); ++t)
    TORCH_CHECK(id[t] >= 0 && id[t] < N, "token id ", id[t], " is outside the table of ", N, " rows");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "ggml_embedding: float32 or bfloat16 out only");
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  at::parallel_for(0, ids.size(0), 8, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> scratch(interleaved ? row_bytes : 0);
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* row = file_row(w, id[t], N, row_bytes, type, interleaved, scratch.data());
      if (out.scalar_type() == at::kFloat)
        dequantize_row_best(type, row, K, out.data_ptr<float>() + t * K);
      else
        dequantize_row_best(type, row, K, out.data_ptr<c10::BFloat16>() + t * K);
    }
  });
}

// `blocks` as the file stores them -> interleaved groups (or back, `undo`), same
// shape; `out` may be `blocks` itself (a group at a time through a small copy),
// so that repacking at load needs no second copy of the weight
void ggml_interleave(at::Tensor out, const at::Tensor& blocks, int64_t type, bool undo) {
  TORCH_CHECK(interleavable(type), "ggml type ", type, " has no interleaved layout");
  const int64_t bytes = block_parts(type).bytes;
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.size(1) % bytes == 0, "blocks must be a contiguous uint8 [N, row_bytes]");
  TORCH_CHECK(out.sizes() == blocks.sizes() && out.scalar_type() == at::kByte && out.is_contiguous(),
              "out must be a contiguous uint8 tensor of the blocks' shape");
  const int64_t N = blocks.size(0), row_bytes = blocks.size(1), whole = N / kGroup * kGroup;
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / kGroup, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> copy(kGroup * row_bytes);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t at = g * kGroup * row_bytes;
      std::memcpy(copy.data(), src + at, copy.size());
      for (int64_t l = 0; l < kGroup; ++l) {
        if (undo) move_row<true>(type, dst + at + l * row_bytes, copy.data(), row_bytes, l);
        else move_row<false>(type, copy.data() + l * row_bytes, dst + at, row_bytes, l);
      }
    }
  });
  if (dst != src) std::memcpy(dst + whole * row_bytes, src + whole * row_bytes, (N - whole) * row_bytes);
}

// ggml_compiled_paths' bit for the avx2 path's kernels of interleaved groups
constexpr int64_t kAvx2GroupsBit = 8;

int64_t ggml_compiled_paths() {
  int64_t paths = (1 << kFloat) | (1 << kPortable);
#if defined(ENGINE_GGML_GROUPS_AVX2)
  paths |= int64_t{1} << kAvx2GroupsBit;
#endif
#if defined(__AVX2__)
  paths |= 1 << kAvx2;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  paths |= 1 << kVnni;
#endif
#endif
  return paths;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine_kernels, m) {
  m.def("ggml_linear(Tensor(a!) out, Tensor x, Tensor blocks, int type, Tensor? bias, int path, "
        "bool interleaved=False) -> ()");
  m.def("ggml_dequantize(Tensor(a!) out, Tensor blocks, int type, bool interleaved=False) -> ()");
  m.def("ggml_matmul(Tensor(a!) out, Tensor x, Tensor blocks, int type, Tensor? bias, int tile_bytes, "
        "bool interleaved=False) -> ()");
  m.def("ggml_embedding(Tensor(a!) out, Tensor ids, Tensor blocks, int type, bool interleaved=False) -> ()");
  m.def("ggml_interleave(Tensor(a!) out, Tensor blocks, int type, bool undo=False) -> ()");
  m.def("ggml_compiled_paths() -> int");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("ggml_linear", &ggml_linear);
  m.impl("ggml_dequantize", &ggml_dequantize);
  m.impl("ggml_matmul", &ggml_matmul);
  m.impl("ggml_embedding", &ggml_embedding);
  m.impl("ggml_interleave", &ggml_interleave);
}

TORCH_LIBRARY_IMPL(engine_kernels, CompositeExplicitAutograd, m) {
  m.impl("ggml_compiled_paths", &ggml_compiled_paths);
}
