// XLA FFI handler: the forward convolution of a layer with few output
// channels (1-8, a pruned network's), float32, x NHWC, w HWIO, any kernel
// size, strides and (non-negative) padding, no dilation (pfa_jax.onednn).
//
// oneDNN vectorises a convolution over 16 output channels, so a 4-channel
// layer costs what a 16-channel one does. This kernel vectorises over the
// *input* channels instead: for PX adjacent output pixels of one row it keeps
// PX * O accumulators of 16 input-channel lanes, adds x[tap] * w[tap] for
// every tap, then reduces the PX * O accumulators to PX * O sums with one
// shuffle tree (Reduce16) and stores them as one (masked) vector: in NHWC the
// O channels of PX adjacent pixels are contiguous. Input channels that are
// not a multiple of 16 are loaded masked against zero-padded weights.
//
// Operands are [G..., N, H, W, C], [G..., kh, kw, C, O] and
// [G..., N, Ho, Wo, O]: the leading G dims are vmap's (vmap_method=
// 'broadcast_all'), one convolution each. Threads: an OpenMP team of
// `threads` over the output rows, on the oneDNN calls' team thread.
// PfaNarrowConvAvailable() is 0 where the compiler had no AVX-512.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

ffi::Error PfaRunConv(int64_t threads,
                      const std::function<ffi::Error()>& task);

#if defined(__AVX512F__)
#include <immintrin.h>

