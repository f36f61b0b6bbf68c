// XLA FFI handlers: batch normalisation fused with an optional residual add
// and an optional ReLU, float32, channels last (pfa_jax.fused_bn).
//
//   z = (x - mean) * scale / sqrt(var + eps) + bias [+ residual]
//   y = relu(z) if relu else z
//
// Operands are [G..., M..., C]: x (and residual, y, dy, dx) hold G groups of
// an [M, C] matrix (M = N*H*W rows, channels innermost); scale, bias, mean
// and var are [G..., C]. The leading G dims are vmap's (vmap_method=
// 'broadcast_all' gives every operand the same ones); each group is one
// independent batch norm.
//
// Training forward: one pass of per-channel sums (float over blocks of rows,
// double across blocks and threads), then one elementwise pass. The variance
// is the biased one, E[x^2] - E[x]^2 clipped at 0, as flax computes it.
// Training backward, with dz = dy * (y > 0) (or dy without ReLU):
//   dbias = sum(dz), dscale = sum(dz * xhat), dresidual = dz,
//   dx = scale * rstd * (dz - dbias / M - xhat * dscale / M),
// in one reduction pass and one elementwise pass. Inference is a single
// elementwise pass with the given mean and var.
//
// Threads: an OpenMP team of `threads` (0: OpenMP's default), row-chunked,
// run on the oneDNN convolutions' team thread (one team on the cores at a
// time, one libgomp pool: pfa_jax/native/onednn_conv.cc TeamThread).
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Runs `task` on the oneDNN calls' team thread, one call at a time.
ffi::Error PfaOnTeamThread(const std::function<ffi::Error()>& task);

