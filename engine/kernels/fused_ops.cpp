// Fused element-wise ops of the decoder layer: each reads its inputs once and
// writes its outputs once, where eager PyTorch runs 3-10 separate ops (and as
// many passes over memory and thread wake-ups).
//
// engine_kernels::rms_norm(out, x, weight, eps)
// engine_kernels::fused_add_rms_norm(out, residual_out, x, residual, weight, eps)
//     residual_out = x + residual; out = rms_norm(residual_out)
// engine_kernels::silu_and_mul(out, x)          out = silu(x[:, :d]) * x[:, d:]
// engine_kernels::rotary_embedding(q_out, k_out, positions, q, k, cos_sin_cache, head_size)
//     neox-style RoPE over the first cos_sin_cache.size(1) features of each head
// engine_kernels::argmax_rows(x) -> int64 [rows]   torch.argmax(x, dim=-1), same ties and NaN
// engine_kernels::write_kv_cache(kv_cache, key, value, slot_mapping)   both index_copy_s in one
//
// Rows are the first dimension; the last dimension must be contiguous. The
// arithmetic is float32 with the results rounded where the eager op's
// intermediate results are rounded (bfloat16: after each op), so that outputs
// equal `forward_native`'s up to float32 reassociation.
#include <torch/library.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

using namespace engine_kernels;


// what the eager op's intermediate result holds: a float32 stays, a bfloat16 is rounded
template <typename scalar_t>
inline vf as_dtype(vf v) { return v; }
template <>
inline vf as_dtype<c10::BFloat16>(vf v) { return round_out(v); }
template <typename scalar_t>
inline float as_dtype1(float x) { return x; }
template <>
inline float as_dtype1<c10::BFloat16>(float x) { return static_cast<float>(c10::BFloat16(x)); }

// run `body` with scalar_t = float or c10::BFloat16, as `dtype` says
#define ENGINE_DISPATCH_F32_BF16(dtype, name, body)                          \
  AT_DISPATCH_SWITCH(dtype, name,                                            \
                     AT_DISPATCH_CASE(at::kFloat, body)                      \
                     AT_DISPATCH_CASE(at::kBFloat16, body))

// rows per task so that a task holds at least ~16k elements
inline int64_t grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must be [",
              rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, ": the last dimension must be contiguous");
}

// ------------------------------------------------------------------------ RMSNorm

template <typename scalar_t>
void rms_norm_rows(scalar_t* out, int64_t out_stride, scalar_t* res_out, int64_t res_out_stride,
                   const scalar_t* x, int64_t x_stride, const scalar_t* res, int64_t res_stride,
                   const scalar_t* w, int64_t rows, int64_t H, float eps) {
  const int64_t vec_end = H - H % kLanes;
  // light on memory and arithmetic: two threads only pay off for larger batches
  at::parallel_for(0, rows, 2 * grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * x_stride;
      scalar_t* ro = res ? res_out + r * res_out_stride : nullptr;
      vf vss = splat(0.f);
      float ss = 0.f;
      for (int64_t i = 0; i < vec_end; i += kLanes) {
        vf v = load(xr + i);
        if (res) {
          // the sum as stored (rounded to the dtype) is what the norm reads
          v = as_dtype<scalar_t>(v + load(res + r * res_stride + i));
          store_out(ro + i, v);
        }
        vss += v * v;
      }
      for (int64_t i = vec_end; i < H; ++i) {
        float v = load1(xr + i);
        if (res) {
          v = as_dtype1<scalar_t>(v + load1(res + r * res_stride + i));
          store1(ro + i, v);
        }
        ss += v * v;
      }
      ss += hsum(vss);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
      // second pass over the row just written (or read): still in L1, no scratch copy
      const scalar_t* h = res ? ro : xr;
      scalar_t* o = out + r * out_stride;
      for (int64_t i = 0; i < vec_end; i += kLanes)
        store_out(o + i, load(w + i) * as_dtype<scalar_t>(load(h + i) * inv));
      for (int64_t i = vec_end; i < H; ++i)
        store1(o + i, load1(w + i) * as_dtype1<scalar_t>(load1(h + i) * inv));
    }
  });
}