namespace {

// Outputs of up to 16 channels on the row path, up to 8 on the channel path.
constexpr int kMaxOut = 16;
constexpr int kMaxChannelPathOut = 8;

struct Shape {
  int64_t n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pl;
  int64_t icv;  // 16-lane blocks of input channels
};

// The epilogue of a convolution with its batch norm folded in
// (pfa_jax.onednn.conv_bias_act): y = [relu](conv + bias [+ res]).
struct Epi {
  const float* bias = nullptr;  // [O] or null: no epilogue
  const float* res = nullptr;   // [N, Ho, Wo, O] or null
  bool relu = false;
  // A channel tail (PfaNarrowTailMerge; the row kernel's kSplit): the O
  // outputs are channels [mc, mc + O) of a wider layer whose kernel and
  // output (and residual) have `wide` channels a pixel; `main` holds the
  // other mc channels, [N, Ho, Wo, mc], computed by oneDNN with the bias
  // (and the ReLU where there is no residual), and is merged in per pixel.
  int64_t wide = 0;
  const float* main = nullptr;
  int64_t mc = 0;
};

// Sums each of a[0..15] across its 16 lanes: four levels of pairwise
// shuffles and adds leave one vector of the 16 sums in a fixed lane order,
// which Order() permutes back to 0..15.
inline __m512 ReduceTree(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int k = 0; k < 8; ++k)  // 256-bit halves: 8 partials of two each
    b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)  // 128-bit quarters: 4 partials of four each
    c[k] = _mm512_add_ps(
        _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
        _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int k = 0; k < 2; ++k)  // pairs within quarters
    d[k] = _mm512_add_ps(
        _mm512_shuffle_ps(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
        _mm512_shuffle_ps(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// The permutation taking ReduceTree's lane order to 0..15, found once by
// reducing a[i] = i / 16 (exact in float: lane l then holds the index i).
__m512i Order() {
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps(i / 16.0f);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, ReduceTree(a));
  alignas(64) int32_t perm[16];
  for (int l = 0; l < 16; ++l) perm[static_cast<int>(lanes[l])] = l;
  return _mm512_load_si512(perm);
}

inline __m512 Reduce16(const __m512* a, __m512i order) {
  return _mm512_permutexvar_ps(order, ReduceTree(a));
}

// Pixels per group for O output channels: PX * O <= 16 accumulators, and at
// most 8 input vectors live beside them.
constexpr int Px(int o) { return o == 1 ? 8 : (16 / o > 8 ? 8 : 16 / o); }

// The I-th of eight vectors, I known at compile time.
template <int I>
inline __m512 Sel(__m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 v4,
                  __m512 v5, __m512 v6, __m512 v7) {
  if constexpr (I == 0) return v0;
  if constexpr (I == 1) return v1;
  if constexpr (I == 2) return v2;
  if constexpr (I == 3) return v3;
  if constexpr (I == 4) return v4;
  if constexpr (I == 5) return v5;
  if constexpr (I == 6) return v6;
  if constexpr (I == 7) return v7;
}

#define PFA_REP8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define PFA_REP16(M) \
  PFA_REP8(M) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)

// PX output pixels (columns wo0.., `valid` of them real) of output row ho of
// one image, all O channels. kChecked: some taps fall outside the row. The
// accumulators, inputs and weights are named variables, not arrays: GCC
// kept an array of accumulators on the stack across the tap loop (one store
// and one load per FMA).
template <int O, bool kChecked>
inline void Group(const Shape& s, const float* img, const float* wp,
                  __mmask16 tail, int64_t ho, int64_t wo0, int valid,
                  __m512i order, float* out, const Epi& epi, __m512 bias,
                  const float* res) {
  constexpr int PX = Px(O);
  const __m512 zero = _mm512_setzero_ps();
#define PFA_DECL(k) __m512 a##k = zero;
  PFA_REP16(PFA_DECL)
#undef PFA_DECL
  const int64_t ci = s.c;
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t hi = ho * s.sh - s.pt + i;
    if (hi < 0 || hi >= s.h) continue;
    const float* row = img + hi * s.w * ci;
    for (int64_t j = 0; j < s.kw; ++j) {
      const float* wt = wp + (i * s.kw + j) * s.icv * O * 16;
      for (int64_t v = 0; v < s.icv; ++v) {
        const __mmask16 m = v + 1 == s.icv ? tail : __mmask16(0xFFFF);
        auto load_x = [&](int p) {
          const int64_t wi = (wo0 + p) * s.sw - s.pl + j;
          if (p >= PX || (kChecked && (p >= valid || wi < 0 || wi >= s.w)))
            return zero;
          return _mm512_maskz_loadu_ps(m, row + wi * ci + v * 16);
        };
        auto load_w = [&](int o) {
          return o < O ? _mm512_load_ps(wt + (v * O + o) * 16) : zero;
        };
#define PFA_LOAD(k) \
  const __m512 x##k = load_x(k), w##k = load_w(k);
        PFA_REP8(PFA_LOAD)
#undef PFA_LOAD
#define PFA_FMA(k)                                                       \
  if constexpr ((k) < PX * O)                                            \
    a##k = _mm512_fmadd_ps(                                              \
        Sel<(k) / O>(x0, x1, x2, x3, x4, x5, x6, x7),                    \
        Sel<(k) % O>(w0, w1, w2, w3, w4, w5, w6, w7), a##k);
        PFA_REP16(PFA_FMA)
#undef PFA_FMA
      }
    }
  }
  const __m512 acc[16] = {a0, a1, a2,  a3,  a4,  a5,  a6,  a7,
                          a8, a9, a10, a11, a12, a13, a14, a15};
  __m512 r = Reduce16(acc, order);
  const __mmask16 store = static_cast<__mmask16>((1u << (valid * O)) - 1);
  if (epi.bias) {
    r = _mm512_add_ps(r, bias);
    if (res) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(store, res + wo0 * O));
    if (epi.relu) r = _mm512_max_ps(r, _mm512_setzero_ps());
  }
  _mm512_mask_storeu_ps(out + wo0 * O, store, r);
}

