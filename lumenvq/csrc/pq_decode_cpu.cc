// Product-quantization decode for XLA:CPU, registered through the XLA FFI (pq_decode_cpu.py).
//
// Why by hand: XLA:CPU lowers the decode gather to a loop of small dynamic slices that reached
// 0.5-0.7 of FAISS's decode (benchmarks/pq_vs_faiss.py); this is FAISS's loop (one fixed-size
// copy per subvector), run once per device, so data-parallel devices use every core.
//
//   codes     [n, G]      uint8 / uint16 / int32
//   codebooks [G, C, s]   float32
//   out       [n, G * s]  float32: out[i, g*s : (g+1)*s] = codebooks[g, codes[i, g]]
// A code outside [0, C) gives a NaN subvector, as the XLA path does.
#include <cstdint>
#include <cstring>
#include <limits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// S > 0: the subvector size is a compile-time constant, so the copy is a few vector moves.
template <typename Code, int64_t S>
void DecodeRows(const Code* codes, const float* codebooks, float* out, int64_t n, int64_t g,
                int64_t c, int64_t s_runtime) {
  const int64_t s = S > 0 ? S : s_runtime;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < n; ++i) {
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

template <typename Code>
void Decode(const void* codes, const float* codebooks, float* out, int64_t n, int64_t g,
            int64_t c, int64_t s) {
  const Code* p = static_cast<const Code*>(codes);
  switch (s) {
    case 2: return DecodeRows<Code, 2>(p, codebooks, out, n, g, c, s);
    case 4: return DecodeRows<Code, 4>(p, codebooks, out, n, g, c, s);
    case 8: return DecodeRows<Code, 8>(p, codebooks, out, n, g, c, s);
    case 16: return DecodeRows<Code, 16>(p, codebooks, out, n, g, c, s);
    case 32: return DecodeRows<Code, 32>(p, codebooks, out, n, g, c, s);
    default: return DecodeRows<Code, 0>(p, codebooks, out, n, g, c, s);
  }
}

ffi::Error PqDecode(ffi::AnyBuffer codes, ffi::Buffer<ffi::F32> codebooks,
                    ffi::ResultBuffer<ffi::F32> out) {
  const auto cd = codes.dimensions();
  const auto cb = codebooks.dimensions();
  const auto od = out->dimensions();
  if (cb.size() != 3 || cd.size() != 2 || cd[1] != cb[0] || od.size() != 2 ||
      od[0] != cd[0] || od[1] != cb[0] * cb[2]) {
    return ffi::Error::InvalidArgument(
        "pq decode: expected codes [n, G], codebooks [G, C, s] and out [n, G * s]");
  }
  const int64_t n = cd[0], g = cb[0], c = cb[1], s = cb[2];
  const float* books = codebooks.typed_data();
  float* o = out->typed_data();
  switch (codes.element_type()) {
    case ffi::DataType::U8: Decode<uint8_t>(codes.untyped_data(), books, o, n, g, c, s); break;
    case ffi::DataType::U16: Decode<uint16_t>(codes.untyped_data(), books, o, n, g, c, s); break;
    case ffi::DataType::S32: Decode<int32_t>(codes.untyped_data(), books, o, n, g, c, s); break;
    default:
      return ffi::Error::InvalidArgument("pq decode: codes must be uint8, uint16 or int32");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LumenvqPqDecode, PqDecode,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
