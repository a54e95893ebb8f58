// Copies a batch of rows out of memory-mapped shard files into one buffer, for
// shard_rows.py: now, or on a worker thread (lumenvq_worker_new), so that the host reader
// reads ahead without a Python thread, whose hand-offs of the GIL cost more than the copy of
// a 64-passage batch. numpy gathers from one array only, which
// cost a sorted copy plus a reordering copy, and the per-batch bookkeeping (shard of each id,
// its address, whether it is open and verified) cost a dozen small numpy calls; here it is
// one pass. Called through ctypes, which releases the GIL.
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace {

// Where the rows are: row r lives in shard s = r / shard_rows at bases[s] + (r % shard_rows)
// * stride (bases[s] == 0: that shard is not open, or not in row order); verified[r]: its
// checksum was checked; used[s]: stamped with `clock` when shard s is read.
struct Layout {
  int64_t num_rows, shard_rows;
  const uint64_t* bases;
  const uint8_t* verified;
  int64_t* used;
  int64_t clock, stride;
};

// -1 with `sources` filled and the shards stamped, or the first i whose id is outside
// [0, num_rows), whose shard has no base, or whose row is not verified (nothing stamped).
int64_t Locate(const Layout& at, const int64_t* ids, int64_t n, uint64_t* sources) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    if (id < 0 || id >= at.num_rows || at.bases[id / at.shard_rows] == 0 || !at.verified[id]) {
      return i;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t shard = ids[i] / at.shard_rows;
    at.used[shard] = at.clock;
    sources[i] = at.bases[shard] + (ids[i] - shard * at.shard_rows) * at.stride;
  }
  return -1;
}

void Copy(const uint64_t* sources, int64_t n, int64_t row_bytes, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(out + i * row_bytes, reinterpret_cast<const void*>(sources[i]), row_bytes);
  }
}

// One thread copying the batches handed to it, in order; tickets count them.
class Worker {
 public:
  Worker() : thread_([this] { Run(); }) {}
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }
  int64_t Submit(std::vector<uint64_t> sources, int64_t row_bytes, uint8_t* out) {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back({std::move(sources), row_bytes, out});
    wake_.notify_one();
    return submitted_++;
  }
  void Wait(int64_t ticket) {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return completed_ > ticket; });
  }

 private:
  struct Job {
    std::vector<uint64_t> sources;
    int64_t row_bytes;
    uint8_t* out;
  };
  void Run() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
        if (jobs_.empty()) return;  // Stopping, with every job copied.
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      Copy(job.sources.data(), static_cast<int64_t>(job.sources.size()), job.row_bytes,
           job.out);
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++completed_;
      }
      done_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::deque<Job> jobs_;
  int64_t submitted_ = 0, completed_ = 0;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace

extern "C" {

// Copies rows ids[0..n) into out (n x row_bytes) and returns -1, or returns Locate's index
// having copied nothing. With a `worker` the copy runs on its thread: *ticket is set, and out
// is complete once lumenvq_worker_wait(worker, *ticket) returns. The addresses are taken now,
// so the caller may not unmap a shard until the worker has drained (lumenvq_worker_wait of
// the last ticket), nor free `out` before its ticket is done.
int64_t lumenvq_gather_rows(void* worker, const int64_t* ids, int64_t n, int64_t num_rows,
                            int64_t shard_rows, const uint64_t* bases, const uint8_t* verified,
                            int64_t* used, int64_t clock, int64_t stride, int64_t row_bytes,
                            uint8_t* out, int64_t* ticket) {
  const Layout at{num_rows, shard_rows, bases, verified, used, clock, stride};
  std::vector<uint64_t> sources(n);
  const int64_t missing = Locate(at, ids, n, sources.data());
  if (missing >= 0) return missing;
  if (worker == nullptr) {
    Copy(sources.data(), n, row_bytes, out);
  } else {
    *ticket = static_cast<Worker*>(worker)->Submit(std::move(sources), row_bytes, out);
  }
  return -1;
}

void* lumenvq_worker_new() { return new Worker(); }
void lumenvq_worker_wait(void* worker, int64_t ticket) {
  static_cast<Worker*>(worker)->Wait(ticket);
}
// Copies what it was given, then ends its thread.
void lumenvq_worker_free(void* worker) { delete static_cast<Worker*>(worker); }

}  // extern "C"
