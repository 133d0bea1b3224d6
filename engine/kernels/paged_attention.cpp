// Decode attention straight from the paged KV cache: each decoding sequence's
// single query row attends over its context, reading K/V block by block through
// its block table (no gathered copy of the context).
//
// engine_kernels::paged_decode_attention(out, query, kv_cache, block_tables,
//     seq_lens, query_start_loc, decode_seqs, scale)
//   query, out:       [T, H, D]   the step's rows; only the decode rows are written
//   kv_cache:         [2, num_blocks, block_size, Hkv, D]
//   block_tables:     [S, max_blocks] int64, seq_lens [S] int64,
//   query_start_loc:  [S + 1] int64 (sequence s's decode row is query_start_loc[s])
//   decode_seqs:      [n] int64, the sequences to compute
// Scores, softmax and the weighted sum are accumulated in float32.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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
// (blocks are scattered: the hardware prefetcher cannot guess the next one), a row
// per token so that few requests are in flight at once.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

// One sequence, every head: its query row against its whole context, reading each
// cache block once and in order (a block is [block_size, Hkv, D], contiguous), for
// head sizes that are a multiple of 16 (NC chunks of 16 lanes). Buffers:
// `qbuf` H * D floats, `acc` H * D floats, `scores` H * len floats.
template <typename scalar_t, int NC>
void decode_seq(const scalar_t* q_row, scalar_t* o_row, const scalar_t* k_base,
                const scalar_t* v_base, const int64_t* table, int64_t len, int64_t block_size,
                int64_t cache_stride, int64_t token_stride, int64_t Hkv, int64_t G, float scale,
                float* qbuf, float* acc, float* scores) {
  constexpr int64_t D = NC * kLanes;
  const int64_t H = Hkv * G;
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  const int64_t row_bytes = token_stride * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t h = 0; h < H; ++h)
    for (int c = 0; c < NC; ++c) store(qbuf + h * D + c * kLanes, load(q_row + h * D + c * kLanes) * scale);
  // scores[h * len + t] = (scale q_h) . k_t
  for (int64_t b = 0; b < num_blocks; ++b) {
    const scalar_t* block = k_base + table[b] * cache_stride;
    const scalar_t* next = k_base + table[b + 1 < num_blocks ? b + 1 : b] * cache_stride;
    const int64_t t0 = b * block_size, t_end = std::min(len, t0 + block_size);
    for (int64_t t = t0; t < t_end; ++t) {
      const scalar_t* row = block + (t - t0) * token_stride;
      prefetch_row(next + (t - t0) * token_stride, row_bytes);
      for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
        vf kc[NC];
        for (int c = 0; c < NC; ++c) kc[c] = load(row + kvh * D + c * kLanes);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = kvh * G + g;
          const float* qh = qbuf + h * D;
          vf a = load(qh) * kc[0];
          for (int c = 1; c < NC; ++c) a += load(qh + c * kLanes) * kc[c];
          scores[h * len + t] = hsum(a);
        }
      }
    }
  }
  // softmax per head; scores become probabilities times the head's sum
  const int64_t vec_end = len - len % kLanes;
  for (int64_t h = 0; h < H; ++h) {
    float* sh = scores + h * len;
    float mx = -INFINITY;
    if (vec_end) {
      vf m = load(sh);
      for (int64_t t = kLanes; t < vec_end; t += kLanes) m = vmax(m, load(sh + t));
      mx = hmax(m);
    }
    for (int64_t t = vec_end; t < len; ++t) mx = sh[t] > mx ? sh[t] : mx;
    vf vsum = splat(0.f);
    for (int64_t t = 0; t < vec_end; t += kLanes) {
      vf e = exp_approx(load(sh + t) - mx);
      store(sh + t, e);
      vsum += e;
    }
    float sum = hsum(vsum);
    for (int64_t t = vec_end; t < len; ++t) {
      sh[t] = exp_approx(sh[t] - mx);
      sum += sh[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
    for (int c = 0; c < NC; ++c) store(acc + h * D + c * kLanes, splat(0.f));
  }
  // acc_h += p_{h,t} v_t, one V row read once for every head
  for (int64_t b = 0; b < num_blocks; ++b) {
    const scalar_t* block = v_base + table[b] * cache_stride;
    const scalar_t* next = v_base + table[b + 1 < num_blocks ? b + 1 : b] * cache_stride;
    const int64_t t0 = b * block_size, t_end = std::min(len, t0 + block_size);
    for (int64_t t = t0; t < t_end; ++t) {
      const scalar_t* row = block + (t - t0) * token_stride;
      prefetch_row(next + (t - t0) * token_stride, row_bytes);
      for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
        vf vc[NC];
        for (int c = 0; c < NC; ++c) vc[c] = load(row + kvh * D + c * kLanes);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = kvh * G + g;
          const vf p = splat(scores[h * len + t]);
          float* ah = acc + h * D;
          for (int c = 0; c < NC; ++c) store(ah + c * kLanes, load(ah + c * kLanes) + p * vc[c]);
        }
      }
    }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int c = 0; c < NC; ++c) store(o_row + h * D + c * kLanes, load(acc + h * D + c * kLanes));
}

