// XLA FFI handlers: 2x2 / stride 2 max-pooling, float32 NHWC, forward (with
// each output's winning position, 0-3, as uint8) and backward (dy routed to
// the winner). Windows are scanned (0,0), (0,1), (1,0), (1,1) and the first
// maximum wins ties (pfa_jax.pool). Leading dims are looped over as one
// batch (vmap_method='broadcast_all'): x is [..., H, W, C], H and W even.
// Runs on the oneDNN calls' team thread.
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <functional>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

ffi::Error PfaOnTeamThread(const std::function<ffi::Error()>& task);

namespace {

struct Dims {
  int64_t rows, h, w, c;  // rows = product of the dims before H
};

ffi::Error GetDims(ffi::Span<const int64_t> d, Dims* out) {
  const size_t r = d.size();
  if (r < 3) return ffi::Error::InvalidArgument("pool: rank < 3");
  out->h = d[r - 3], out->w = d[r - 2], out->c = d[r - 1];
  if (out->h % 2 || out->w % 2)
    return ffi::Error::InvalidArgument("pool: odd H or W");
  out->rows = 1;
  for (size_t i = 0; i + 3 < r; ++i) out->rows *= d[i];
  return ffi::Error::Success();
}

int TeamSize(int64_t threads) {
  return threads > 0 ? static_cast<int>(threads) : omp_get_max_threads();
}

ffi::Error Fwd(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
               ffi::ResultBuffer<ffi::U8> arg, int64_t threads) {
  Dims d;
  if (auto e = GetDims(x.dimensions(), &d); e.failure()) return e;
  return PfaOnTeamThread([&]() -> ffi::Error {
    const int64_t ho = d.h / 2, wo = d.w / 2, c = d.c;
    const float* xs = x.typed_data();
    float* ys = y->typed_data();
    uint8_t* as = arg->typed_data();
#pragma omp parallel for num_threads(TeamSize(threads)) schedule(static)
    for (int64_t ri = 0; ri < d.rows * ho; ++ri) {
      const int64_t n = ri / ho, i = ri % ho;
      const float* top = xs + ((n * d.h + 2 * i) * d.w) * c;
      const float* bot = top + d.w * c;
      for (int64_t j = 0; j < wo; ++j) {
        const float* a = top + 2 * j * c;
        const float* b = bot + 2 * j * c;
        float* o = ys + (ri * wo + j) * c;
        uint8_t* g = as + (ri * wo + j) * c;
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) {
          float m = a[k];
          uint8_t w = 0;
          if (a[c + k] > m) m = a[c + k], w = 1;
          if (b[k] > m) m = b[k], w = 2;
          if (b[c + k] > m) m = b[c + k], w = 3;
          o[k] = m;
          g[k] = w;
        }
      }
    }
    return ffi::Error::Success();
  });
}

ffi::Error Bwd(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::U8> arg,
               ffi::ResultBuffer<ffi::F32> dx, int64_t threads) {
  Dims d;
  if (auto e = GetDims(dx->dimensions(), &d); e.failure()) return e;
  return PfaOnTeamThread([&]() -> ffi::Error {
    const int64_t ho = d.h / 2, wo = d.w / 2, c = d.c;
    const float* gs = dy.typed_data();
    const uint8_t* as = arg.typed_data();
    float* xs = dx->typed_data();
#pragma omp parallel for num_threads(TeamSize(threads)) schedule(static)
    for (int64_t ri = 0; ri < d.rows * ho; ++ri) {
      const int64_t n = ri / ho, i = ri % ho;
      float* top = xs + ((n * d.h + 2 * i) * d.w) * c;
      float* bot = top + d.w * c;
      for (int64_t j = 0; j < wo; ++j) {
        float* a = top + 2 * j * c;
        float* b = bot + 2 * j * c;
        const float* g = gs + (ri * wo + j) * c;
        const uint8_t* w = as + (ri * wo + j) * c;
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) {
          a[k] = w[k] == 0 ? g[k] : 0.0f;
          a[c + k] = w[k] == 1 ? g[k] : 0.0f;
          b[k] = w[k] == 2 ? g[k] : 0.0f;
          b[c + k] = w[k] == 3 ? g[k] : 0.0f;
        }
      }
    }
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaMaxPool2Fwd, Fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaMaxPool2Bwd, Bwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