template <int O>
void Conv(const Shape& s, const float* x, const float* wp, float* y,
          const Epi& epi, int team) {
  constexpr int PX = Px(O);
  static const __m512i order = Order();
  alignas(64) float tile[16] = {};  // lane p * O + o: bias[o]
  if (epi.bias)
    for (int l = 0; l < PX * O; ++l) tile[l] = epi.bias[l % O];
  const __m512 bias = _mm512_load_ps(tile);
  const int64_t ci = s.c, rem = ci % 16;
  const __mmask16 tail =
      rem ? static_cast<__mmask16>((1u << rem) - 1) : __mmask16(0xFFFF);
  // Columns whose PX-pixel group reads no tap outside the row.
  const int64_t lo = s.pl > 0 ? (s.pl + s.sw - 1) / s.sw : 0;
#pragma omp parallel for num_threads(team) schedule(static)
  for (int64_t r = 0; r < s.n * s.ho; ++r) {
    const int64_t n = r / s.ho, ho = r % s.ho;
    const float* img = x + n * s.h * s.w * ci;
    float* out = y + r * s.wo * O;
    const float* res = epi.res ? epi.res + r * s.wo * O : nullptr;
    for (int64_t wo0 = 0; wo0 < s.wo; wo0 += PX) {
      const int valid = static_cast<int>(std::min<int64_t>(PX, s.wo - wo0));
      const bool inside = valid == PX && wo0 >= lo &&
                          (wo0 + PX - 1) * s.sw - s.pl + s.kw <= s.w;
      if (inside) {
        Group<O, false>(s, img, wp, tail, ho, wo0, valid, order, out, epi,
                        bias, res);
      } else {
        Group<O, true>(s, img, wp, tail, ho, wo0, valid, order, out, epi,
                       bias, res);
      }
    }
  }
}

// ---- The row kernel: stride 1 across the width, at least 16 output columns.
//
// Vectorised over 16 adjacent output pixels instead: an input row is first
// transposed to [C][L] (channels outer, a zero-padded row of L pixels inner),
// so that for each tap and input channel the 16 pixels a vector of outputs
// reads are contiguous; each FMA then adds x[16 pixels] * w[tap, c, o]
// (broadcast) into output channel o's accumulator, with no reduction. NV
// vectors (16 NV pixels) of all O channels are accumulated at once. Each
// thread walks a contiguous range of output rows and keeps the last kh
// transposed input rows (a window of kh consecutive rows: row % kh is a slot).

