// BERT's "add & norm" for XLA:CPU (float32), forward and backward, as XLA FFI handlers:
// out = LayerNorm(residual + dropout(y + bias)) * scale + offset, over each row's `hidden` values.
//
// Why: XLA:CPU computes a layer norm in five passes forward (the sum, its square, two row reductions,
// the normalisation) and more backward, each a trip through memory. Here each row is read once,
// stays in cache while its statistics and output are computed, and is written once; the backward
// pass recomputes the normalised row from the saved mean and reciprocal standard deviation.
// Built by cpu_add_norm.py (`cpu_build`) on first use, with cpu_kernels.h; its speed: docs/performance.md,
// "twentieth".
//
// Layouts (row-major): y, residual, out and their gradients [rows, hidden]; bias, scale, offset and
// theirs [hidden]; keep uint8 [rows, hidden] (dropout's keep mask; [1] when there is no dropout: the
// mask's rank, not the keep probability, says which); mean and rstd float32 [rows]. The variance is
// the mean of squared deviations from the mean (two passes over the row in cache). `nn.LayerNorm`
// (the XLA path) takes E[x^2] - E[x]^2, which agrees to rounding unless a row's mean is far larger
// than its spread, where it loses digits that this keeps.
//
// The column sums of the backward pass (the gradients of bias, scale and offset) are summed per
// fixed block of rows and then across blocks in block order: the same result whatever the threads do.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bert_jax::Broadcast;
using bert_jax::kV;
using bert_jax::Load;
using bert_jax::ParallelFor;
using bert_jax::Store;
using bert_jax::vec;

constexpr int64_t kBlockRows = 64;  // rows per task; a block's column sums are one partial

inline float Sum(vec v) {
  float s = 0.f;
  for (int i = 0; i < kV; ++i) s += v[i];
  return s;
}

// s = residual + dropout(y + bias) into `sum` [hidden]: the row before its normalisation.
inline void AddRow(const float* y, const float* bias, const float* residual, const uint8_t* keep, float keep_scale,
                   int64_t hidden, float* sum) {
  for (int64_t j = 0; j < hidden; ++j) {
    const float dropped = keep == nullptr ? y[j] + bias[j] : (keep[j] ? (y[j] + bias[j]) * keep_scale : 0.f);
    sum[j] = residual[j] + dropped;
  }
}

// The row's mean and reciprocal standard deviation.
inline void Moments(const float* s, int64_t hidden, float eps, float* mean, float* rstd) {
  vec acc = {};
  int64_t j = 0;
  for (; j + kV <= hidden; j += kV) acc += Load(s + j);
  float total = Sum(acc);
  for (; j < hidden; ++j) total += s[j];
  const float m = total / hidden;
  acc = vec{};
  j = 0;
  for (; j + kV <= hidden; j += kV) {
    const vec d = Load(s + j) - m;
    acc += d * d;
  }
  float squares = Sum(acc);
  for (; j < hidden; ++j) squares += (s[j] - m) * (s[j] - m);
  *mean = m;
  *rstd = 1.f / std::sqrt(squares / hidden + eps);
}

struct Shape {
  int64_t rows, hidden;
};

Shape GetShape(const ffi::Buffer<ffi::F32>& y) {
  auto d = y.dimensions();
  return d.size() == 2 ? Shape{d[0], d[1]} : Shape{-1, -1};
}

// Whether each buffer (argument or result) is [rows, hidden], [rows] or [hidden] as its role says:
// cpu_add_norm.py checks its inputs too; this guards other callers.
template <typename Buffer>
bool IsMatrix(const Shape& s, const Buffer& b) {
  auto d = b.dimensions();
  return d.size() == 2 && d[0] == s.rows && d[1] == s.hidden;
}
template <typename Buffer>
bool IsVector(const Buffer& b, int64_t n) {
  auto d = b.dimensions();
  return d.size() == 1 && d[0] == n;
}

