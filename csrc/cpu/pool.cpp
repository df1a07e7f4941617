// fastlm's thread pool (pool.h).
#include "cpu/pool.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

namespace fastlm::pool {
namespace {

// How long an idle helper spins for the next call before it sleeps: a decode step calls again
// within microseconds. Bounded by time, not by a count of pauses (a pause is 10 to 140 cycles
// depending on the CPU): a longer spin holds a core that the next op's own threads (OpenMP's)
// need, and on a 2-core machine that costs them a scheduler slice.
constexpr int kSpinMicros = 50;
// After a prepare() hint the caller has said that a call follows: spin up to this long for it.
constexpr int kHoldMicros = 1000;
// The bytes of a hint's ranges a helper reads ahead: a part of its L2 (Intel Xeon, 1.25 MiB L2,
// the fused decode block's projections at batch 1: 256 KiB read ahead gave proj 71-73 us against
// 83-86 with none; 1 MiB was no better).
constexpr int64_t kReadAheadBytes = 256 << 10;

thread_local bool t_helper = false;  // this thread is one of the pool's helpers

struct Job {
  // Chunks [front, back) are unclaimed, front in the low 32 bits: the caller claims from the
  // front, helpers from the back, where a prepare() hint's read-ahead was.
  std::atomic<uint64_t> ends{0};
  std::atomic<int64_t> done{0};
  int helpers = 0;
  void (*fn)(void*, int64_t) = nullptr;  // null: a prepare() hint
  void* ctx = nullptr;
  Range ranges[kMaxRanges];
  int nranges = 0;
};

int64_t claim(Job& j, bool from_back) {
  uint64_t e = j.ends.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t front = e & 0xffffffffu, back = e >> 32;
    if (front >= back) return -1;
    const uint64_t next = from_back ? ((back - 1) << 32 | front) : (back << 32 | (front + 1));
    if (j.ends.compare_exchange_weak(e, next, std::memory_order_relaxed)) {
      return static_cast<int64_t>(from_back ? back - 1 : front);
    }
  }
}

// Claims chunks until none is left. fn and ctx point into the caller's frame, which outlives
// every claimed chunk: the caller returns only when `done` has counted them all.
void work(Job& j, bool from_back) {
  for (int64_t c; (c = claim(j, from_back)) >= 0;) {
    j.fn(j.ctx, c);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

class Pool {
 public:
  void run(int64_t chunks, int helpers, void (*fn)(void*, int64_t), void* ctx) {
    auto job = std::make_shared<Job>();
    job->ends.store(static_cast<uint64_t>(chunks) << 32);
    job->helpers = helpers;
    job->fn = fn;
    job->ctx = ctx;
    post(job);
    work(*job, false);
    // Wait only for chunks that were claimed: a helper still asleep holds none.
    for (int spin = 0; job->done.load(std::memory_order_acquire) < chunks; ++spin) {
      if (spin < 4096) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

  bool awake() const { return started_.load(std::memory_order_relaxed) > sleepers_.load(std::memory_order_relaxed); }

  void prepare(const Range* ranges, int n, int helpers) {
    auto job = std::make_shared<Job>();
    job->helpers = helpers;
    job->nranges = std::min(n, kMaxRanges);
    std::copy(ranges, ranges + job->nranges, job->ranges);
    post(job);
  }

 private:
  void post(const std::shared_ptr<Job>& job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (started_.load(std::memory_order_relaxed) < job->helpers) {
        const int index = started_++;
        // Detached: the pool lives as long as the process (a fork's child builds a new one).
        std::thread([this, index] { loop(index); }).detach();
      }
      job_ = job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    // A helper that is spinning sees gen_ change; only a sleeping one needs the (system) call.
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
  }

  // The hint's ranges from their ends backwards into this core's caches (each range its share of
  // kReadAheadBytes), until the next job arrives.
  void read_ahead(const Job& j, uint64_t seen) {
    int64_t total = 0;
    for (int i = 0; i < j.nranges; ++i) total += j.ranges[i].bytes;
    for (int i = 0; i < j.nranges; ++i) {
      const char* p = static_cast<const char*>(j.ranges[i].p);
      int64_t budget = total > kReadAheadBytes ? kReadAheadBytes * j.ranges[i].bytes / total : j.ranges[i].bytes;
      for (int64_t off = (j.ranges[i].bytes - 1) & ~int64_t{63}; off >= 0 && budget > 0; off -= 64, budget -= 64) {
        _mm_prefetch(p + off, _MM_HINT_T1);
        if ((off & 4095) == 0 && gen_.load(std::memory_order_acquire) != seen) return;
      }
    }
  }

  void loop(int index) {
    t_helper = true;
    uint64_t seen = gen_.load(std::memory_order_acquire);
    bool hold = false;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(hold ? kHoldMicros : kSpinMicros);
      for (int spin = 0; gen_.load(std::memory_order_acquire) == seen; ++spin) {
        _mm_pause();
        if (spin % 64 == 63 && std::chrono::steady_clock::now() > until) break;
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lock, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_acq_rel);
        seen = gen_.load(std::memory_order_acquire);
        job = job_;
      }
      hold = false;
      if (!job || index >= job->helpers) continue;
      if (job->fn) {
        work(*job, true);
      } else {
        read_ahead(*job, seen);
        hold = true;
      }
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleepers_{0};
  std::shared_ptr<Job> job_;
  std::atomic<int> started_{0};
};

std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
  static std::once_flag once;
  std::call_once(once, [] {
    g_pool.store(new Pool());
    // The child of a fork has none of the parent's threads: it starts an empty pool.
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(new Pool()); });
  });
  return *g_pool.load();
}

}  // namespace

int helpers_for(int64_t chunks) {
  if (t_helper || at::in_parallel_region()) return 0;
  return static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(at::get_num_threads() - 1, chunks - 1), 0, 64));
}

bool helpers_awake() { return pool().awake(); }

void parallel_chunks(int64_t chunks, int helpers, void (*fn)(void*, int64_t), void* ctx) {
  // (A job's two ends share one 64-bit word: more than 2^32 chunks run on the caller alone.)
  if (helpers <= 0 || chunks <= 1 || t_helper || chunks > 0xffffffffLL) {
    for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
    return;
  }
  pool().run(chunks, helpers, fn, ctx);
}

void prepare(const Range* ranges, int n) {
  const int helpers = helpers_for(2);
  if (helpers > 0) pool().prepare(ranges, n, helpers);
}

}  // namespace fastlm::pool
