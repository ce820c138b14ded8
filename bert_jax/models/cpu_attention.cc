// Fused multi-head attention for XLA:CPU (float32), forward and backward, as XLA FFI handlers.
//
// Why: XLA:CPU runs attention as separate passes over the [batch, heads, seq, seq] scores (two
// batched matmuls, transposes, the mask, two reductions, exp, dropout), each a trip through memory.
// Here a task takes one sequence's heads; each head's scores stay in cache and are never written
// out, and the backward pass recomputes them from the saved log-sum-exp, as flash attention does.
// Built by cpu_attention.py (`cpu_build`) on first use, with cpu_kernels.h; see docs/performance.md for its speed.
//
// Layouts (row-major): q, k, v, context and their gradients [batch, seq, heads, head_dim], the
// projections' own layout (no transposes); key_valid uint8 [batch, seq] (1: a real token); keep uint8
// [batch, heads, seq, seq] (dropout's keep mask on the probabilities; [1] when there is no dropout);
// lse float32 [batch, heads, seq] (max + log of the softmax's normaliser, per query).
// Semantics are those of attention.py's einsum attention: scores (q / root) . k with root = sqrt(head_dim)
// (here q * (1 / root), within an ulp), padding keys at the most negative float32 (a query with no
// real key attends to all keys evenly), softmax, dropout p * keep / keep_prob, then the weighted sum
// of values.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bert_jax::Broadcast;
using bert_jax::ivec;
using bert_jax::kV;
using bert_jax::Load;
using bert_jax::ParallelFor;
using bert_jax::Store;
using bert_jax::vec;

constexpr int kRows = 12;    // rows per register tile: 12 x 2 accumulators fit AVX-512's 32 registers
constexpr int kCols = 2 * kV;  // columns per register tile

inline int64_t RoundUp(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// e^x (Cephes' polynomial on [-ln2/2, ln2/2] times 2^n), within 2 ulp of expf on [-87.3, 88];
// x is clamped to that range, so that a masked entry (multiplied by 0 after) stays finite.
inline vec Exp(vec x) {
  x = x < -87.3f ? Broadcast(-87.3f) : x;
  x = x > 88.f ? Broadcast(88.f) : x;
  const vec t = x * 1.44269504088896341f + 12582912.f;  // round(x / ln2) in the low mantissa bits
  const vec n = t - 12582912.f;
  vec r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec p = Broadcast(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  const ivec bits = ((ivec)t - 0x4B400000 + 127) << 23;  // a vector cast reinterprets the bits
  return p * (vec)bits;
}

// out[rows, n] = a[rows, d] . bt[d, n] for n a multiple of kCols; `a` rows `lda` apart.
void MatMulTransposed(const float* a, int64_t lda, int64_t rows, const float* bt, int64_t d, int64_t n,
                      float* out) {
  for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
    const int64_t tile_rows = std::min<int64_t>(kRows, rows - i0);
    const float* arow[kRows];
    for (int r = 0; r < kRows; ++r) arow[r] = a + std::min<int64_t>(i0 + r, rows - 1) * lda;
    for (int64_t j0 = 0; j0 < n; j0 += kCols) {
      vec acc[kRows][2] = {};
      for (int64_t c = 0; c < d; ++c) {
        const vec b0 = Load(bt + c * n + j0), b1 = Load(bt + c * n + j0 + kV);
        for (int r = 0; r < kRows; ++r) {
          acc[r][0] += arow[r][c] * b0;
          acc[r][1] += arow[r][c] * b1;
        }
      }
      for (int64_t r = 0; r < tile_rows; ++r) {
        Store(out + (i0 + r) * n + j0, acc[r][0]);
        Store(out + (i0 + r) * n + j0 + kV, acc[r][1]);
      }
    }
  }
}

// out[rows, d] = a . b for b [n, d], where a's element (r, j) is a[r * row_stride + j * col_stride]
// (a [rows, n] with row_stride = its row length and col_stride = 1; a^T of [n, rows] with 1 and its
// row length); `out` rows `ldo` apart.
void MatMul(const float* a, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t n, const float* b,
            int64_t d, float* out, int64_t ldo) {
  for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
    const int64_t tile_rows = std::min<int64_t>(kRows, rows - i0);
    const float* arow[kRows];
    for (int r = 0; r < kRows; ++r) arow[r] = a + std::min<int64_t>(i0 + r, rows - 1) * row_stride;
    int64_t c0 = 0;
    for (; c0 + kCols <= d; c0 += kCols) {
      vec acc[kRows][2] = {};
      for (int64_t j = 0; j < n; ++j) {
        const vec b0 = Load(b + j * d + c0), b1 = Load(b + j * d + c0 + kV);
        for (int r = 0; r < kRows; ++r) {
          const float x = arow[r][j * col_stride];
          acc[r][0] += x * b0;
          acc[r][1] += x * b1;
        }
      }
      for (int64_t r = 0; r < tile_rows; ++r) {
        Store(out + (i0 + r) * ldo + c0, acc[r][0]);
        Store(out + (i0 + r) * ldo + c0 + kV, acc[r][1]);
      }
    }
    for (int64_t r = 0; r < tile_rows; ++r)  // head_dim not a multiple of kCols: the rest, plainly
      for (int64_t c = c0; c < d; ++c) {
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += arow[r][j * col_stride] * b[j * d + c];
        out[(i0 + r) * ldo + c] = sum;
      }
  }
}

