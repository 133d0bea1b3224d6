// A decode step's decoder layers in one call: what a Llama-style model's fast path
// (engine.ops.fast_path) runs op by op from Python, with the same registered ops
// called here one after another. A decode step of a small model makes about ten
// kernel calls a layer, each tens of microseconds; the Python between them (the
// fast forms' closures, their checks, the output allocations) cost ~5 ms of a ~35
// ms step of SmolLM2-135M with 32 sequences, while the second OpenMP thread spun.
//
// engine_kernels::decode_layers(hidden, positions, tensors, ints, floats, kv_caches,
//     cos_sin_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
//     decode_seqs) -> (hidden, residual)
//   hidden:    [T, hidden] the embeddings of the step's T decode rows
//   tensors:   10 a layer: input norm weight, post-attention norm weight, then
//              (operand, bias) for qkv_proj, o_proj, gate_up_proj, down_proj
//              (None, None for a linear made of parts), then 2 a part: its blocks
//              and its bias
//   ints:      [layers, q_size, kv_size, num_heads, num_kv_heads, head_size, portable],
//              then 5 a linear (4 a layer): kernel, out_features, then the
//              kernel's own integers (see `linear` below), then 5 a part of the
//              linears made of parts (kGgmlParts), each a kGgml linear's
//   floats:    [attention scale], then the two norms' eps of each layer
//   kv_caches: each layer's [2, blocks, block_size, Hkv, D] cache
// Returns the last layer's output and the residual stream (the model's final
// norm adds them). Every stage is the registered op with the arguments the
// fast path passes, so the result equals its step bit for bit; which kernel a
// linear runs (it depends on the row count) is decided in Python
// (engine.ops.linear.fast_linear_kernel) and passed in `ints`.
#include <torch/library.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace {

using OptTensor = c10::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// the ops, with their kernels' C++ signatures (the dispatcher checks them)
struct Ops {
  using Linear = void(at::Tensor, const at::Tensor&, const at::Tensor&, const OptTensor&);
  using Gemv = void(at::Tensor, const at::Tensor&, const at::Tensor&, const OptTensor&, bool);
  c10::TypedOperatorHandle<void(at::Tensor, const at::Tensor&, const at::Tensor&, double)>
      rms_norm = find<void(at::Tensor, const at::Tensor&, const at::Tensor&, double)>(
          "engine_kernels::rms_norm");
  c10::TypedOperatorHandle<void(at::Tensor, at::Tensor, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, double)>
      fused_add_rms_norm = find<void(at::Tensor, at::Tensor, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, double)>("engine_kernels::fused_add_rms_norm");
  c10::TypedOperatorHandle<void(at::Tensor, const at::Tensor&)> silu_and_mul =
      find<void(at::Tensor, const at::Tensor&)>("engine_kernels::silu_and_mul");
  c10::TypedOperatorHandle<void(at::Tensor, at::Tensor, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, int64_t)>
      rotary_embedding = find<void(at::Tensor, at::Tensor, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, int64_t)>(
          "engine_kernels::rotary_embedding");
  c10::TypedOperatorHandle<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&)>
      write_kv_cache = find<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "engine_kernels::write_kv_cache");
  c10::TypedOperatorHandle<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>
      paged_decode_attention =
          find<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>(
              "engine_kernels::paged_decode_attention");
  c10::TypedOperatorHandle<Gemv> bf16_gemv = find<Gemv>("engine_kernels::bf16_gemv");
  c10::TypedOperatorHandle<Gemv> fp32_gemv = find<Gemv>("engine_kernels::fp32_gemv");
  c10::TypedOperatorHandle<Linear> amx_linear = find<Linear>("engine_kernels::amx_linear");
  c10::TypedOperatorHandle<Linear> amx_split_linear = find<Linear>("engine_kernels::amx_split_linear");
  c10::TypedOperatorHandle<Linear> amx_silu_and_mul = find<Linear>("engine_kernels::amx_silu_and_mul");
  c10::TypedOperatorHandle<void(at::Tensor, const at::Tensor&, const at::Tensor&, int64_t,
                                const OptTensor&, int64_t, bool)>
      ggml_linear = find<void(at::Tensor, const at::Tensor&, const at::Tensor&, int64_t,
                              const OptTensor&, int64_t, bool)>("engine_kernels::ggml_linear");
};

const Ops& ops() {
  static const Ops instance;  // looked up once, on the first call (every op is registered by then)
  return instance;
}

// oneDNN's product on a weight packed for it (torch's mkldnn op, called boxed as
// engine.ops.linear.onednn_linear calls it from Python: attr "none" or "swish");
// absent from a torch built without oneDNN, and then never asked for
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed, const OptTensor& bias,
                         const char* attr) {
  static const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  TORCH_CHECK(op.has_value(), "decode_layers: this torch has no mkldnn::_linear_pointwise");
  std::vector<c10::IValue> stack{x, packed, bias, std::string(attr),
                                 c10::List<c10::optional<at::Scalar>>(), std::string()};
  op->callBoxed(&stack);
  return stack[0].toTensor();
}