template <typename scalar_t>
void decode_kernel(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                   const at::Tensor& query_start_loc, const at::Tensor& decode_seqs,
                   double scale) {
  const int64_t H = query.size(1), D = query.size(2);
  const int64_t block_size = kv_cache.size(2), Hkv = kv_cache.size(3);
  const int64_t G = H / Hkv;
  const int64_t n = decode_seqs.size(0);
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

  const bool vector_path = D % kLanes == 0 && D / kLanes <= 16;
  // vector path: one task per sequence, all heads (each cache block read once, in
  // order); scalar path: one task per (sequence, KV head). Contexts differ in
  // length, so tasks are handed out dynamically.
  const int64_t tasks = vector_path ? n : n * Hkv;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> qbuf(H * D), acc(H * D), scores(H * longest);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t i = vector_path ? task : task / Hkv;
      const int64_t kvh = vector_path ? 0 : task % Hkv;
      const int64_t s = seqs[i];
      const int64_t qrow = starts[s];
      const scalar_t* q_row = q_ptr + qrow * q_row_stride + kvh * G * D;
      scalar_t* o_row = o_ptr + qrow * o_row_stride + kvh * G * D;
      const scalar_t* k = k_base + kvh * D;
      const scalar_t* v = v_base + kvh * D;
      const int64_t* table = tables + s * max_blocks;
#define ENGINE_DECODE_CASE(nc)                                                                   \
  case nc:                                                                                       \
    decode_seq<scalar_t, nc>(q_row, o_row, k, v, table, lens[s], block_size, cache_stride,      \
                             token_stride, Hkv, G, fscale, qbuf.data(), acc.data(), scores.data()); \
    break;
      switch (vector_path ? D / kLanes : 0) {
        ENGINE_DECODE_CASE(1)
        ENGINE_DECODE_CASE(2)
        ENGINE_DECODE_CASE(3)
        ENGINE_DECODE_CASE(4)
        ENGINE_DECODE_CASE(5)
        ENGINE_DECODE_CASE(6)
        ENGINE_DECODE_CASE(7)
        ENGINE_DECODE_CASE(8)
        ENGINE_DECODE_CASE(9)
        ENGINE_DECODE_CASE(10)
        ENGINE_DECODE_CASE(11)
        ENGINE_DECODE_CASE(12)
        ENGINE_DECODE_CASE(13)
        ENGINE_DECODE_CASE(14)
        ENGINE_DECODE_CASE(15)
        ENGINE_DECODE_CASE(16)
        default:
          decode_item_scalar(q_row, o_row, k, v, table, lens[s], block_size, cache_stride,
                             token_stride, G, D, fscale, scores.data());
      }
#undef ENGINE_DECODE_CASE
    }
  }
}

void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& kv_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            const at::Tensor& query_start_loc, const at::Tensor& decode_seqs,
                            double scale) {
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
                         decode_seqs, scale);
  } else if (query.scalar_type() == at::kBFloat16) {
    decode_kernel<at::BFloat16>(out, query, kv_cache, block_tables, seq_lens, query_start_loc,
                                decode_seqs, scale);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only");
  }
}

}  // namespace

TORCH_LIBRARY(engine_kernels, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, "
        "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, Tensor decode_seqs, "
        "float scale) -> ()");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