void rms_norm_impl(at::Tensor& out, at::Tensor* res_out, const at::Tensor& x,
                   const at::Tensor* res, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2, "x must be [rows, hidden]");
  const int64_t rows = x.size(0), H = x.size(1);
  check_rows(x, "x", rows, H);
  check_rows(out, "out", rows, H);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(),
              "weight must be [hidden]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "out, x and weight dtypes differ");
  if (res) {
    check_rows(*res, "residual", rows, H);
    check_rows(*res_out, "residual_out", rows, H);
    TORCH_CHECK(res->scalar_type() == x.scalar_type() && res_out->scalar_type() == x.scalar_type(),
                "residual dtypes differ from x");
  }
  ENGINE_DISPATCH_F32_BF16(x.scalar_type(), "rms_norm", [&] {
      rms_norm_rows<scalar_t>(out.data_ptr<scalar_t>(), out.stride(0),
                              res ? res_out->data_ptr<scalar_t>() : nullptr, res ? res_out->stride(0) : 0,
                              x.data_ptr<scalar_t>(), x.stride(0),
                              res ? res->data_ptr<scalar_t>() : nullptr, res ? res->stride(0) : 0,
                              weight.data_ptr<scalar_t>(), rows, H, static_cast<float>(eps));
    });
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  rms_norm_impl(out, nullptr, x, nullptr, weight, eps);
}

void fused_add_rms_norm(at::Tensor out, at::Tensor residual_out, const at::Tensor& x,
                        const at::Tensor& residual, const at::Tensor& weight, double eps) {
  rms_norm_impl(out, &residual_out, x, &residual, weight, eps);
}

// ------------------------------------------------------------------------ SiLU and mul

template <typename scalar_t>
void silu_and_mul_rows(scalar_t* out, int64_t out_stride, const scalar_t* x, int64_t x_stride,
                       int64_t rows, int64_t d) {
  const int64_t vec_end = d - d % kLanes;
  at::parallel_for(0, rows, grain(2 * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* a = x + r * x_stride;
      const scalar_t* b = a + d;
      scalar_t* o = out + r * out_stride;
      for (int64_t i = 0; i < vec_end; i += kLanes) {
        const vf va = load(a + i);
        const vf silu = as_dtype<scalar_t>(va / (1.f + exp_approx(-va)));
        store_out(o + i, silu * load(b + i));
      }
      for (int64_t i = vec_end; i < d; ++i) {
        const float va = load1(a + i);
        const float silu = as_dtype1<scalar_t>(va / (1.f + exp_approx(-va)));
        store1(o + i, silu * load1(b + i));
      }
    }
  });
}

void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be [rows, 2 * d]");
  const int64_t rows = x.size(0), d = x.size(1) / 2;
  check_rows(x, "x", rows, 2 * d);
  check_rows(out, "out", rows, d);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out and x dtypes differ");
  ENGINE_DISPATCH_F32_BF16(x.scalar_type(), "silu_and_mul", [&] {
      silu_and_mul_rows<scalar_t>(out.data_ptr<scalar_t>(), out.stride(0), x.data_ptr<scalar_t>(),
                                  x.stride(0), rows, d);
    });
}

// ------------------------------------------------------------------------ RoPE