// silu(x G^T) * (x U^T) as engine.ops.linear.onednn_silu_and_mul computes it (no biases)
at::Tensor onednn_silu_and_mul(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up) {
  static const auto op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", "binary"});
  TORCH_CHECK(op.has_value(), "decode_layers: this torch has no mkldnn::_linear_pointwise.binary");
  at::Tensor gated = onednn_linear(x, gate, c10::nullopt, "swish");
  std::vector<c10::IValue> stack{x, gated, up, c10::IValue(), std::string("mul")};
  op->callBoxed(&stack);
  return stack[0].toTensor();
}

// engine.kernels.LINEAR_*
enum Kernel : int64_t {
  kBf16Gemv = 1, kAmx = 2, kAmxSplit = 3, kFp32Gemv = 4, kGgml = 5, kAmxSilu = 6,
  kOnednn = 7, kOnednnSilu = 8, kGgmlParts = 9
};
constexpr int64_t kHeader = 7, kLinearInts = 5, kLayerTensors = 10;

// The linears made of parts (a GGUF layer whose fused weights come in several
// block types: a Q8_0 value projection beside Q5_0 query and key rows), as the
// parts section after the layers' ints and tensors holds them
struct Parts {
  const int64_t* ints;  // 5 a part: a kGgml linear's, out_features its rows
  const c10::List<OptTensor>* tensors;
  int64_t first_tensor, count;
};