namespace {

constexpr int64_t kBlock = 64;  // rows summed in float before going double

struct Dims {
  int64_t g, m, c;
};

ffi::Error GetDims(ffi::Span<const int64_t> x, ffi::Span<const int64_t> p,
                   Dims* d) {
  if (p.size() == 0 || x.size() < p.size())
    return ffi::Error::InvalidArgument("fused_bn: bad ranks");
  d->c = p[p.size() - 1];
  d->g = 1;
  for (size_t i = 0; i + 1 < p.size(); ++i) {
    if (x[i] != p[i])
      return ffi::Error::InvalidArgument("fused_bn: batch dims differ");
    d->g *= p[i];
  }
  if (x[x.size() - 1] != d->c)
    return ffi::Error::InvalidArgument("fused_bn: channel counts differ");
  d->m = 1;
  for (size_t i = p.size() - 1; i + 1 < x.size(); ++i) d->m *= x[i];
  return ffi::Error::Success();
}

int Team(int64_t threads) {
  return threads > 0 ? static_cast<int>(threads) : omp_get_max_threads();
}

// A layer narrower than 16 channels, or not a multiple of 16, leaves part of
// a vector idle on every row: at 4-12 channels an inference pass took 4.5-5.7x
// the 16-channel one, on fewer bytes (pruned networks are full of such widths). An [M, C]
// matrix is also an [M / q, q C] one, and with q = 16 / gcd(C, 16) its rows
// are whole vectors; per-channel operands are tiled q times, per-channel
// results folded back. Period(c) is that q, or 1 when q C would exceed
// kMaxPeriod floats (wide layers, where the partial vector costs little).
// PfaSetBnPeriodic(0) walks plain [M, C] rows again: the benchmarks' A/B.
constexpr int64_t kMaxPeriod = 1024;
std::atomic<bool> g_periodic{true};

int64_t Period(int64_t c) {
  const int64_t q = 16 / std::gcd<int64_t>(c, 16);
  return g_periodic.load() && q * c <= kMaxPeriod ? q : 1;
}

std::vector<float> Tile(const float* v, int64_t c, int64_t q) {
  std::vector<float> t(q * c);
  for (int64_t j = 0; j < q; ++j) std::copy(v, v + c, t.begin() + j * c);
  return t;
}

// Runs walk(row0, rows, width, operands) over an [m, c] map: once over its
// whole-vector periods (m / q rows of q c channels, the K per-channel
// operands tiled q times), then over the m % q rows left over (c channels,
// the operands as given). Without a period, once over all m rows.
template <size_t K, typename Walk>
void ForPeriods(int64_t m, int64_t c,
                const std::array<const float*, K>& per_channel, Walk&& walk) {
  const int64_t q = Period(c), body = q > 1 ? m / q * q : 0;
  if (body > 0) {
    std::array<std::vector<float>, K> tiled;
    std::array<const float*, K> ptrs;
    for (size_t k = 0; k < K; ++k) {
      tiled[k] = Tile(per_channel[k], c, q);
      ptrs[k] = tiled[k].data();
    }
    walk(int64_t{0}, m / q, q * c, ptrs);
  }
  if (body < m) walk(body, m - body, c, per_channel);
}

// Per-channel sums over the rows of one [M, C] group, split across the team:
// s1 = sum(a * w), s2 = sum(a * a * w) or sum(a * b * w) where w masks rows
// by `keep` (ReLU's y > 0), each centred on `shift` (b - shift).
// Mode kStats: s1 = sum(x - shift), s2 = sum((x - shift)^2).
// Mode kGrad:  s1 = sum(dz), s2 = sum(dz * (x - shift)), dz = dy [* (y > 0)].
enum Mode { kStats, kGrad };

void SumsRows(Mode mode, const float* x, const float* y, const float* dy,
              const float* shift, bool relu, int64_t m, int64_t c, int team,
              double* s1, double* s2) {
  std::vector<double> part(2 * c * team, 0.0);
#pragma omp parallel num_threads(team)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = m * t / nt, hi = m * (t + 1) / nt;
    double* d1 = part.data() + 2 * c * t;
    double* d2 = d1 + c;
    std::vector<float> f(2 * c);
    float* f1 = f.data();
    float* f2 = f1 + c;
    for (int64_t r0 = lo; r0 < hi; r0 += kBlock) {
      const int64_t r1 = std::min(hi, r0 + kBlock);
      std::fill(f.begin(), f.end(), 0.0f);
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = x + r * c;
        if (mode == kStats) {
#pragma omp simd
          for (int64_t k = 0; k < c; ++k) {
            const float v = xr[k] - shift[k];
            f1[k] += v;
            f2[k] += v * v;
          }
        } else {
          const float* yr = y + r * c;
          const float* gr = dy + r * c;
#pragma omp simd
          for (int64_t k = 0; k < c; ++k) {
            const float g = (!relu || yr[k] > 0.0f) ? gr[k] : 0.0f;
            f1[k] += g;
            f2[k] += g * (xr[k] - shift[k]);
          }
        }
      }
      for (int64_t k = 0; k < c; ++k) d1[k] += f1[k], d2[k] += f2[k];
    }
  }
  for (int64_t k = 0; k < c; ++k) {
    double a = 0.0, b = 0.0;
    for (int t = 0; t < team; ++t) a += part[2 * c * t + k], b += part[2 * c * t + c + k];
    s1[k] = a, s2[k] = b;
  }
}

// SumsRows over the map's periods and leftover rows (ForPeriods), folded
// to C channels.
void Sums(Mode mode, const float* x, const float* y, const float* dy,
          const float* shift, bool relu, int64_t m, int64_t c, int team,
          double* s1, double* s2) {
  std::fill(s1, s1 + c, 0.0);
  std::fill(s2, s2 + c, 0.0);
  ForPeriods<1>(m, c, {shift}, [&](int64_t r0, int64_t rows, int64_t w,
                                   const std::array<const float*, 1>& p) {
    const int64_t o = r0 * c;
    std::vector<double> u1(w), u2(w);
    SumsRows(mode, x + o, y ? y + o : nullptr, dy ? dy + o : nullptr, p[0],
             relu, rows, w, team, u1.data(), u2.data());
    for (int64_t k = 0; k < w; ++k) s1[k % c] += u1[k], s2[k % c] += u2[k];
  });
}