// one head: out[:half] = x1 cos - x2 sin, out[half:rot] = x2 cos + x1 sin, the rest
// copied; cos and sin as the eager op casts them (rounded to the dtype, see rope_rows)
template <typename scalar_t>
inline void rope_head(scalar_t* out, const scalar_t* x, const float* cos, const float* sin,
                      int64_t half, int64_t head_size) {
  int64_t i = 0;
  if (half % kLanes == 0) {
    for (; i < half; i += kLanes) {
      const vf c = load(cos + i), s = load(sin + i);
      const vf x1 = load(x + i), x2 = load(x + half + i);
      store_out(out + i, as_dtype<scalar_t>(x1 * c) - as_dtype<scalar_t>(x2 * s));
      store_out(out + half + i, as_dtype<scalar_t>(x2 * c) + as_dtype<scalar_t>(x1 * s));
    }
  }
  for (; i < half; ++i) {
    const float c = cos[i], s = sin[i];
    const float x1 = load1(x + i), x2 = load1(x + half + i);
    store1(out + i, as_dtype1<scalar_t>(x1 * c) - as_dtype1<scalar_t>(x2 * s));
    store1(out + half + i, as_dtype1<scalar_t>(x2 * c) + as_dtype1<scalar_t>(x1 * s));
  }
  for (int64_t j = 2 * half; j < head_size; ++j) out[j] = x[j];
}

template <typename scalar_t>
void rope_rows(at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& positions,
               const at::Tensor& q, const at::Tensor& k, const at::Tensor& cache,
               int64_t head_size) {
  const int64_t T = q.size(0), Hq = q.size(1) / head_size, Hk = k.size(1) / head_size;
  const int64_t rot = cache.size(1), half = rot / 2, max_pos = cache.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cs = cache.data_ptr<float>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  scalar_t* qo = q_out.data_ptr<scalar_t>();
  scalar_t* ko = k_out.data_ptr<scalar_t>();
  const int64_t qs = q.stride(0), ks = k.stride(0), qos = q_out.stride(0), kos = k_out.stride(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " outside the RoPE cache (",
                max_pos, " positions)");
  at::parallel_for(0, T, grain((Hq + Hk) * head_size), [&](int64_t begin, int64_t end) {
    // the token's cos and sin rounded to the dtype once for all its heads
    std::vector<float> rounded(rot);
    for (int64_t t = begin; t < end; ++t) {
      const float* row = cs + pos[t] * rot;
      int64_t i = 0;
      for (; i + kLanes <= rot; i += kLanes) store(rounded.data() + i, as_dtype<scalar_t>(load(row + i)));
      for (; i < rot; ++i) rounded[i] = as_dtype1<scalar_t>(row[i]);
      const float* cos = rounded.data();
      const float* sin = cos + half;
      for (int64_t h = 0; h < Hq; ++h)
        rope_head(qo + t * qos + h * head_size, qp + t * qs + h * head_size, cos, sin, half, head_size);
      for (int64_t h = 0; h < Hk; ++h)
        rope_head(ko + t * kos + h * head_size, kp + t * ks + h * head_size, cos, sin, half, head_size);
    }
  });
}

void rotary_embedding(at::Tensor q_out, at::Tensor k_out, const at::Tensor& positions,
                      const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_sin_cache,
                      int64_t head_size) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(0) == k.size(0), "q and k must be [T, heads * D]");
  TORCH_CHECK(head_size > 0 && q.size(1) % head_size == 0 && k.size(1) % head_size == 0,
              "q and k widths must be multiples of head_size");
  const int64_t T = q.size(0);
  check_rows(q, "q", T, q.size(1));
  check_rows(k, "k", T, k.size(1));
  check_rows(q_out, "q_out", T, q.size(1));
  check_rows(k_out, "k_out", T, k.size(1));
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == T &&
                  positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "positions must be a contiguous int64 [T]");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.scalar_type() == at::kFloat &&
                  cos_sin_cache.is_contiguous() && cos_sin_cache.size(1) % 2 == 0 &&
                  cos_sin_cache.size(1) <= head_size,
              "cos_sin_cache must be a contiguous float32 [positions, rotary_dim]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && q_out.scalar_type() == q.scalar_type() &&
                  k_out.scalar_type() == q.scalar_type(), "q, k and outputs dtypes differ");
  ENGINE_DISPATCH_F32_BF16(q.scalar_type(), "rotary_embedding", [&] {
      rope_rows<scalar_t>(q_out, k_out, positions, q, k, cos_sin_cache, head_size);
    });
}

