// Copies rows from arbitrary host addresses into one buffer, for shard_rows.py: a batch of
// passages lives in several memory-mapped shard files, and numpy gathers from one array only,
// which cost a sorted copy plus a reordering copy (about 0.35 of a numpy memmap read of the
// same rows); this is the single copy. Called through ctypes, which releases the GIL.
#include <cstdint>
#include <cstring>

extern "C" void lumenvq_gather_rows(const uint64_t* sources, int64_t n, int64_t row_bytes,
                                    uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(out + i * row_bytes, reinterpret_cast<const void*>(sources[i]), row_bytes);
  }
}
