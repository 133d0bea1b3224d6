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

// One (sequence, KV head) pair: its G query heads against its context, with the
// head size a multiple of 16 (NC chunks of 16 lanes). `qbuf` holds G * D floats,
// `scores` G * len.
template <typename scalar_t, int NC>
void decode_item(const scalar_t* q_row, scalar_t* o_row, const scalar_t* k_base,
                 const scalar_t* v_base, const int64_t* table, int64_t len, int64_t block_size,
                 int64_t cache_stride, int64_t token_stride, int64_t G, float scale,
                 float* qbuf, float* scores) {
  constexpr int64_t D = NC * kLanes;
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < NC; ++c) store(qbuf + g * D + c * kLanes, load(q_row + g * D + c * kLanes) * scale);
  // scores[g * len + t] = (scale q_g) . k_t, one K row read once for every head of the group
  for (int64_t b = 0; b * block_size < len; ++b) {
    const scalar_t* block = k_base + table[b] * cache_stride;
    const int64_t t0 = b * block_size, t_end = std::min(len, t0 + block_size);
    for (int64_t t = t0; t < t_end; ++t) {
      const scalar_t* k = block + (t - t0) * token_stride;
      vf kc[NC];
      for (int c = 0; c < NC; ++c) kc[c] = load(k + c * kLanes);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qbuf + g * D;
        vf acc = load(qg) * kc[0];
        for (int c = 1; c < NC; ++c) acc += load(qg + c * kLanes) * kc[c];
        scores[g * len + t] = hsum(acc);
      }
    }
  }
  // softmax per head (the 1/sum is applied to the output)
  const int64_t vec_end = len - len % kLanes;
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * len;
    float mx = -INFINITY;
    if (vec_end) {
      vf m = load(sg);
      for (int64_t t = kLanes; t < vec_end; t += kLanes) m = vmax(m, load(sg + t));
      mx = hmax(m);
    }
    for (int64_t t = vec_end; t < len; ++t) mx = sg[t] > mx ? sg[t] : mx;
    vf vsum = splat(0.f);
    for (int64_t t = 0; t < vec_end; t += kLanes) {
      vf e = exp_approx(load(sg + t) - mx);
      store(sg + t, e);
      vsum += e;
    }
    float sum = hsum(vsum);
    for (int64_t t = vec_end; t < len; ++t) {
      sg[t] = exp_approx(sg[t] - mx);
      sum += sg[t];
    }
    // out_g = sum_t p_t v_t / sum, accumulated in registers
    vf acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = splat(0.f);
    for (int64_t b = 0; b * block_size < len; ++b) {
      const scalar_t* block = v_base + table[b] * cache_stride;
      const int64_t t0 = b * block_size, t_end = std::min(len, t0 + block_size);
      for (int64_t t = t0; t < t_end; ++t) {
        const scalar_t* v = block + (t - t0) * token_stride;
        const vf p = splat(sg[t]);
        for (int c = 0; c < NC; ++c) acc[c] += p * load(v + c * kLanes);
      }
    }
    const float inv = 1.f / sum;
    for (int c = 0; c < NC; ++c) store(o_row + g * D + c * kLanes, acc[c] * inv);
  }
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

  at::parallel_for(0, n * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(G * D), scores(G * longest);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / Hkv, kvh = item % Hkv;
      const int64_t s = seqs[i];
      const int64_t qrow = starts[s];
      const scalar_t* q_row = q_ptr + qrow * q_row_stride + kvh * G * D;
      scalar_t* o_row = o_ptr + qrow * o_row_stride + kvh * G * D;
      const scalar_t* k = k_base + kvh * D;
      const scalar_t* v = v_base + kvh * D;
      const int64_t* table = tables + s * max_blocks;
#define ENGINE_DECODE_CASE(nc)                                                               \
  case nc:                                                                                   \
    decode_item<scalar_t, nc>(q_row, o_row, k, v, table, lens[s], block_size, cache_stride, \
                              token_stride, G, fscale, qbuf.data(), scores.data());          \
    break;
      switch (D % kLanes ? 0 : D / kLanes) {
        ENGINE_DECODE_CASE(2)
        ENGINE_DECODE_CASE(4)
        ENGINE_DECODE_CASE(5)
        ENGINE_DECODE_CASE(6)
        ENGINE_DECODE_CASE(8)
        ENGINE_DECODE_CASE(16)
        default:
          decode_item_scalar(q_row, o_row, k, v, table, lens[s], block_size, cache_stride,
                             token_stride, G, D, fscale, scores.data());
      }
#undef ENGINE_DECODE_CASE
    }
  });
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