// `x` [T, in] times one linear's operand: ints = {kernel, out_features, a, b, c}
// (kGgml: a = the block type, b = the kernel path, c = interleaved; the GEMVs:
// a = portable; kAmxSilu: silu(gate) * up of a gate_up projection, out_features
// its half; kOnednn: oneDNN on its packed weight; kOnednnSilu: silu(gate) * up by
// oneDNN, the second tensor being up's packed weight, not a bias)
at::Tensor linear(const Ops& o, const at::Tensor& x, const int64_t* ints, const OptTensor& operand,
                  const OptTensor& bias, const Parts& parts) {
  if (ints[0] == kGgmlParts) {
    // ints = {kGgmlParts, out_features, first part, parts, 0}: each part's product
    // written into its columns of one output
    TORCH_CHECK(ints[2] >= 0 && ints[3] > 0 && ints[2] + ints[3] <= parts.count,
                "decode_layers: parts ", ints[2], "..", ints[2] + ints[3], " of ", parts.count);
    at::Tensor out = at::empty({x.size(0), ints[1]}, x.options());
    int64_t column = 0;
    for (int64_t p = ints[2]; p < ints[2] + ints[3]; ++p) {
      const int64_t* pi = parts.ints + p * kLinearInts;
      const OptTensor blocks = parts.tensors->get(parts.first_tensor + 2 * p);
      const OptTensor part_bias = parts.tensors->get(parts.first_tensor + 2 * p + 1);
      TORCH_CHECK(pi[0] == kGgml && blocks.has_value() && column + pi[1] <= ints[1],
                  "decode_layers: part ", p, " is not a GGML linear within its layer's columns");
      o.ggml_linear.call(out.narrow(1, column, pi[1]), x, *blocks, pi[2], part_bias, pi[3], pi[4] != 0);
      column += pi[1];
    }
    TORCH_CHECK(column == ints[1], "decode_layers: parts cover ", column, " of ", ints[1], " columns");
    return out;
  }
  TORCH_CHECK(operand.has_value(), "decode_layers: a linear without its operand");
  const at::Tensor& w = *operand;
  if (ints[0] == kOnednn) return onednn_linear(x, w, bias, "none");
  if (ints[0] == kOnednnSilu) {
    TORCH_CHECK(bias.has_value(), "decode_layers: oneDNN SiLU-and-mul without its up weight");
    return onednn_silu_and_mul(x, w, *bias);
  }
  at::Tensor out = at::empty({x.size(0), ints[1]}, x.options());
  switch (ints[0]) {
    case kBf16Gemv: o.bf16_gemv.call(out, x, w, bias, ints[2] != 0); break;
    case kAmx: o.amx_linear.call(out, x, w, bias); break;
    case kAmxSplit: o.amx_split_linear.call(out, x, w, bias); break;
    case kAmxSilu: o.amx_silu_and_mul.call(out, x, w, bias); break;
    case kFp32Gemv: o.fp32_gemv.call(out, x, w, bias, ints[2] != 0); break;
    case kGgml: o.ggml_linear.call(out, x, w, ints[2], bias, ints[3], ints[4] != 0); break;
    default: TORCH_CHECK(false, "decode_layers: unknown linear kernel ", ints[0]);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_layers(
    const at::Tensor& hidden_in, const at::Tensor& positions, const c10::List<OptTensor>& tensors,
    at::IntArrayRef ints, c10::ArrayRef<double> floats, at::TensorList kv_caches,
    const at::Tensor& cos_sin_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, const at::Tensor& query_start_loc, const at::Tensor& decode_seqs) {
  TORCH_CHECK(ints.size() >= kHeader, "decode_layers: ints must start with the 7-value header");
  const int64_t layers = ints[0], q_size = ints[1], kv_size = ints[2], heads = ints[3],
                kv_heads = ints[4], head_size = ints[5];
  const bool portable = ints[6] != 0;
  const int64_t linear_ints = kHeader + layers * 4 * kLinearInts;
  const int64_t extra = static_cast<int64_t>(ints.size()) - linear_ints;
  TORCH_CHECK(extra >= 0 && extra % kLinearInts == 0,
              "decode_layers: ints holds ", ints.size(), " values, expected ", linear_ints,
              " for ", layers, " layers (then 5 a part)");
  const Parts parts{ints.data() + linear_ints, &tensors, layers * kLayerTensors, extra / kLinearInts};
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == layers * kLayerTensors + 2 * parts.count &&
                  static_cast<int64_t>(kv_caches.size()) == layers &&
                  static_cast<int64_t>(floats.size()) == 1 + 2 * layers,
              "decode_layers: tensors, kv_caches and floats must hold 10, 1 and 2 entries a layer "
              "(tensors then 2 a part)");
  TORCH_CHECK(hidden_in.dim() == 2 && hidden_in.is_contiguous(),
              "decode_layers: hidden must be contiguous [T, hidden]");
  const Ops& o = ops();
  const double scale = floats[0];
  const int64_t T = hidden_in.size(0);
  at::Tensor hidden = hidden_in, residual;
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t* li = ints.data() + kHeader + l * 4 * kLinearInts;
    const int64_t base = l * kLayerTensors;
    auto tensor = [&](int64_t i) -> OptTensor { return tensors.get(base + i); };
    const OptTensor in_norm = tensor(0), post_norm = tensor(1);
    TORCH_CHECK(in_norm.has_value() && post_norm.has_value(), "decode_layers: layer ", l,
                " has no norm weights");
    // input norm (the residual add of the previous layer fused into it)
    at::Tensor x = at::empty_like(hidden);
    if (!residual.defined()) {
      o.rms_norm.call(x, hidden, *in_norm, floats[1 + 2 * l]);
      residual = hidden;
    } else {
      at::Tensor summed = at::empty_like(hidden);
      o.fused_add_rms_norm.call(x, summed, hidden, residual, *in_norm, floats[1 + 2 * l]);
      residual = summed;
    }
    // attention: qkv, RoPE on q and k, the cache write, paged decode attention, o_proj
    at::Tensor qkv = linear(o, x, li, tensor(2), tensor(3), parts);
    at::Tensor q = qkv.narrow(1, 0, q_size), k = qkv.narrow(1, q_size, kv_size),
               v = qkv.narrow(1, q_size + kv_size, kv_size);
    at::Tensor q_rot = at::empty({T, q_size}, qkv.options());
    at::Tensor k_rot = at::empty({T, kv_size}, qkv.options());
    o.rotary_embedding.call(q_rot, k_rot, positions, q, k, cos_sin_cache, head_size);
    const at::Tensor& kv_cache = kv_caches[l];
    o.write_kv_cache.call(kv_cache, k_rot.view({T, kv_heads, head_size}),
                          v.view({T, kv_heads, head_size}), slot_mapping);
    at::Tensor attn = at::empty({T, heads, head_size}, qkv.options());
    o.paged_decode_attention.call(attn, q_rot.view({T, heads, head_size}), kv_cache, block_tables,
                                  seq_lens, query_start_loc, decode_seqs, scale, portable);
    at::Tensor projected = linear(o, attn.view({T, heads * head_size}), li + kLinearInts,
                                  tensor(4), tensor(5), parts);
    // post-attention norm, then the MLP
    x = at::empty_like(projected);
    at::Tensor summed = at::empty_like(projected);
    o.fused_add_rms_norm.call(x, summed, projected, residual, *post_norm, floats[2 + 2 * l]);
    residual = summed;
    const int64_t* gate_up = li + 2 * kLinearInts;
    at::Tensor act = linear(o, x, gate_up, tensor(6), tensor(7), parts);
    if (gate_up[0] != kAmxSilu && gate_up[0] != kOnednnSilu) {  // the projection, then the activation
      at::Tensor gated = act;
      act = at::empty({T, gated.size(1) / 2}, gated.options());
      o.silu_and_mul.call(act, gated);
    }
    hidden = linear(o, act, li + 3 * kLinearInts, tensor(8), tensor(9), parts);
  }
  return {hidden, residual};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine_kernels, m) {
  m.def("decode_layers(Tensor hidden, Tensor positions, Tensor?[] tensors, int[] ints, "
        "float[] floats, Tensor[] kv_caches, Tensor cos_sin_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, Tensor decode_seqs) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(engine_kernels, CPU, m) {
  m.impl("decode_layers", &decode_layers);
}

// the same kernel where the tensors include oneDNN's packed weights (kOnednn)
TORCH_LIBRARY_IMPL(engine_kernels, MkldnnCPU, m) {
  m.impl("decode_layers", &decode_layers);
}