// The elementwise pass, out = act((x - mean) * a + bias [+ res]), walks
// [rows, C] tiles one block of up to 64 channels (1-4 vectors of 16, the
// last one partial) at a time, in GCC's vector extension (16 floats: one
// AVX-512 register, two AVX2 ones elsewhere). With the per-sample spatial max
// (NormalizeMax) the block's running max stays in registers: a max kept in
// memory, loaded and stored every row, chains every row through a
// store-to-load forward, and made that pass 1.8-1.9x plain BN at 32
// channels. The channel loop of fixed width also beats a runtime-length one
// on the narrow layers (16-64 channels) that dominate these networks.
using V16 = float __attribute__((vector_size(64)));

// w <= 16 floats; the full case is one unaligned vector move.
inline V16 Load16(const float* p, int64_t w) {
  V16 v = {};
  if (w == 16)
    std::memcpy(&v, p, sizeof v);
  else
    std::memcpy(&v, p, static_cast<size_t>(w) * sizeof(float));
  return v;
}

inline void Store16(float* p, V16 v, int64_t w) {
  if (w == 16)
    std::memcpy(p, &v, sizeof v);
  else
    std::memcpy(p, &v, static_cast<size_t>(w) * sizeof(float));
}

// `rows` rows (stride c) of B vectors of 16 channels, the first w (in
// (16 * (B - 1), 16 * B]) real; with kMax, m[k] = the block's max over the
// rows. The residual, the ReLU, a partial last vector and the max are
// template arguments so the row loop has no branches.
template <int B, bool kRes, bool kRelu, bool kFull, bool kMax>
void NormalizeBlock(const float* xs, const float* rs, const float* mean,
                    const float* a, const float* bias, int64_t rows, int64_t c,
                    int64_t w, float* os, float* m) {
  constexpr int64_t kW = 16;
  V16 mx[B], mu[B], sc[B], b[B];
  const V16 zero = {};
  for (int j = 0; j < B; ++j) {
    const int64_t wj = std::clamp<int64_t>(w - j * kW, 0, kW);
    mx[j] = zero - INFINITY;
    mu[j] = Load16(mean + j * kW, wj);
    sc[j] = Load16(a + j * kW, wj);
    b[j] = Load16(bias + j * kW, wj);
  }
  const int64_t tail = kFull ? kW : w - (B - 1) * kW;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xs + r * c;
    float* o = os + r * c;
#pragma GCC unroll 4
    for (int j = 0; j < B; ++j) {
      const int64_t wj = (kFull || j < B - 1) ? kW : tail;
      V16 z = (Load16(xr + j * kW, wj) - mu[j]) * sc[j] + b[j];
      if constexpr (kRes) z += Load16(rs + r * c + j * kW, wj);
      if constexpr (kRelu) z = z > zero ? z : zero;
      Store16(o + j * kW, z, wj);
      if constexpr (kMax) mx[j] = z > mx[j] ? z : mx[j];
    }
  }
  if constexpr (kMax)
    for (int j = 0; j < B; ++j)
      Store16(m + j * kW, mx[j], std::clamp<int64_t>(w - j * kW, 0, kW));
}

using BlockFn = void (*)(const float*, const float*, const float*,
                         const float*, const float*, int64_t, int64_t, int64_t,
                         float*, float*);

template <int B, bool kMax>
BlockFn PickBlock(bool res, bool relu, bool full) {
  static constexpr BlockFn fns[8] = {
      NormalizeBlock<B, false, false, false, kMax>,
      NormalizeBlock<B, false, false, true, kMax>,
      NormalizeBlock<B, false, true, false, kMax>,
      NormalizeBlock<B, false, true, true, kMax>,
      NormalizeBlock<B, true, false, false, kMax>,
      NormalizeBlock<B, true, false, true, kMax>,
      NormalizeBlock<B, true, true, false, kMax>,
      NormalizeBlock<B, true, true, true, kMax>,
  };
  return fns[4 * res + 2 * relu + full];
}