// In-register 16x16 transpose: r[i] lane j -> r[j] lane i.
inline void Transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// One input row [W, C] -> dst[c * ld + w] (the caller offsets dst by the
// left padding), 16 x 16 blocks; partial blocks loaded masked, stored masked.
void TransposeRow(const float* src, int64_t w, int64_t c, float* dst,
                  int64_t ld) {
  for (int64_t c0 = 0; c0 < c; c0 += 16) {
    const int64_t nc = std::min<int64_t>(16, c - c0);
    const __mmask16 cm = static_cast<__mmask16>((1u << nc) - 1);
    for (int64_t w0 = 0; w0 < w; w0 += 16) {
      const int64_t nw = std::min<int64_t>(16, w - w0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < nw ? _mm512_maskz_loadu_ps(cm, src + (w0 + i) * c + c0)
                      : _mm512_setzero_ps();
      Transpose16(r);
      const __mmask16 wm = static_cast<__mmask16>((1u << nw) - 1);
      for (int64_t k = 0; k < nc; ++k)
        _mm512_mask_storeu_ps(dst + (c0 + k) * ld + w0, wm, r[k]);
    }
  }
}

// ---- The row kernel's output for 1-4 channels: channel-major accumulators
// to NHWC (5-15 channels: RowConv's 16 x 16 transpose).
//
// c[o] holds output channel o of 16 adjacent pixels. With P the power of two
// >= O (channels 0..O-1 real, the rest zero), log2(P) levels of pairwise
// interleaves (vpermt2ps) turn the P vectors into P pixel-major ones: vector
// b holds pixels b * 16/P .. of all P channels. Level g (g channels per
// element so far) interleaves the first (lo) or last (hi) halves of the
// elements of two vectors of g-channel groups 2k, 2k+1. Where O < P each
// vector is then compacted to its 16/P * O real lanes (vcompressps). The
// epilogue (bias, residual, ReLU) then runs on whole vectors of NHWC output
// and the store is one masked store per vector: P log2(P) shuffles per 16
// pixels (at most 8) instead of a 16 x 16 transpose (64) and 16 stores
// (16 -> 4 at 32 x 32: 1.33x folded, conv_narrow_wide.json against
// conv_narrow_wide_a49579f.json; with 5 and more channels it measured
// slower than the transpose, so they keep it). Before session 13 a scalar
// scatter with the ReLU as a branch cost 1.3-1.55x the plain forward on
// mixed-sign data (mispredictions; conv_narrow_wide_c71932a.json).
constexpr int Pow2(int o) { return o <= 1 ? 1 : 2 * Pow2((o + 1) / 2); }

// Lane indices of vpermt2ps interleaving the lo (hi) halves of g-float
// elements of a (indices 0-15) and b (16-31).
inline __m512i InterleaveIdx(int g, bool hi) {
  alignas(64) int32_t idx[16];
  const int half = 16 / g / 2;  // elements taken from each source
  for (int l = 0; l < 16; ++l) {
    const int e = l / g, w = l % g;
    const int src_elem = (hi ? half : 0) + e / 2;
    idx[l] = (e % 2 ? 16 : 0) + src_elem * g + w;
  }
  return _mm512_load_si512(idx);
}

// Per-O constants of StoreRow (O <= 4): bias tiled over the compacted NHWC
// layout, the interleave indices of each level, the compaction mask.
template <int O>
struct Tiles {
  static_assert(O <= 4, "StoreRow serves 1-4 output channels");
  static constexpr int P = Pow2(O);
  static constexpr int kPix = 16 / P;  // pixels per output vector
  __m512 bias = _mm512_setzero_ps();
  __m512i lo[2], hi[2];
  __mmask16 real = 0;  // lanes (l % P) < O
  explicit Tiles(const Epi& epi) {
    alignas(64) float t[16] = {};
    for (int l = 0; l < kPix * O; ++l) t[l] = epi.bias ? epi.bias[l % O] : 0;
    bias = _mm512_load_ps(t);
    for (int lev = 0, g = 1; g < P; ++lev, g *= 2) {
      lo[lev] = InterleaveIdx(g, false);
      hi[lev] = InterleaveIdx(g, true);
    }
    for (int l = 0; l < 16; ++l)
      if (l % P < O) real = static_cast<__mmask16>(real | (1u << l));
  }
};

struct NoTiles {  // RowConv's stand-in for Tiles where O > 4
  explicit NoTiles(const Epi&) {}
};

// c[0..O-1]: channel-major accumulators of 16 pixels; writes the first
// `np` pixels' O channels at y (NHWC) through the epilogue. Not inlined:
// inlined into RowConv, GCC kept the accumulators on the stack through the
// tap loop, several times slower.
template <int O>
__attribute__((noinline)) void StoreRow(__m512* c, int64_t np, float* y,
                                        const float* res, const Epi& epi,
                                        const Tiles<O>& t) {
  constexpr int P = Tiles<O>::P, kPix = Tiles<O>::kPix;
  for (int o = O; o < P; ++o) c[o] = _mm512_setzero_ps();
  // Index of a vector: group k of g channels, pixel block b of g blocks:
  // c[k * g + b]. Level g -> 2g: groups 2k, 2k+1 of block b give blocks
  // 2b (lo) and 2b + 1 (hi) of group k.
  int lev = 0;
  for (int g = 1; g < P; g *= 2, ++lev) {
    __m512 n[16];
    for (int k = 0; k < P / (2 * g); ++k)
      for (int b = 0; b < g; ++b) {
        const __m512 a = c[(2 * k) * g + b], bb = c[(2 * k + 1) * g + b];
        n[k * 2 * g + 2 * b] = _mm512_permutex2var_ps(a, t.lo[lev], bb);
        n[k * 2 * g + 2 * b + 1] = _mm512_permutex2var_ps(a, t.hi[lev], bb);
      }
    for (int j = 0; j < P; ++j) c[j] = n[j];
  }
  for (int b = 0; b < P && b * kPix < np; ++b) {
    __m512 yv = c[b];
    if constexpr (O < P) yv = _mm512_maskz_compress_ps(t.real, yv);
    const int64_t n = std::min<int64_t>(kPix, np - b * kPix) * O;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    if (epi.bias) {
      yv = _mm512_add_ps(yv, t.bias);
      if (res)
        yv = _mm512_add_ps(yv, _mm512_maskz_loadu_ps(m, res + b * kPix * O));
      if (epi.relu) yv = _mm512_max_ps(yv, _mm512_setzero_ps());
    }
    _mm512_mask_storeu_ps(y + b * kPix * O, m, yv);
  }
}

template <int O, int NV, bool kSplit = false>
void RowConv(const Shape& s, const float* x, const float* k, float* y,
             const Epi& epi, int team) {
  // Channels a pixel in the kernel, output and residual: O, or the wide
  // layer's (k, y and res then point at channel mc of its first pixel).
  const int64_t ks = kSplit ? epi.wide : O;
  const int64_t chunk = 16 * NV, chunks = (s.wo + chunk - 1) / chunk;
  // Row length: the padded input, and every chunk's reads (kw - 1 past).
  const int64_t ld = std::max(s.pl + s.w, chunks * chunk + s.kw - 1) + 16;
  const int64_t rows = s.n * s.ho, row_sz = s.c * ld;
  const std::conditional_t<(O <= 4), Tiles<O>, NoTiles> tiles(epi);
  const __mmask16 lanes = static_cast<__mmask16>((1u << O) - 1);
  const __m512 bias =
      epi.bias ? _mm512_maskz_loadu_ps(lanes, epi.bias) : _mm512_setzero_ps();
#pragma omp parallel num_threads(team)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
    std::vector<float> ring(s.kh * row_sz + 16, 0.0f);
    std::vector<int64_t> held(s.kh, -1);  // n * H + hi in each slot
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.ho, ho = r % s.ho;
      const float* img = x + n * s.h * s.w * s.c;
      const float* rowp[16];
      const int64_t kh = std::min<int64_t>(s.kh, 16);
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t hi = ho * s.sh - s.pt + i;
        rowp[i] = nullptr;
        if (hi < 0 || hi >= s.h) continue;
        const int64_t slot = hi % s.kh;
        float* dst = ring.data() + slot * row_sz;
        if (held[slot] != n * s.h + hi) {
          TransposeRow(img + hi * s.w * s.c, s.w, s.c, dst + s.pl, ld);
          held[slot] = n * s.h + hi;
        }
        rowp[i] = dst;
      }
      // The input row the next output row adds to the window, prefetched
      // now: a layer with few outputs streams its input faster than the
      // hardware prefetcher brings a cold map in (one row ahead measured
      // best; farther ahead was slower).
      if (r + 1 < r1) {
        const int64_t n1 = (r + 1) / s.ho;
        const int64_t hi1 = ((r + 1) % s.ho) * s.sh - s.pt + kh - 1;
        if (hi1 >= 0 && hi1 < s.h) {
          const char* p = reinterpret_cast<const char*>(
              x + (n1 * s.h + hi1) * s.w * s.c);
          const int64_t bytes = s.w * s.c * int64_t{sizeof(float)};
          for (int64_t b = 0; b < bytes; b += 64)
            _mm_prefetch(p + b, _MM_HINT_T0);
        }
      }
      float* yrow = y + r * s.wo * ks;
      for (int64_t q = 0; q < chunks; ++q) {
        const int64_t wo0 = q * chunk;
        __m512 acc[O][NV];
        for (int o = 0; o < O; ++o)
          for (int v = 0; v < NV; ++v) acc[o][v] = _mm512_setzero_ps();
        for (int64_t i = 0; i < kh; ++i) {
          if (!rowp[i]) continue;
          for (int64_t j = 0; j < s.kw; ++j) {
            const float* xr = rowp[i] + wo0 + j;
            const float* wr = k + (i * s.kw + j) * s.c * ks;
            for (int64_t c = 0; c < s.c; ++c) {
              __m512 xv[NV];
              for (int v = 0; v < NV; ++v) {
                xv[v] = _mm512_loadu_ps(xr + c * ld + 16 * v);
                // In a register: GCC otherwise folds the load into each of
                // the O FMAs (O loads per vector, load-port bound).
                asm("" : "+v"(xv[v]));
              }
              for (int o = 0; o < O; ++o) {
                const __m512 wb = _mm512_set1_ps(wr[c * ks + o]);
                for (int v = 0; v < NV; ++v)
                  acc[o][v] = _mm512_fmadd_ps(xv[v], wb, acc[o][v]);
              }
            }
          }
        }
        const int64_t valid = std::min<int64_t>(chunk, s.wo - wo0);
        for (int v = 0; v < NV && 16 * v < valid; ++v) {
          const int64_t p0 = wo0 + 16 * v;
          const int64_t np = std::min<int64_t>(16, s.wo - p0);
          float* yo = yrow + p0 * ks;
          const float* ro = epi.res ? epi.res + (r * s.wo + p0) * ks : nullptr;
          if constexpr (O <= 4 && !kSplit) {
            __m512 c[16];
            for (int o = 0; o < O; ++o) c[o] = acc[o][v];
            StoreRow<O>(c, np, yo, ro, epi, tiles);
          } else {
            // 5-15 channels: a 16 x 16 transpose (lane o of t[p] = pixel p,
            // channel o), the epilogue per pixel, O-lane masked stores; it
            // measured faster here than 3-4 interleave levels.
            __m512 t[16];
            for (int o = 0; o < 16; ++o)
              t[o] = o < O ? acc[o < O ? o : 0][v] : _mm512_setzero_ps();
            Transpose16(t);
            for (int64_t p = 0; p < np; ++p) {
              __m512 yv = t[p];
              if (epi.bias) {
                yv = _mm512_add_ps(yv, bias);
                if (ro)
                  yv = _mm512_add_ps(
                      yv, _mm512_maskz_loadu_ps(lanes, ro + p * ks));
                if (epi.relu) yv = _mm512_max_ps(yv, _mm512_setzero_ps());
              }
              _mm512_mask_storeu_ps(yo + p * ks, lanes, yv);
              if constexpr (kSplit) {  // the pixel's other mc channels
                const float* mp = epi.main + (r * s.wo + p0 + p) * epi.mc;
                float* yp = yo + p * ks - epi.mc;
                const float* rp = ro ? ro + p * ks - epi.mc : nullptr;
                for (int64_t c = 0; c < epi.mc; c += 16) {
                  __m512 v = _mm512_loadu_ps(mp + c);
                  if (rp) {
                    v = _mm512_add_ps(v, _mm512_loadu_ps(rp + c));
                    if (epi.relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
                  }
                  _mm512_storeu_ps(yp + c, v);
                }
              }
            }
          }
        }
      }
    }
  }
}

