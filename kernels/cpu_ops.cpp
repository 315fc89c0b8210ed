// The CPU kernels of the ops a decode step calls per layer (torch.ops.nvfp4.linear_w4a16, decode_attention),
// registered with torch's dispatcher around the C kernels of cpu_nvfp4.c: no Python between a step and its
// kernels. Built with torch's headers and ABI flag into the same library as the C kernels (kernels/cpu.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

extern "C" {
void nvfp4_gemv(const float *x, int64_t batch, const uint8_t *packed, const uint8_t *scales, float gscale, float *y,
                int64_t rows, int64_t cols);
void nvfp4_dequantize(const uint8_t *packed, const uint8_t *scales, float gscale, float *out, int64_t rows, int64_t cols);
void nvfp4_set_threads(int threads);
void decode_attention(const float *q, const float *k, const float *v, float *k_cache, float *v_cache,
                      const int64_t *slots, const int64_t *positions, float scale, float *out, int64_t batch,
                      int64_t heads, int64_t kv_heads, int64_t max_len, int64_t dim);
}

namespace {

constexpr int64_t kGemvMaxBatch = 16;  // kernels/cpu.py GEMV_MAX_BATCH

const uint8_t *bytes(const at::Tensor &t) { return static_cast<const uint8_t *>(t.data_ptr()); }

// A C GEMV on the packed bytes for up to 16 fp32 rows; else the weight dequantized into this thread's buffer
// (one per thread, grown to the largest weight, never a resident copy) and a BLAS GEMM.
at::Tensor linear_w4a16(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales, const at::Tensor &gscale) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == packed.size(1) * 2, "linear_w4a16: x [M, K] against packed [N, K/2]");
    TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous(), "linear_w4a16: packed weight not contiguous");
    const int64_t rows = packed.size(0), cols = x.size(1);
    const float s2 = gscale.item<float>();
    nvfp4_set_threads(at::get_num_threads());
    if (x.scalar_type() == at::kFloat && x.size(0) <= kGemvMaxBatch) {
        at::Tensor input = x.contiguous();
        at::Tensor y = at::empty({x.size(0), rows}, x.options());
        nvfp4_gemv(input.data_ptr<float>(), x.size(0), bytes(packed), bytes(scales), s2, y.data_ptr<float>(), rows, cols);
        return y;
    }
    thread_local at::Tensor buffer;
    if (!buffer.defined() || buffer.numel() < rows * cols) buffer = at::empty({rows * cols}, x.options().dtype(at::kFloat));
    at::Tensor weight = buffer.narrow(0, 0, rows * cols).view({rows, cols});
    nvfp4_dequantize(bytes(packed), bytes(scales), s2, weight.data_ptr<float>(), rows, cols);
    return at::linear(x, weight.to(x.scalar_type()));
}

at::Tensor attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, at::Tensor &k_cache, at::Tensor &v_cache,
                     const at::Tensor &slots, const at::Tensor &positions, double scale) {
    for (const at::Tensor &t : {q, k, v, k_cache, v_cache})
        TORCH_CHECK(t.scalar_type() == at::kFloat, "decode_attention: the C kernel takes fp32");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: caches not contiguous");
    at::Tensor query = q.contiguous(), key = k.contiguous(), value = v.contiguous();
    at::Tensor at_slots = slots.to(at::kLong).contiguous(), at_positions = positions.to(at::kLong).contiguous();
    at::Tensor out = at::empty_like(query);
    nvfp4_set_threads(at::get_num_threads());
    decode_attention(query.data_ptr<float>(), key.data_ptr<float>(), value.data_ptr<float>(), k_cache.data_ptr<float>(),
                     v_cache.data_ptr<float>(), at_slots.data_ptr<int64_t>(), at_positions.data_ptr<int64_t>(),
                     static_cast<float>(scale), out.data_ptr<float>(), q.size(0), q.size(1), k_cache.size(1),
                     k_cache.size(2), q.size(2));
    return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nvfp4, CPU, m) {
    m.impl("linear_w4a16", &linear_w4a16);
    m.impl("decode_attention", &attention);
}