// Every block of channels [k, k + 64) of a [rows, c] tile.
template <bool kMax>
void NormalizeTile(const float* x, const float* res, const float* mean,
                   const float* a, const float* bias, bool relu, int64_t rows,
                   int64_t c, float* out, float* m) {
  for (int64_t k = 0; k < c; k += 64) {
    const int64_t w = std::min<int64_t>(64, c - k);
    const bool r = res != nullptr, full = w % 16 == 0;
    const BlockFn block = w > 48   ? PickBlock<4, kMax>(r, relu, full)
                          : w > 32 ? PickBlock<3, kMax>(r, relu, full)
                          : w > 16 ? PickBlock<2, kMax>(r, relu, full)
                                   : PickBlock<1, kMax>(r, relu, full);
    block(x + k, r ? res + k : nullptr, mean + k, a + k, bias + k, rows, c, w,
          out + k, kMax ? m + k : nullptr);
  }
}

// out = act((x - mean) * a + bias [+ res]) across the team, in tiles of
// kTileRows rows: a tile is re-read once per 64-channel block, from cache.
void NormalizeRows(const float* x, const float* res, const float* mean,
                   const float* a, const float* bias, bool relu, int64_t m,
                   int64_t c, int team, float* out) {
  constexpr int64_t kTileRows = 64;
  const int64_t tiles = (m + kTileRows - 1) / kTileRows;
#pragma omp parallel for num_threads(team) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * kTileRows;
    NormalizeTile<false>(x + r0 * c, res ? res + r0 * c : nullptr, mean, a,
                         bias, relu, std::min(kTileRows, m - r0), c,
                         out + r0 * c, nullptr);
  }
}

// NormalizeRows over the map's periods and leftover rows (ForPeriods).
void Normalize(const float* x, const float* res, const float* mean,
               const float* a, const float* bias, bool relu, int64_t m,
               int64_t c, int team, float* out) {
  ForPeriods<3>(m, c, {mean, a, bias}, [&](int64_t r0, int64_t rows,
                                           int64_t w,
                                           const std::array<const float*, 3>& p) {
    const int64_t o = r0 * c;
    NormalizeRows(x + o, res ? res + o : nullptr, p[0], p[1], p[2], relu, rows,
                  w, team, out + o);
  });
}

// Normalize (residual optional), plus the per-sample spatial max of the output:
// rows [n * P, (n + 1) * P) are sample n (P = M / N), rmax is [N, C]. One
// sample is one tile: its map is re-read once per block, from cache.
// When a sample's P rows are whole periods (Period), it is walked as P / q
// rows of q C channels and its max folded back to C.
void NormalizeMax(const float* x, const float* res, const float* mean,
                  const float* a, const float* bias, bool relu, int64_t n,
                  int64_t p, int64_t c, int team, float* out, float* rmax) {
  const int64_t q = p % Period(c) == 0 ? Period(c) : 1;
  const std::vector<float> mt = Tile(mean, c, q), at = Tile(a, c, q),
                           bt = Tile(bias, c, q);
#pragma omp parallel for num_threads(team) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float m[kMaxPeriod];  // q > 1: q c <= kMaxPeriod
    const int64_t o = i * p * c;
    float* ri = rmax + i * c;
    NormalizeTile<true>(x + o, res ? res + o : nullptr, mt.data(), at.data(),
                        bt.data(), relu, p / q, q * c, out + o,
                        q > 1 ? m : ri);
    if (q > 1) std::copy(m, m + c, ri);
    for (int64_t j = 1; j < q; ++j)
      for (int64_t k = 0; k < c; ++k) ri[k] = std::max(ri[k], m[j * c + k]);
  }
}