// The row kernel applies with stride 1 across the width, >= 16 output
// columns and kh <= 16; elsewhere the channel-vectorised one (the only user
// of `wp`).
bool RowPath(const Shape& s) { return s.sw == 1 && s.wo >= 16 && s.kh <= 16; }

template <int O>
void Any(const Shape& s, const float* x, const float* k, const float* wp,
         float* y, const Epi& epi, int team) {
  if (RowPath(s)) {
    // Two vectors of pixels while 2 O accumulators, two inputs and a
    // broadcast fit the 32 vector registers.
    if constexpr (2 * O + 3 <= 32) {
      if (s.wo >= 32) return RowConv<O, 2>(s, x, k, y, epi, team);
    }
    RowConv<O, 1>(s, x, k, y, epi, team);
  } else if constexpr (O <= kMaxChannelPathOut) {
    Conv<O>(s, x, wp, y, epi, team);
  }
}

using ConvFn = void (*)(const Shape&, const float*, const float*,
                        const float*, float*, const Epi&, int);
constexpr std::array<ConvFn, kMaxOut> kConv = {
    Any<1>, Any<2>,  Any<3>,  Any<4>,  Any<5>,  Any<6>,  Any<7>,  Any<8>,
    Any<9>, Any<10>, Any<11>, Any<12>, Any<13>, Any<14>, Any<15>, Any<16>};

