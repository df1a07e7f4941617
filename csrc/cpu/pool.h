// fastlm's own thread pool for decode-sized work on the CPU: the integer-dot matmuls, decode
// attention and the fused decode block.
//
// Why not OpenMP (at::parallel_for): a decode step is a chain of calls of tens of microseconds.
// An OpenMP region waits at its closing barrier for every thread of its team, whole scheduler
// quanta on a busy machine, and its workers spin on for milliseconds afterwards, on the cores the
// next call's threads need. Here work is claimed in chunks from a shared counter, the caller
// waits only for chunks that were claimed, and the helpers spin briefly, then sleep.
//
// No ATen in this header: the kernel files include it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastlm::pool {

// fn(ctx, c) for every c in [0, chunks), claimed by the calling thread (from the front) and up to
// `helpers` helpers (from the back); returns once every chunk is done. A helper that wakes after
// the last chunk was claimed finds nothing and returns, and nobody waits for it.
void parallel_chunks(int64_t chunks, int helpers, void (*fn)(void*, int64_t), void* ctx);

// How many helpers `chunks` chunks can use: at most one per chunk past the first, and none beyond
// torch's thread count less the caller (at::get_num_threads() - 1), nor inside a parallel region.
int helpers_for(int64_t chunks);

// Whether a helper is awake now (working or spinning), so that handing it work costs no system
// call: on a VM waking a sleeping thread cost the caller ~35 us (Intel Xeon, 2 vCPUs).
bool helpers_awake();

// f(begin, end) over [0, n) in tasks of `grain` (the last one shorter), on this pool.
template <typename F>
void parallel_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  struct Ctx {
    const F* f;
    int64_t n, grain;
  } cx{&f, n, grain};
  const int64_t chunks = (n + grain - 1) / grain;
  parallel_chunks(chunks, helpers_for(chunks), [](void* v, int64_t c) {
    const Ctx& x = *static_cast<const Ctx*>(v);
    (*x.f)(c * x.grain, std::min(x.n, (c + 1) * x.grain));
  }, &cx);
}

struct Range {
  const void* p;
  int64_t bytes;
};
constexpr int kMaxRanges = 4;

// A hint that a call of parallel_chunks comes soon, with the bytes it will read (up to
// kMaxRanges ranges; none is fine): the helpers stay awake for it, spinning instead of sleeping
// for a while, and meanwhile read the ends of the ranges into their caches, where the chunks they
// claim first lie. A caller that has single-threaded work to do before the call (the norms,
// rotary and attention between the matmuls of a decode block) so overlaps that work with
// the next call's memory traffic and with waking the helpers.
void prepare(const Range* ranges, int n);

}  // namespace fastlm::pool