// dz = dy [* (y > 0)], dres = dz (when dres is non-null) and
// dx = A dz + B (x - mean) + D, row by row across the team.
void BackwardRowsOf(const float* x, const float* y, const float* dy,
                    const float* mu, const float* A, const float* B,
                    const float* D, bool relu, int64_t m, int64_t c, int team,
                    float* dx, float* dres) {
#pragma omp parallel for num_threads(team) schedule(static)
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * c;
    const float* yr = y + r * c;
    const float* gr = dy + r * c;
    float* o = dx + r * c;
    if (dres) {
      float* q = dres + r * c;
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) {
        const float dz = (!relu || yr[k] > 0.0f) ? gr[k] : 0.0f;
        q[k] = dz;
        o[k] = A[k] * dz + B[k] * (xr[k] - mu[k]) + D[k];
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) {
        const float dz = (!relu || yr[k] > 0.0f) ? gr[k] : 0.0f;
        o[k] = A[k] * dz + B[k] * (xr[k] - mu[k]) + D[k];
      }
    }
  }
}

// BackwardRowsOf over the map's periods and leftover rows (ForPeriods).
void BackwardRows(const float* x, const float* y, const float* dy,
                  const float* mu, const float* A, const float* B,
                  const float* D, bool relu, int64_t m, int64_t c, int team,
                  float* dx, float* dres) {
  ForPeriods<4>(m, c, {mu, A, B, D}, [&](int64_t r0, int64_t rows, int64_t w,
                                         const std::array<const float*, 4>& p) {
    const int64_t o = r0 * c;
    BackwardRowsOf(x + o, y + o, dy + o, p[0], p[1], p[2], p[3], relu, rows, w,
                   team, dx + o, dres ? dres + o : nullptr);
  });
}

ffi::Error TrainFwd(ffi::Buffer<ffi::F32> x, const float* res,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                    ffi::ResultBuffer<ffi::F32> y,
                    ffi::ResultBuffer<ffi::F32> mean_out,
                    ffi::ResultBuffer<ffi::F32> var_out, float eps, bool relu,
                    int64_t threads) {
  Dims d;
  if (auto e = GetDims(x.dimensions(), scale.dimensions(), &d); e.failure())
    return e;
  return PfaOnTeamThread([&]() -> ffi::Error {
  const int team = Team(threads);
  std::vector<double> s1(d.c), s2(d.c);
  std::vector<float> a(d.c), mean(d.c), zero(d.c, 0.0f);
  for (int64_t g = 0; g < d.g; ++g) {
    const float* xg = x.typed_data() + g * d.m * d.c;
    // A first row as the shift keeps E[x^2] - E[x]^2 well conditioned.
    const float* shift = d.m > 0 ? xg : zero.data();
    Sums(kStats, xg, nullptr, nullptr, shift, false, d.m, d.c, team,
         s1.data(), s2.data());
    const float* sc = scale.typed_data() + g * d.c;
    float* mo = mean_out->typed_data() + g * d.c;
    float* vo = var_out->typed_data() + g * d.c;
    const double inv_m = d.m > 0 ? 1.0 / static_cast<double>(d.m) : 0.0;
    for (int64_t k = 0; k < d.c; ++k) {
      const double mu = s1[k] * inv_m;
      const double var = std::max(s2[k] * inv_m - mu * mu, 0.0);
      mean[k] = static_cast<float>(mu + shift[k]);
      mo[k] = mean[k];
      vo[k] = static_cast<float>(var);
      a[k] = sc[k] / std::sqrt(static_cast<float>(var) + eps);
    }
    Normalize(xg, res ? res + g * d.m * d.c : nullptr, mean.data(), a.data(),
              bias.typed_data() + g * d.c, relu, d.m, d.c, team,
              y->typed_data() + g * d.m * d.c);
  }
  return ffi::Error::Success();
  });
}

ffi::Error TrainFwdPlain(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> bias,
                         ffi::ResultBuffer<ffi::F32> y,
                         ffi::ResultBuffer<ffi::F32> mean,
                         ffi::ResultBuffer<ffi::F32> var, float eps, bool relu,
                         int64_t threads) {
  return TrainFwd(x, nullptr, scale, bias, y, mean, var, eps, relu, threads);
}