// The channel tail of a wider layer (row path only; 1-15 outputs).
template <int O>
void Tail(const Shape& s, const float* x, const float* k, float* y,
          const Epi& epi, int team) {
  if constexpr (2 * O + 3 <= 32) {
    if (s.wo >= 32) return RowConv<O, 2, true>(s, x, k, y, epi, team);
  }
  RowConv<O, 1, true>(s, x, k, y, epi, team);
}

using TailFn = void (*)(const Shape&, const float*, const float*, float*,
                        const Epi&, int);
constexpr std::array<TailFn, 15> kTail = {
    Tail<1>, Tail<2>,  Tail<3>,  Tail<4>,  Tail<5>,  Tail<6>,  Tail<7>, Tail<8>,
    Tail<9>, Tail<10>, Tail<11>, Tail<12>, Tail<13>, Tail<14>, Tail<15>};

int64_t Prod(ffi::Span<const int64_t> d, size_t lo, size_t hi) {
  int64_t p = 1;
  for (size_t i = lo; i < hi; ++i) p *= d[i];
  return p;
}

// bias (if not null) is [G..., O], res (if not null) y's shape.
ffi::Error Run(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
               const float* bias, const float* res,
               ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> pads, bool relu, int64_t threads) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  const size_t r = xd.size();
  if (r < 4 || kd.size() != r || yd.size() != r || strides.size() != 2 ||
      pads.size() != 4)
    return ffi::Error::InvalidArgument("narrow_conv: bad ranks or attributes");
  Shape s{xd[r - 4], xd[r - 3], xd[r - 2], xd[r - 1], kd[r - 4],
          kd[r - 3], kd[r - 1], yd[r - 3], yd[r - 2], strides[0],
          strides[1], pads[0], pads[2], (xd[r - 1] + 15) / 16};
  if (kd[r - 2] != s.c || yd[r - 4] != s.n || yd[r - 1] != s.o || s.o < 1 ||
      s.o > kMaxOut || s.sh < 1 || s.sw < 1 || s.pt < 0 || s.pl < 0 ||
      (s.o > kMaxChannelPathOut && !RowPath(s)))
    return ffi::Error::InvalidArgument("narrow_conv: unsupported shapes");
  const int64_t groups = Prod(xd, 0, r - 4);
  if (Prod(kd, 0, r - 4) != groups || Prod(yd, 0, r - 4) != groups)
    return ffi::Error::InvalidArgument("narrow_conv: batch dims differ");
  return PfaRunConv(threads, [&]() -> ffi::Error {
    const int team =
        threads > 0 ? static_cast<int>(threads) : omp_get_max_threads();
    const int64_t taps = s.kh * s.kw, x_sz = s.n * s.h * s.w * s.c,
                  y_sz = s.n * s.ho * s.wo * s.o, k_sz = taps * s.c * s.o;
    // The channel path's weights, [tap][icv][O][16 input channels], zero
    // past C; the row path reads the HWIO kernel as it is.
    const bool rows = RowPath(s);
    thread_local std::vector<float> buf;
    const int64_t wp_sz = rows ? 0 : taps * s.icv * s.o * 16;
    buf.assign(wp_sz + 16, 0.0f);
    float* wp = reinterpret_cast<float*>(
        (reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
    for (int64_t g = 0; g < groups; ++g) {
      const float* kg = k.typed_data() + g * k_sz;
      for (int64_t t = 0; t < taps && !rows; ++t)
        for (int64_t c = 0; c < s.c; ++c)
          for (int64_t o = 0; o < s.o; ++o)
            wp[((t * s.icv + c / 16) * s.o + o) * 16 + c % 16] =
                kg[(t * s.c + c) * s.o + o];
      Epi epi;
      if (bias) {
        epi.bias = bias + g * s.o;
        epi.res = res ? res + g * y_sz : nullptr;
        epi.relu = relu;
      }
      kConv[s.o - 1](s, x.typed_data() + g * x_sz, kg, wp,
                     y->typed_data() + g * y_sz, epi, team);
    }
    return ffi::Error::Success();
  });
}

ffi::Error Fwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
               ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> pads, int64_t threads) {
  return Run(x, k, nullptr, nullptr, y, strides, pads, false, threads);
}

