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

namespace {

// D values of a cache or query row as float32 (bf16: the high half of a float,
// written as shifts so the compiler vectorises it)
inline void to_float(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
inline void to_float(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<uint32_t>(bits[d]) << 16;
}

// exp(x) for x <= 0 (softmax after subtracting the max), within ~2 ulp: Cody-Waite
// range reduction and Cephes' polynomial, written so that the loop vectorises
// (std::exp stays a scalar call here)
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
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

  at::parallel_for(0, n * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(G * D), acc(G * D), row(D), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / Hkv, kvh = item % Hkv;
      const int64_t s = seqs[i];
      const int64_t len = lens[s];
      const int64_t qrow = starts[s];
      const int64_t* table = tables + s * max_blocks;
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* src = q_ptr + qrow * q_row_stride + (kvh * G + g) * D;
        to_float(src, q.data() + g * D, D);
        for (int64_t d = 0; d < D; ++d) q[g * D + d] *= fscale;
      }
      scores.resize(G * len);
      // scores[g * len + t] = q_g . k_t
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* k = k_base + table[t / block_size] * cache_stride +
                            (t % block_size) * token_stride + kvh * D;
        to_float(k, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = q.data() + g * D;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * row[d];
          scores[g * len + t] = dot;
        }
      }
      std::vector<float> inv_sum(G);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * len;
        float mx = sg[0];
        for (int64_t t = 1; t < len; ++t) mx = sg[t] > mx ? sg[t] : mx;
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sg[t] = exp_nonpositive(sg[t] - mx);
          sum += sg[t];
        }
        inv_sum[g] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* v = v_base + table[t / block_size] * cache_stride +
                            (t % block_size) * token_stride + kvh * D;
        to_float(v, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * len + t];
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] += p * row[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        scalar_t* dst = o_ptr + qrow * o_row_stride + (kvh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[g * D + d] * inv_sum[g]);
      }
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