ffi::Error TrainFwdRes(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> res,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> var, float eps, bool relu,
                       int64_t threads) {
  if (res.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("fused_bn: residual shape differs");
  return TrainFwd(x, res.typed_data(), scale, bias, y, mean, var, eps, relu,
                  threads);
}

// dx (and dres = dz when dres is non-null), dscale, dbias.
ffi::Error TrainBwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                    ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                    ffi::ResultBuffer<ffi::F32> dx, float* dres,
                    ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, float eps, bool relu,
                    int64_t threads) {
  Dims d;
  if (auto e = GetDims(x.dimensions(), scale.dimensions(), &d); e.failure())
    return e;
  return PfaOnTeamThread([&]() -> ffi::Error {
  const int team = Team(threads);
  std::vector<double> s1(d.c), s2(d.c);
  std::vector<float> ka(d.c), kb(d.c), kd(d.c);
  const double inv_m = d.m > 0 ? 1.0 / static_cast<double>(d.m) : 0.0;
  for (int64_t g = 0; g < d.g; ++g) {
    const int64_t off = g * d.m * d.c;
    const float* xg = x.typed_data() + off;
    const float* yg = y.typed_data() + off;
    const float* gg = dy.typed_data() + off;
    const float* mu = mean.typed_data() + g * d.c;
    const float* va = var.typed_data() + g * d.c;
    const float* sc = scale.typed_data() + g * d.c;
    Sums(kGrad, xg, yg, gg, mu, relu, d.m, d.c, team, s1.data(), s2.data());
    float* ds = dscale->typed_data() + g * d.c;
    float* db = dbias->typed_data() + g * d.c;
    for (int64_t k = 0; k < d.c; ++k) {
      const double rstd = 1.0 / std::sqrt(static_cast<double>(va[k]) + eps);
      const double dsk = s2[k] * rstd;  // sum(dz * xhat)
      db[k] = static_cast<float>(s1[k]);
      ds[k] = static_cast<float>(dsk);
      // dx = A dz + B (x - mean) + D
      const double a = sc[k] * rstd;
      ka[k] = static_cast<float>(a);
      kb[k] = static_cast<float>(-a * rstd * dsk * inv_m);
      kd[k] = static_cast<float>(-a * s1[k] * inv_m);
    }
    float* dxg = dx->typed_data() + off;
    BackwardRows(xg, yg, gg, mu, ka.data(), kb.data(), kd.data(), relu, d.m,
                 d.c, team, dxg, dres ? dres + off : nullptr);
  }
  return ffi::Error::Success();
  });
}

ffi::Error TrainBwdPlain(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                         ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                         ffi::ResultBuffer<ffi::F32> dx,
                         ffi::ResultBuffer<ffi::F32> dscale,
                         ffi::ResultBuffer<ffi::F32> dbias, float eps,
                         bool relu, int64_t threads) {
  return TrainBwd(x, y, dy, scale, mean, var, dx, nullptr, dscale, dbias, eps,
                  relu, threads);
}

ffi::Error TrainBwdRes(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                       ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                       ffi::ResultBuffer<ffi::F32> dx,
                       ffi::ResultBuffer<ffi::F32> dres,
                       ffi::ResultBuffer<ffi::F32> dscale,
                       ffi::ResultBuffer<ffi::F32> dbias, float eps, bool relu,
                       int64_t threads) {
  return TrainBwd(x, y, dy, scale, mean, var, dx, dres->typed_data(), dscale,
                  dbias, eps, relu, threads);
}