ffi::Error FwdBias(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y,
                   ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> pads, bool relu,
                   int64_t threads) {
  const auto kd = k.dimensions();  // bias: [G..., O]
  if (kd.size() < 4 ||
      b.element_count() * Prod(kd, kd.size() - 4, kd.size() - 1) !=
          k.element_count())
    return ffi::Error::InvalidArgument("narrow_conv: bias shape");
  return Run(x, k, b.typed_data(), nullptr, y, strides, pads, relu, threads);
}

ffi::Error FwdBiasRes(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                      ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> res,
                      ffi::ResultBuffer<ffi::F32> y,
                      ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> pads, bool relu,
                      int64_t threads) {
  if (res.element_count() != y->element_count())
    return ffi::Error::InvalidArgument("narrow_conv: residual shape");
  return Run(x, k, b.typed_data(), res.typed_data(), y, strides, pads, relu,
             threads);
}

}  // namespace

// Channels [mc, wide) of a convolution with its batch norm folded in, whose
// channels [0, mc) oneDNN computed into `main` ([N, Ho, Wo, mc], mc a
// multiple of 16; with the bias, and the ReLU unless there is a residual),
// written with those into y ([N, Ho, Wo, wide]): y = [relu](conv + bias
// [+ res]) on every channel. oneDNN computes output channels in vectors of
// 16 and its tail vector costs a whole one (a 56 -> 52 layer at 32 x 32,
// batch 128: 41 ms whole, 35 ms split, conv_tail_split.json), so
// onednn_conv.cc's split forward gives the wide - mc tail channels to this
// row kernel. geo: n, h, w, c, kh, kw, ho, wo, sh, sw, pt, pl of one
// convolution (no vmap dims); the caller runs this on the team thread.
// Returns 0, or -1 where the row path does not apply (the caller checked).
extern "C" int PfaNarrowTailMerge(const int64_t* geo, int64_t wide, int64_t mc,
                                  const float* x, const float* k,
                                  const float* bias, const float* res,
                                  float* y, const float* main, int relu,
                                  int team) {
  Shape s{geo[0], geo[1],  geo[2], geo[3], geo[4],  geo[5], wide - mc,
          geo[6], geo[7],  geo[8], geo[9], geo[10], geo[11], 0};
  s.icv = (s.c + 15) / 16;
  if (!RowPath(s) || s.o < 1 || s.o > 15 || mc % 16 != 0) return -1;
  Epi epi;
  epi.bias = bias + mc;
  epi.res = res ? res + mc : nullptr;
  epi.relu = relu != 0;
  epi.wide = wide, epi.main = main, epi.mc = mc;
  kTail[s.o - 1](s, x, k + mc, y + mc, epi, team);
  return 0;
}