struct Dims {
  int64_t batch, seq, heads, head_dim, padded;  // padded: seq rounded up to kCols (extra keys are masked)
  int64_t At(int64_t b, int64_t s, int64_t h) const { return ((b * seq + s) * heads + h) * head_dim; }
};

Dims GetDims(const ffi::Buffer<ffi::F32>& q) {
  auto d = q.dimensions();
  if (d.size() != 4) return Dims{-1, -1, -1, -1, -1};  // matches no other buffer: refused below
  return Dims{d[0], d[1], d[2], d[3], RoundUp(d[1], kCols)};
}

// The inputs' shapes against q's (cpu_attention.py checks them too; this guards other callers).
template <typename... Buffers>
bool SameShape(const Dims& dims, const Buffers&... buffers) {
  auto same = [&](const auto& buffer) {
    auto d = buffer.dimensions();
    return d.size() == 4 && d[0] == dims.batch && d[1] == dims.seq && d[2] == dims.heads && d[3] == dims.head_dim;
  };
  return (same(buffers) && ...);
}

bool MasksFit(const Dims& dims, const ffi::Buffer<ffi::U8>& key_valid, const ffi::Buffer<ffi::U8>& keep, bool dropout) {
  auto v = key_valid.dimensions();
  if (v.size() != 2 || v[0] != dims.batch || v[1] != dims.seq) return false;
  if (!dropout) return true;
  auto k = keep.dimensions();
  return k.size() == 4 && k[0] == dims.batch && k[1] == dims.heads && k[2] == dims.seq && k[3] == dims.seq;
}

// Work items: one sequence's heads [h0, h1). A sequence's q, k and v rows are read once, in order,
// for all of its heads (one head's slice of each row alone would be a strided gather); its heads are
// split into groups only when there are too few sequences to keep every thread busy.
struct Tasks {
  int64_t groups, heads_per_group;
  Tasks(const Dims& dims, int64_t threads) {
    groups = std::min(dims.heads, std::max<int64_t>(1, (2 * (threads + 1) + dims.batch - 1) / dims.batch));
    heads_per_group = (dims.heads + groups - 1) / groups;
  }
  int64_t count(const Dims& dims) const { return dims.batch * groups; }
};

// Runs body(b, h0, group) for every work item of `dims` on the pool: sequence b's heads [h0, h0 + group).
template <typename Body>
void ForEachGroup(ffi::ThreadPool& pool, const Dims& dims, const Body& body) {
  if (dims.batch * dims.seq * dims.heads * dims.head_dim == 0) return;
  const Tasks tasks(dims, pool.num_threads());
  ParallelFor(pool, tasks.count(dims), [&](int64_t task) {
    const int64_t b = task / tasks.groups, h0 = task % tasks.groups * tasks.heads_per_group;
    const int64_t group = std::min(tasks.heads_per_group, dims.heads - h0);
    if (group > 0) body(b, h0, group);
  });
}