// ------------------------------------------------------------------------ KV cache write

// kv_cache [2, blocks, block_size, Hkv, D]: row slot_mapping[t] of the flattened
// key (then value) cache <- key[t] (value[t]); rows [Hkv, D] contiguous inside
void write_kv_cache(at::Tensor kv_cache, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& slot_mapping) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [2, blocks, block_size, Hkv, D]");
  const int64_t Hkv = kv_cache.size(3), D = kv_cache.size(4);
  const int64_t slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t T = slot_mapping.size(0);
  for (const at::Tensor* t : {&key, &value}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == T && t->size(1) == Hkv && t->size(2) == D &&
                    t->stride(2) == 1 && t->stride(1) == D,
                "key/value must be [T, Hkv, D] with contiguous [Hkv, D] rows");
    TORCH_CHECK(t->scalar_type() == kv_cache.scalar_type(), "key/value dtype differs from the cache");
  }
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous int64 [T]");
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "slot ", slot[t], " outside the cache (", slots, " slots)");
  const int64_t row_bytes = Hkv * D * kv_cache.element_size();
  char* k_cache = static_cast<char*>(kv_cache.data_ptr());
  char* v_cache = k_cache + slots * row_bytes;
  const char* k = static_cast<const char*>(key.data_ptr());
  const char* v = static_cast<const char*>(value.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size();
  const int64_t v_stride = value.stride(0) * value.element_size();
  at::parallel_for(0, T, std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(row_bytes, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(k_cache + slot[t] * row_bytes, k + t * k_stride, row_bytes);
      std::memcpy(v_cache + slot[t] * row_bytes, v + t * v_stride, row_bytes);
    }
  });
}

// ------------------------------------------------------------------------ argmax

// index of each row's largest value, the first one on ties; a NaN counts as the
// largest (torch.argmax's rule), so a row with NaN gives its first NaN
template <typename scalar_t>
void argmax_rows_impl(int64_t* out, const scalar_t* x, int64_t rows, int64_t n) {
  const int64_t vec_end = n - n % kLanes;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * n;
      float best = -INFINITY;
      bool nan = false;
      if (vec_end) {
        vf m = load(row);
        vi has_nan = (vi)(m != m);
        for (int64_t i = kLanes; i < vec_end; i += kLanes) {
          const vf v = load(row + i);
          m = vmax(m, v);
          has_nan |= (vi)(v != v);
        }
        for (int i = 0; i < kLanes; ++i) nan |= has_nan[i] != 0;
        best = hmax(m);
      }
      for (int64_t i = vec_end; i < n; ++i) {
        const float v = load1(row + i);
        nan |= v != v;
        best = v > best ? v : best;
      }
      int64_t index = 0;
      for (int64_t i = 0; i < n; ++i) {  // the first position holding it
        const float v = load1(row + i);
        if (nan ? v != v : v == best) {
          index = i;
          break;
        }
      }
      out[r] = index;
    }
  });
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0, "x must be a contiguous [rows, n], n > 0");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  ENGINE_DISPATCH_F32_BF16(x.scalar_type(), "argmax_rows", [&] {
      argmax_rows_impl<scalar_t>(out.data_ptr<int64_t>(), x.data_ptr<scalar_t>(), x.size(0), x.size(1));
    });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine_kernels, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) out, Tensor(b!) residual_out, Tensor x, Tensor residual, "
        "Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("rotary_embedding(Tensor(a!) q_out, Tensor(b!) k_out, Tensor positions, Tensor q, "
        "Tensor k, Tensor cos_sin_cache, int head_size) -> ()");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("write_kv_cache(Tensor(a!) kv_cache, Tensor key, Tensor value, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("write_kv_cache", &write_kv_cache);
}