// The inputs both handlers take; `dropout` from the keep mask's rank.
bool InputsFit(const Shape& s, const ffi::Buffer<ffi::F32>& bias, const ffi::Buffer<ffi::F32>& residual,
               const ffi::Buffer<ffi::U8>& keep, const ffi::Buffer<ffi::F32>& scale,
               const ffi::Buffer<ffi::F32>& offset, bool dropout) {
  return s.rows >= 0 && IsVector(bias, s.hidden) && IsVector(scale, s.hidden) && IsVector(offset, s.hidden) &&
         IsMatrix(s, residual) && (dropout ? IsMatrix(s, keep) : IsVector(keep, 1));
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> bias,
                   ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::U8> keep, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> mean,
                   ffi::ResultBuffer<ffi::F32> rstd, float eps, float keep_prob) {
  const Shape s = GetShape(y);
  const bool dropout = keep.dimensions().size() == 2;
  if (!InputsFit(s, bias, residual, keep, scale, offset, dropout) || !IsMatrix(s, *out) ||
      !IsVector(*mean, s.rows) || !IsVector(*rstd, s.rows))
    return ffi::Error::InvalidArgument("add & norm: buffers of mismatched shapes");
  const float keep_scale = 1.f / keep_prob;
  const int64_t h = s.hidden;
  ParallelFor(pool, (s.rows + kBlockRows - 1) / kBlockRows, [&](int64_t block) {
    for (int64_t i = block * kBlockRows; i < std::min(s.rows, (block + 1) * kBlockRows); ++i) {
      float* o = out->typed_data() + i * h;  // the sum first, normalised in place
      AddRow(y.typed_data() + i * h, bias.typed_data(), residual.typed_data() + i * h,
             dropout ? keep.typed_data() + i * h : nullptr, keep_scale, h, o);
      float m, r;
      Moments(o, h, eps, &m, &r);
      for (int64_t j = 0; j < h; ++j) o[j] = (o[j] - m) * r * scale.typed_data()[j] + offset.typed_data()[j];
      mean->typed_data()[i] = m;
      rstd->typed_data()[i] = r;
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::U8> keep, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                    ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> d_y, ffi::ResultBuffer<ffi::F32> d_residual,
                    ffi::ResultBuffer<ffi::F32> d_bias, ffi::ResultBuffer<ffi::F32> d_scale,
                    ffi::ResultBuffer<ffi::F32> d_offset, float keep_prob) {
  const Shape s = GetShape(y);
  const bool dropout = keep.dimensions().size() == 2;
  if (!InputsFit(s, bias, residual, keep, scale, offset, dropout) || !IsVector(mean, s.rows) ||
      !IsVector(rstd, s.rows) || !IsMatrix(s, d_out) || !IsMatrix(s, *d_y) || !IsMatrix(s, *d_residual) ||
      !IsVector(*d_bias, s.hidden) || !IsVector(*d_scale, s.hidden) || !IsVector(*d_offset, s.hidden))
    return ffi::Error::InvalidArgument("add & norm: buffers of mismatched shapes");
  const float keep_scale = 1.f / keep_prob;
  const int64_t h = s.hidden, blocks = (s.rows + kBlockRows - 1) / kBlockRows;
  // Per block of rows: the partial column sums of d_bias, d_scale and d_offset, [blocks, 3, hidden].
  std::vector<float> partial(blocks * 3 * h, 0.f);
  ParallelFor(pool, blocks, [&](int64_t block) {
    float* p_bias = partial.data() + block * 3 * h;
    float* p_scale = p_bias + h;
    float* p_offset = p_scale + h;
    thread_local std::vector<float> normed;
    normed.resize(h);
    for (int64_t i = block * kBlockRows; i < std::min(s.rows, (block + 1) * kBlockRows); ++i) {
      const uint8_t* row_keep = dropout ? keep.typed_data() + i * h : nullptr;
      const float* g_out = d_out.typed_data() + i * h;
      const float m = mean.typed_data()[i], r = rstd.typed_data()[i];
      AddRow(y.typed_data() + i * h, bias.typed_data(), residual.typed_data() + i * h, row_keep, keep_scale, h,
             normed.data());
      const float* sc = scale.typed_data();
      for (int64_t j = 0; j < h; ++j) {  // vectorised by the compiler: no reduction across j
        const float x = (normed[j] - m) * r;
        normed[j] = x;
        p_scale[j] += g_out[j] * x;
        p_offset[j] += g_out[j];
      }
      // The means of g = d_out * scale and of g * normed.
      vec acc_g = {}, acc_gx = {};
      int64_t j = 0;
      for (; j + kV <= h; j += kV) {
        const vec g = Load(g_out + j) * Load(sc + j);
        acc_g += g;
        acc_gx += g * Load(normed.data() + j);
      }
      float mean_g = Sum(acc_g), mean_gx = Sum(acc_gx);
      for (; j < h; ++j) {
        mean_g += g_out[j] * sc[j];
        mean_gx += g_out[j] * sc[j] * normed[j];
      }
      mean_g /= h;
      mean_gx /= h;
      float* g_res = d_residual->typed_data() + i * h;
      float* g_y = d_y->typed_data() + i * h;
      for (int64_t j = 0; j < h; ++j) g_res[j] = r * (g_out[j] * sc[j] - mean_g - normed[j] * mean_gx);
      if (row_keep == nullptr) {
        std::copy(g_res, g_res + h, g_y);
      } else {
        for (int64_t j = 0; j < h; ++j) g_y[j] = row_keep[j] ? g_res[j] * keep_scale : 0.f;
      }
      for (int64_t j = 0; j < h; ++j) p_bias[j] += g_y[j];
    }
  });
  float* outs[3] = {d_bias->typed_data(), d_scale->typed_data(), d_offset->typed_data()};
  for (int k = 0; k < 3; ++k) std::fill(outs[k], outs[k] + h, 0.f);
  for (int64_t block = 0; block < blocks; ++block)
    for (int k = 0; k < 3; ++k)
      for (int64_t j = 0; j < h; ++j) outs[k][j] += partial[(block * 3 + k) * h + j];
  return ffi::Error::Success();
}

}  // namespace

// What both handlers take first: the thread pool, then y, bias, residual, keep, scale and offset.
auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()  // y
      .Arg<ffi::Buffer<ffi::F32>>()  // bias
      .Arg<ffi::Buffer<ffi::F32>>()  // residual
      .Arg<ffi::Buffer<ffi::U8>>()   // keep
      .Arg<ffi::Buffer<ffi::F32>>()  // scale
      .Arg<ffi::Buffer<ffi::F32>>();  // offset
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BertJaxAddNormForward, Forward,
                              BindInputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Attr<float>("eps")
                                  .Attr<float>("keep_prob"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BertJaxAddNormBackward, Backward,
                              BindInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_residual
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_scale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_offset
                                  .Attr<float>("keep_prob"));