// Scratch reused across a thread's work items (no allocation or zeroing per item).
float* Scratch(std::vector<float>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// `valid` [padded] for sequence b: 1 for a real key, else 0. Returns true when no key is real: all
// scores then equal the most negative float, and HF's softmax weighs every key 1 / seq.
bool KeyWeights(const Dims& dims, const uint8_t* key_valid, int64_t b, float* valid) {
  bool uniform = true;
  for (int64_t j = 0; j < dims.padded; ++j) {
    valid[j] = j < dims.seq && key_valid[b * dims.seq + j] ? 1.f : 0.f;
    uniform &= valid[j] == 0.f;
  }
  return uniform;
}

// Rows [seq] of a group's heads: out[g][s][c] = in[b, s, h0 + g, c] * scale (`transposed`: out[g][c][s],
// rows `padded` long). Padding rows (seq..padded) are zeroed.
void Gather(const Dims& dims, const float* in, int64_t b, int64_t h0, int64_t group, float scale, bool transposed,
            float* out) {
  const int64_t d = dims.head_dim, p = dims.padded, width = group * d;
  if (!transposed) {
    for (int64_t s = 0; s < p; ++s) {
      const float* row = in + dims.At(b, std::min(s, dims.seq - 1), h0);
      for (int64_t g = 0; g < group; ++g)
        for (int64_t c = 0; c < d; ++c) out[(g * p + s) * d + c] = s < dims.seq ? row[g * d + c] * scale : 0.f;
    }
    return;
  }
  // kV rows at a time into a tile, then each column of the tile out as one vector: contiguous stores.
  thread_local std::vector<float> buffer;
  float* tile = Scratch(buffer, kV * width);
  for (int64_t s0 = 0; s0 < p; s0 += kV) {
    for (int64_t r = 0; r < kV; ++r) {
      if (s0 + r < dims.seq) std::memcpy(tile + r * width, in + dims.At(b, s0 + r, h0), width * sizeof(float));
      else std::fill(tile + r * width, tile + (r + 1) * width, 0.f);
    }
    for (int64_t column = 0; column < width; ++column) {
      vec x;
      for (int r = 0; r < kV; ++r) x[r] = tile[r * width + column];
      Store(out + column * p + s0, x * scale);
    }
  }
}

// out[b, s, h0 + g, :] = local[g][s][:] for the group's heads.
void Scatter(const Dims& dims, const float* local, int64_t b, int64_t h0, int64_t group, float* out) {
  const int64_t d = dims.head_dim;
  for (int64_t s = 0; s < dims.seq; ++s)
    for (int64_t g = 0; g < group; ++g)
      std::memcpy(out + dims.At(b, s, h0 + g), local + (g * dims.seq + s) * d, d * sizeof(float));
}

// probs [seq, padded] = softmax over the valid keys of q . k^T (q already divided by sqrt(head_dim));
// exactly 0 at the others. With `saved_lse` (backward), exp(scores - saved_lse); else writes `lse`.
void Softmax(const Dims& dims, const float* q, const float* k_t, const float* valid, bool uniform,
             const float* saved_lse, float* lse, float* probs) {
  const int64_t p = dims.padded;
  if (uniform) {
    for (int64_t i = 0; i < dims.seq; ++i) {
      std::fill(probs + i * p, probs + i * p + dims.seq, 1.f / dims.seq);
      std::fill(probs + i * p + dims.seq, probs + (i + 1) * p, 0.f);
      if (!saved_lse) lse[i] = 0.f;
    }
    return;
  }
  MatMulTransposed(q, dims.head_dim, dims.seq, k_t, dims.head_dim, p, probs);
  for (int64_t i = 0; i < dims.seq; ++i) {
    float* row = probs + i * p;
    if (saved_lse) {
      for (int64_t j = 0; j < p; j += kV) Store(row + j, Exp(Load(row + j) - saved_lse[i]) * Load(valid + j));
      continue;
    }
    vec m = Broadcast(-FLT_MAX);
    for (int64_t j = 0; j < p; j += kV) {
      const vec x = Load(valid + j) > 0.f ? Load(row + j) : Broadcast(-FLT_MAX);
      m = x > m ? x : m;
    }
    float row_max = -FLT_MAX;
    for (int c = 0; c < kV; ++c) row_max = std::max(row_max, m[c]);
    vec l = {};
    for (int64_t j = 0; j < p; j += kV) {
      const vec e = Exp(Load(row + j) - row_max) * Load(valid + j);
      Store(row + j, e);
      l += e;
    }
    float sum = 0.f;
    for (int c = 0; c < kV; ++c) sum += l[c];
    const float inverse = 1.f / sum;
    for (int64_t j = 0; j < p; j += kV) Store(row + j, Load(row + j) * inverse);
    lse[i] = row_max + std::log(sum);
  }
}

// keep_scale [seq, padded] from the keep mask [seq, seq]: 1 / keep_prob where kept, else 0 (padding 0).
void KeepScale(const Dims& dims, const uint8_t* keep, float keep_prob, float* keep_scale) {
  const float kept = 1.f / keep_prob;
  for (int64_t i = 0; i < dims.seq; ++i) {
    for (int64_t j = 0; j < dims.seq; ++j) keep_scale[i * dims.padded + j] = keep[i * dims.seq + j] ? kept : 0.f;
    for (int64_t j = dims.seq; j < dims.padded; ++j) keep_scale[i * dims.padded + j] = 0.f;
  }
}

// out = x * keep_scale, elementwise over [seq, padded] (in place when out == x).
void Drop(const Dims& dims, const float* x, const float* keep_scale, float* out) {
  for (int64_t ij = 0; ij < dims.seq * dims.padded; ij += kV) Store(out + ij, Load(x + ij) * Load(keep_scale + ij));
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::U8> key_valid, ffi::Buffer<ffi::U8> keep, ffi::ResultBuffer<ffi::F32> context,
                   ffi::ResultBuffer<ffi::F32> lse, float root, float keep_prob) {
  const Dims dims = GetDims(q);
  const bool dropout = keep_prob < 1.f;
  if (!SameShape(dims, k, v) || !MasksFit(dims, key_valid, keep, dropout))
    return ffi::Error::InvalidArgument("attention: k, v, key_valid or keep do not match q's shape");
  ForEachGroup(pool, dims, [&](int64_t b, int64_t h0, int64_t group) {
    const int64_t n = dims.seq, p = dims.padded, d = dims.head_dim;
    thread_local std::vector<float> buffers[6];
    float* valid = Scratch(buffers[0], p);
    float* queries = Scratch(buffers[1], group * p * d);
    float* keys_t = Scratch(buffers[2], group * d * p);
    float* values = Scratch(buffers[3], group * p * d);
    float* probs = Scratch(buffers[4], n * p + (dropout ? n * p : 0));
    float* out = Scratch(buffers[5], group * n * d);
    const bool uniform = KeyWeights(dims, key_valid.typed_data(), b, valid);
    Gather(dims, q.typed_data(), b, h0, group, 1.f / root, false, queries);
    Gather(dims, k.typed_data(), b, h0, group, 1.f, true, keys_t);
    Gather(dims, v.typed_data(), b, h0, group, 1.f, false, values);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t bh = b * dims.heads + h0 + g;
      Softmax(dims, queries + g * p * d, keys_t + g * d * p, valid, uniform, nullptr, lse->typed_data() + bh * n,
              probs);
      if (dropout) {
        float* keep_scale = probs + n * p;
        KeepScale(dims, keep.typed_data() + bh * n * n, keep_prob, keep_scale);
        Drop(dims, probs, keep_scale, probs);
      }
      MatMul(probs, p, 1, n, p, values + g * p * d, d, out + g * n * d, d);
    }
    Scatter(dims, out, b, h0, group, context->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::U8> key_valid, ffi::Buffer<ffi::U8> keep, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> d_context, ffi::ResultBuffer<ffi::F32> d_q, ffi::ResultBuffer<ffi::F32> d_k,
                    ffi::ResultBuffer<ffi::F32> d_v, float root, float keep_prob) {
  const Dims dims = GetDims(q);
  const bool dropout = keep_prob < 1.f;
  if (!SameShape(dims, k, v, d_context) || !MasksFit(dims, key_valid, keep, dropout))
    return ffi::Error::InvalidArgument("attention backward: k, v, d_context, key_valid or keep do not match q's shape");
  ForEachGroup(pool, dims, [&](int64_t b, int64_t h0, int64_t group) {
    const int64_t n = dims.seq, p = dims.padded, d = dims.head_dim;
    thread_local std::vector<float> buffers[12];
    float* valid = Scratch(buffers[0], p);
    float* queries = Scratch(buffers[1], group * p * d);   // q / root, [group][padded][d]
    float* keys_t = Scratch(buffers[2], group * d * p);    // [group][d][padded]
    float* keys = Scratch(buffers[3], group * p * d);      // [group][padded][d]
    float* values_t = Scratch(buffers[4], group * d * p);  // [group][d][padded]
    float* d_out = Scratch(buffers[5], group * p * d);     // [group][padded][d]
    float* probs = Scratch(buffers[6], n * p);
    float* d_scores = Scratch(buffers[7], n * p);
    float* keep_scale = Scratch(buffers[8], dropout ? n * p : 0);
    float* dq = Scratch(buffers[9], group * n * d);
    float* dk = Scratch(buffers[10], group * n * d);
    float* dv = Scratch(buffers[11], group * n * d);
    const bool uniform = KeyWeights(dims, key_valid.typed_data(), b, valid);
    Gather(dims, q.typed_data(), b, h0, group, 1.f / root, false, queries);
    Gather(dims, k.typed_data(), b, h0, group, 1.f, true, keys_t);
    Gather(dims, k.typed_data(), b, h0, group, 1.f, false, keys);
    Gather(dims, v.typed_data(), b, h0, group, 1.f, true, values_t);
    Gather(dims, d_context.typed_data(), b, h0, group, 1.f, false, d_out);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t bh = b * dims.heads + h0 + g;
      const float* q_g = queries + g * p * d;
      const float* d_out_g = d_out + g * p * d;
      Softmax(dims, q_g, keys_t + g * d * p, valid, uniform, lse.typed_data() + bh * n, nullptr, probs);
      // d_v = dropped_probs^T . d_out
      const float* dropped = probs;
      if (dropout) {
        KeepScale(dims, keep.typed_data() + bh * n * n, keep_prob, keep_scale);
        Drop(dims, probs, keep_scale, d_scores);
        dropped = d_scores;
      }
      MatMul(dropped, 1, p, n, n, d_out_g, d, dv + g * n * d, d);  // dropped^T
      // d_probs = d_out . v^T, back through the dropout; d_scores = probs * (d_probs - rowsum(probs * d_probs))
      MatMulTransposed(d_out_g, d, n, values_t + g * d * p, d, p, d_scores);
      if (dropout) Drop(dims, d_scores, keep_scale, d_scores);
      for (int64_t i = 0; i < n; ++i) {
        float* row = d_scores + i * p;
        const float* prob = probs + i * p;
        vec dot = {};
        for (int64_t j = 0; j < p; j += kV) dot += Load(prob + j) * Load(row + j);
        float delta = 0.f;
        for (int c = 0; c < kV; ++c) delta += dot[c];
        for (int64_t j = 0; j < p; j += kV) Store(row + j, Load(prob + j) * (Load(row + j) - delta));
      }
      if (uniform) std::fill(d_scores, d_scores + n * p, 0.f);  // the scores were constants
      // d_q = d_scores . k / root; d_k = d_scores^T . (q / root)
      float* dq_g = dq + g * n * d;
      MatMul(d_scores, p, 1, n, p, keys + g * p * d, d, dq_g, d);
      for (int64_t i = 0; i < n * d; ++i) dq_g[i] /= root;
      MatMul(d_scores, 1, p, n, n, q_g, d, dk + g * n * d, d);  // d_scores^T
    }
    Scatter(dims, dq, b, h0, group, d_q->typed_data());
    Scatter(dims, dk, b, h0, group, d_k->typed_data());
    Scatter(dims, dv, b, h0, group, d_v->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

// What both handlers take first: the thread pool, then q, k, v, key_valid and keep.
auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()  // q
      .Arg<ffi::Buffer<ffi::F32>>()  // k
      .Arg<ffi::Buffer<ffi::F32>>()  // v
      .Arg<ffi::Buffer<ffi::U8>>()   // key_valid
      .Arg<ffi::Buffer<ffi::U8>>();  // keep
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BertJaxAttentionForward, Forward,
                              BindInputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // context
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("root")
                                  .Attr<float>("keep_prob"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BertJaxAttentionBackward, Backward,
                              BindInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_context
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_v
                                  .Attr<float>("root")
                                  .Attr<float>("keep_prob"));
