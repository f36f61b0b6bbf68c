// XLA FFI handler: inverted dropout with a counter-based mask, float32
// (pfa_jax.fused_bn.dropout).
//
//   y[i] = x[i] / (1 - rate) if u(seed, i) >= rate else 0
//
// u(seed, i) is a uniform 32-bit number from splitmix64's finaliser of
// (seed, i / 2) (each 64-bit hash gives two elements). The mask is a pure
// function of (seed, i), so the backward pass is this same call on the
// cotangent (dropout is linear and self-adjoint) and nothing is stored.
//
// Operands: x [G..., M] and seed u32 [G..., 2]: G leading (vmap) groups,
// each with its own seed. Runs on the oneDNN calls' team thread.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

ffi::Error PfaOnTeamThread(const std::function<ffi::Error()>& task);

namespace {

constexpr int64_t kBlock = 512;

inline uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

ffi::Error Dropout(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> seed,
                   ffi::ResultBuffer<ffi::F32> y, float rate,
                   int64_t threads) {
  const int64_t groups = seed.element_count() / 2;
  if (groups < 1 || seed.element_count() != 2 * groups ||
      x.element_count() % groups != 0)
    return ffi::Error::InvalidArgument("dropout: bad seed shape");
  if (!(rate >= 0.0f && rate < 1.0f))
    return ffi::Error::InvalidArgument("dropout: rate must be in [0, 1)");
  const int64_t m = x.element_count() / groups;
  // Keep when u >= threshold; u is uniform on [0, 2^32).
  const uint32_t threshold = static_cast<uint32_t>(
      std::min(static_cast<double>(rate) * 4294967296.0, 4294967295.0));
  const float scale = 1.0f / (1.0f - rate);
  return PfaOnTeamThread([&]() -> ffi::Error {
    const int team = threads > 0 ? static_cast<int>(threads) : omp_get_max_threads();
    for (int64_t g = 0; g < groups; ++g) {
      const uint32_t* s = seed.typed_data() + 2 * g;
      const uint64_t key = Mix((static_cast<uint64_t>(s[0]) << 32) | s[1]);
      const float* xg = x.typed_data() + g * m;
      float* yg = y->typed_data() + g * m;
      // Blocks of kBlock elements: one loop of 64-bit hashes, then one of
      // selects over their 32-bit halves (both vectorise). Element 2p takes
      // hash p's low half, 2p + 1 its high half.
      const int64_t blocks = (m + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(team) schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        uint64_t h[kBlock / 2];
        const uint64_t p0 = static_cast<uint64_t>(b) * (kBlock / 2);
#pragma omp simd
        for (int64_t j = 0; j < kBlock / 2; ++j)
          h[j] = Mix(key + 0x9e3779b97f4a7c15ULL * (p0 + j + 1));
        uint32_t u[kBlock];
        std::memcpy(u, h, sizeof(u));  // little-endian: low half first
        const int64_t i0 = b * kBlock;
        const int64_t n = std::min<int64_t>(kBlock, m - i0);
        const float* xb = xg + i0;
        float* yb = yg + i0;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j)
          yb[j] = u[j] >= threshold ? xb[j] * scale : 0.0f;
      }
    }
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaDropout, Dropout,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("rate")
                                  .Attr<int64_t>("threads"));