extern "C" int PfaNarrowConvAvailable() { return 1; }

#else  // no AVX-512: the Python side never calls the handler

namespace {
ffi::Error Fwd(ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
               ffi::ResultBuffer<ffi::F32>, ffi::Span<const int64_t>,
               ffi::Span<const int64_t>, int64_t) {
  return ffi::Error::InvalidArgument("narrow_conv: built without AVX-512");
}
ffi::Error FwdBias(ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                   ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>,
                   ffi::Span<const int64_t>, ffi::Span<const int64_t>, bool,
                   int64_t) {
  return ffi::Error::InvalidArgument("narrow_conv: built without AVX-512");
}
ffi::Error FwdBiasRes(ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                      ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                      ffi::ResultBuffer<ffi::F32>, ffi::Span<const int64_t>,
                      ffi::Span<const int64_t>, bool, int64_t) {
  return ffi::Error::InvalidArgument("narrow_conv: built without AVX-512");
}
}  // namespace

extern "C" int PfaNarrowTailMerge(const int64_t*, int64_t, int64_t,
                                  const float*, const float*, const float*,
                                  const float*, float*, const float*, int,
                                  int) {
  return -1;
}

extern "C" int PfaNarrowConvAvailable() { return 0; }

#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaNarrowConvFwd, Fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("pads")
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaNarrowConvFwdBias, FwdBias,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("pads")
                                  .Attr<bool>("relu")
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaNarrowConvFwdBiasRes, FwdBiasRes,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("pads")
                                  .Attr<bool>("relu")
                                  .Attr<int64_t>("threads"));
