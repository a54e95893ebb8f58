// Product-quantization decode for XLA:CPU, registered through the XLA FFI (pq_decode_cpu.py).
//
// Why by hand: XLA:CPU lowers the decode gather to a loop of small dynamic slices that reached
// 0.5-0.7 of FAISS's decode (benchmarks/pq_vs_faiss.py). This is FAISS's loop (one fixed-size
// copy per subvector), its rows split over up to `threads` threads of XLA's intra-op pool as
// FAISS splits them over OpenMP threads, so one CPU device uses every core. With a CPU device
// per core (--xla_force_host_platform_device_count) the caller passes threads = 1: helpers on
// top of data-parallel devices measured up to 1.5x slower.
//
//   codes     [n, G]      uint8 / uint16 / int32
//   codebooks [G, C, s]   float32
//   out       [n, G * s]  float32: out[i, g*s : (g+1)*s] = codebooks[g, codes[i, g]]
// A code outside [0, C) gives a NaN subvector, as the XLA path does.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockBytes = 128 << 10;  // Output rows per task: enough to amortise it.

// A large output is fresh memory from XLA's allocator (mmap) on every call, and faulting it in
// 4 KB pages cost more than the decode: 0.23 of FAISS at 20k x 512 floats on one device,
// whose numpy output asks for huge pages. So does this, as numpy does for arrays >= 4 MB.
void AdviseHugePages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2 << 20;
  if (bytes < (4 << 20)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// S > 0: the subvector size is a compile-time constant, so the copy is a few vector moves.
template <typename Code, int64_t S>
void DecodeRows(const void* code_data, const float* codebooks, float* out, int64_t begin,
                int64_t end, int64_t g, int64_t c, int64_t s_runtime) {
  const Code* codes = static_cast<const Code*>(code_data);
  const int64_t s = S > 0 ? S : s_runtime;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t j = 0; j < g; ++j) {
      const int64_t code = static_cast<int64_t>(codes[i * g + j]);
      float* dst = out + (i * g + j) * s;
      if (__builtin_expect(code < 0 || code >= c, 0)) {
        for (int64_t k = 0; k < s; ++k) dst[k] = nan;
      } else {
        std::memcpy(dst, codebooks + (j * c + code) * s, s * sizeof(float));
      }
    }
  }
}

using DecodeFn = void (*)(const void*, const float*, float*, int64_t, int64_t, int64_t,
                          int64_t, int64_t);

template <typename Code>
DecodeFn ForSize(int64_t s) {
  switch (s) {
    case 2: return DecodeRows<Code, 2>;
    case 4: return DecodeRows<Code, 4>;
    case 8: return DecodeRows<Code, 8>;
    case 16: return DecodeRows<Code, 16>;
    case 32: return DecodeRows<Code, 32>;
    default: return DecodeRows<Code, 0>;
  }
}

// Blocks of rows, claimed from a counter by the calling thread and by helper tasks on the
// pool. The caller waits only for blocks a helper has claimed (running now), never for a task
// that has not started, so a busy pool cannot deadlock it; a helper that starts late finds
// nothing left and only drops its reference to this shared state.
struct Blocks {
  DecodeFn fn;
  const void* codes;
  const float* codebooks;
  float* out;
  int64_t n, g, c, s, rows_per_block, count;
  std::atomic<int64_t> next{0}, finished{0};
  std::mutex mu;
  std::condition_variable all_finished;

  void Work() {
    for (int64_t b; (b = next.fetch_add(1)) < count;) {
      const int64_t begin = b * rows_per_block;
      fn(codes, codebooks, out, begin, std::min(n, begin + rows_per_block), g, c, s);
      if (finished.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mu);
        all_finished.notify_all();
      }
    }
  }
};

ffi::Error PqDecode(ffi::AnyBuffer codes, ffi::Buffer<ffi::F32> codebooks,
                    ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool, int64_t threads) {
  const auto cd = codes.dimensions();
  const auto cb = codebooks.dimensions();
  const auto od = out->dimensions();
  if (cb.size() != 3 || cd.size() != 2 || cd[1] != cb[0] || od.size() != 2 ||
      od[0] != cd[0] || od[1] != cb[0] * cb[2]) {
    return ffi::Error::InvalidArgument(
        "pq decode: expected codes [n, G], codebooks [G, C, s] and out [n, G * s]");
  }
  auto blocks = std::make_shared<Blocks>();
  const int64_t n = cd[0], g = cb[0], c = cb[1], s = cb[2];
  const int64_t row_bytes = std::max<int64_t>(1, g * s * sizeof(float));
  switch (codes.element_type()) {
    case ffi::DataType::U8: blocks->fn = ForSize<uint8_t>(s); break;
    case ffi::DataType::U16: blocks->fn = ForSize<uint16_t>(s); break;
    case ffi::DataType::S32: blocks->fn = ForSize<int32_t>(s); break;
    default:
      return ffi::Error::InvalidArgument("pq decode: codes must be uint8, uint16 or int32");
  }
  blocks->codes = codes.untyped_data();
  blocks->codebooks = codebooks.typed_data();
  blocks->out = out->typed_data();
  blocks->n = n, blocks->g = g, blocks->c = c, blocks->s = s;
  AdviseHugePages(blocks->out, n * row_bytes);
  blocks->rows_per_block = std::max<int64_t>(1, kBlockBytes / row_bytes);
  blocks->count = (n + blocks->rows_per_block - 1) / blocks->rows_per_block;
  const int64_t helpers = std::min({threads - 1, pool.num_threads(), blocks->count - 1});
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([blocks] { blocks->Work(); });
  blocks->Work();
  std::unique_lock<std::mutex> lock(blocks->mu);
  blocks->all_finished.wait(lock, [&] { return blocks->finished.load() == blocks->count; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LumenvqPqDecode, PqDecode,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("threads"));
