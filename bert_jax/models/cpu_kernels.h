// What the C++ kernels for XLA:CPU share (`cpu_attention.cc`, `cpu_add_norm.cc`): GCC's vector type and
// a parallel loop over XLA's intra-op thread pool. Built with each kernel by `cpu_build.py`.

#ifndef BERT_JAX_CPU_KERNELS_H_
#define BERT_JAX_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace bert_jax {

constexpr int kV = 16;  // floats per vector (GCC vector extension: AVX-512, or split by the compiler)

typedef float vec __attribute__((vector_size(64), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(64), aligned(4)));

inline vec Load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void Store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
inline vec Broadcast(float x) { return vec{} + x; }

// Runs body(i) for i in [0, n) on XLA's intra-op thread pool and the calling thread; returns when all are done.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  // A helper that starts after all items are taken touches only `state` (shared), never `body`.
  auto work = [state, n, &body]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace bert_jax

#endif  // BERT_JAX_CPU_KERNELS_H_