// Inference BN (+ residual, + ReLU); with `rmax` also the spatial max of its
// output per sample (the PFA response of the layer, pfa_jax.models.layers),
// in the same pass.
ffi::Error Infer(ffi::Buffer<ffi::F32> x, const float* res,
                 ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                 ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                 ffi::ResultBuffer<ffi::F32> y,
                 ffi::ResultBuffer<ffi::F32>* rmax, float eps, bool relu,
                 int64_t threads) {
  Dims d;
  if (auto e = GetDims(x.dimensions(), scale.dimensions(), &d); e.failure())
    return e;
  int64_t n = 0;  // samples, with rmax
  if (rmax) {
    const auto rd = (*rmax)->dimensions();
    if (rd.size() < 2 || rd[rd.size() - 1] != d.c)
      return ffi::Error::InvalidArgument("fused_bn: bad max shape");
    n = rd[rd.size() - 2];
    if (n <= 0 || d.m % n != 0)
      return ffi::Error::InvalidArgument("fused_bn: rows not a multiple of N");
  }
  return PfaOnTeamThread([&]() -> ffi::Error {
    const int team = Team(threads);
    std::vector<float> a(d.c);
    for (int64_t g = 0; g < d.g; ++g) {
      const float* sc = scale.typed_data() + g * d.c;
      const float* va = var.typed_data() + g * d.c;
      for (int64_t k = 0; k < d.c; ++k) a[k] = sc[k] / std::sqrt(va[k] + eps);
      const int64_t off = g * d.m * d.c;
      const float* r = res ? res + off : nullptr;
      const float* mu = mean.typed_data() + g * d.c;
      const float* b = bias.typed_data() + g * d.c;
      float* out = y->typed_data() + off;
      if (rmax)
        NormalizeMax(x.typed_data() + off, r, mu, a.data(), b, relu, n,
                     d.m / n, d.c, team, out,
                     (*rmax)->typed_data() + g * n * d.c);
      else
        Normalize(x.typed_data() + off, r, mu, a.data(), b, relu, d.m, d.c,
                  team, out);
    }
    return ffi::Error::Success();
  });
}

ffi::Error InferPlain(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
                      ffi::Buffer<ffi::F32> var, ffi::ResultBuffer<ffi::F32> y,
                      float eps, bool relu, int64_t threads) {
  return Infer(x, nullptr, scale, bias, mean, var, y, nullptr, eps, relu,
               threads);
}

ffi::Error InferRes(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> res,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                    ffi::ResultBuffer<ffi::F32> y, float eps, bool relu,
                    int64_t threads) {
  if (res.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("fused_bn: residual shape differs");
  return Infer(x, res.typed_data(), scale, bias, mean, var, y, nullptr, eps,
               relu, threads);
}

ffi::Error InferMaxPlain(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
                         ffi::Buffer<ffi::F32> var,
                         ffi::ResultBuffer<ffi::F32> y,
                         ffi::ResultBuffer<ffi::F32> rmax, float eps, bool relu,
                         int64_t threads) {
  return Infer(x, nullptr, scale, bias, mean, var, y, &rmax, eps, relu,
               threads);
}

ffi::Error InferMaxRes(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> res,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                       ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> rmax, float eps, bool relu,
                       int64_t threads) {
  if (res.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("fused_bn: residual shape differs");
  return Infer(x, res.typed_data(), scale, bias, mean, var, y, &rmax, eps,
               relu, threads);
}

}  // namespace

extern "C" void PfaSetBnPeriodic(int on) { g_periodic.store(on != 0); }

// Bindings: I = one float32 operand, O = one float32 result.
#define I .Arg<ffi::Buffer<ffi::F32>>()
#define O .Ret<ffi::Buffer<ffi::F32>>()
#define PFA_BN(name, fn, ...)                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                                \
                                ffi::Ffi::Bind() __VA_ARGS__             \
                                    .Attr<float>("eps")                  \
                                    .Attr<bool>("relu")                  \
                                    .Attr<int64_t>("threads"))

PFA_BN(PfaBnTrainFwd, TrainFwdPlain, I I I O O O);            // x s b
PFA_BN(PfaBnTrainFwdRes, TrainFwdRes, I I I I O O O);         // x r s b
PFA_BN(PfaBnTrainBwd, TrainBwdPlain, I I I I I I O O O);      // x y dy s m v
PFA_BN(PfaBnTrainBwdRes, TrainBwdRes, I I I I I I O O O O);   // + dres out
PFA_BN(PfaBnInfer, InferPlain, I I I I I O);                  // x s b m v
PFA_BN(PfaBnInferRes, InferRes, I I I I I I O);               // x r s b m v
PFA_BN(PfaBnInferMax, InferMaxPlain, I I I I I O O);          // -> y, max
PFA_BN(PfaBnInferMaxRes, InferMaxRes, I I I I I I O O);       // x r s b m v
