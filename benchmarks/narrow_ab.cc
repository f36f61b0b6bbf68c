// Two builds of native/narrow_conv.cc timed against each other in one
// process (benchmarks/narrow_ab.py compiles this with -DPFA_AB_A / -DPFA_AB_B
// naming the two sources). Process-to-process timings on the shared 2-core
// VM this project measures on move by 10-30%; calls of A and B interleaved
// in one process share its state.
//
//   narrow_ab ROUNDS BATCH BUFFERS HW,C,O,RES [HW,C,O,RES ...]
//
// Each shape is a 3x3, stride-1, SAME convolution with the folded epilogue
// (bias, ReLU, and a residual when RES is 1). BUFFERS > 1 rotates the input
// through that many copies, so that each call reads a map that is not in
// cache, as inside a network. Prints one JSON object per shape: the median
// seconds of A and B over ROUNDS rounds of 3 calls each, and the largest
// difference between their outputs.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Each copy's symbols in its own namespace; the FFI handler symbols and the
// availability probe renamed, since they have C linkage.
#define PfaNarrowConvAvailable PfaNarrowConvAvailable_A
#define PfaNarrowConvFwd PfaNarrowConvFwd_A
#define PfaNarrowConvFwdBias PfaNarrowConvFwdBias_A
#define PfaNarrowConvFwdBiasRes PfaNarrowConvFwdBiasRes_A
#define PfaNarrowTailMerge PfaNarrowTailMerge_A
namespace a {
ffi::Error PfaOnTeamThread(const std::function<ffi::Error()>& f) { return f(); }
ffi::Error PfaRunConv(int64_t, const std::function<ffi::Error()>& f) {
  return f();
}
#include PFA_AB_A
}  // namespace a
#undef PfaNarrowConvAvailable
#undef PfaNarrowConvFwd
#undef PfaNarrowConvFwdBias
#undef PfaNarrowConvFwdBiasRes
#undef PfaNarrowTailMerge
#define PfaNarrowConvAvailable PfaNarrowConvAvailable_B
#define PfaNarrowConvFwd PfaNarrowConvFwd_B
#define PfaNarrowConvFwdBias PfaNarrowConvFwdBias_B
#define PfaNarrowConvFwdBiasRes PfaNarrowConvFwdBiasRes_B
#define PfaNarrowTailMerge PfaNarrowTailMerge_B
namespace b {
ffi::Error PfaOnTeamThread(const std::function<ffi::Error()>& f) { return f(); }
ffi::Error PfaRunConv(int64_t, const std::function<ffi::Error()>& f) {
  return f();
}
#include PFA_AB_B
}  // namespace b

namespace {

template <class S, class E>
using Fn = void (*)(const S&, const float*, const float*, const float*,
                    float*, const E&, int);

#define PFA_AB_TABLE(NS)                                                   \
  {NS::Any<1>,  NS::Any<2>,  NS::Any<3>,  NS::Any<4>,  NS::Any<5>,         \
   NS::Any<6>,  NS::Any<7>,  NS::Any<8>,  NS::Any<9>,  NS::Any<10>,        \
   NS::Any<11>, NS::Any<12>, NS::Any<13>, NS::Any<14>, NS::Any<15>,        \
   NS::Any<16>}
const Fn<a::Shape, a::Epi> kA[16] = PFA_AB_TABLE(a);
const Fn<b::Shape, b::Epi> kB[16] = PFA_AB_TABLE(b);

double Now() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Appends the mean seconds of 3 calls of f to out.
template <class F>
void Time3(F f, std::vector<double>& out) {
  const double t0 = Now();
  for (int i = 0; i < 3; ++i) f();
  out.push_back((Now() - t0) / 3);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s ROUNDS BATCH BUFFERS HW,C,O,RES...\n",
                 argv[0]);
    return 2;
  }
  const int rounds = std::atoi(argv[1]), n = std::atoi(argv[2]),
            buffers = std::atoi(argv[3]);
  const int team = omp_get_max_threads();
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  for (int arg = 4; arg < argc; ++arg) {
    int hw, c, o, res;
    if (std::sscanf(argv[arg], "%d,%d,%d,%d", &hw, &c, &o, &res) != 4 ||
        o < 1 || o > 16 || c < 1 || hw < 16 || rounds < 1 || n < 1 ||
        buffers < 1) {
      std::fprintf(stderr, "bad shape or count: %s\n", argv[arg]);
      return 2;
    }
    const size_t x_sz = size_t(n) * hw * hw * c, y_sz = size_t(n) * hw * hw * o;
    std::vector<std::vector<float>> xs(buffers, std::vector<float>(x_sz));
    for (float& v : xs[0]) v = std::max(0.0f, normal(gen));
    for (int i = 1; i < buffers; ++i) xs[i] = xs[0];
    std::vector<float> k(9 * c * o), bias(o), r(y_sz), ya(y_sz), yb(y_sz);
    for (float& v : k) v = normal(gen) / (3.0f * std::sqrt(float(c)));
    for (float& v : bias) v = normal(gen);
    for (float& v : r) v = normal(gen);
    a::Shape sa{n, hw, hw, c, 3, 3, o, hw, hw, 1, 1, 1, 1, (c + 15) / 16};
    b::Shape sb{n, hw, hw, c, 3, 3, o, hw, hw, 1, 1, 1, 1, (c + 15) / 16};
    a::Epi ea;
    b::Epi eb;
    ea.bias = eb.bias = bias.data();
    ea.res = eb.res = res ? r.data() : nullptr;
    ea.relu = eb.relu = true;
    int cur = 0;
    auto run_a = [&] {
      cur = (cur + 1) % buffers;
      kA[o - 1](sa, xs[cur].data(), k.data(), nullptr, ya.data(), ea, team);
    };
    auto run_b = [&] {
      cur = (cur + 1) % buffers;
      kB[o - 1](sb, xs[cur].data(), k.data(), nullptr, yb.data(), eb, team);
    };
    run_a();
    run_b();
    double diff = 0;
    for (size_t i = 0; i < y_sz; ++i)
      diff = std::max(diff, double(std::fabs(ya[i] - yb[i])));
    std::vector<double> ta, tb;
    for (int i = 0; i < rounds; ++i) {
      Time3(run_a, ta);
      Time3(run_b, tb);
    }
    std::sort(ta.begin(), ta.end());
    std::sort(tb.begin(), tb.end());
    std::printf(
        "{\"hw\": %d, \"cin\": %d, \"cout\": %d, \"residual\": %s, "
        "\"a_s\": %.9g, \"b_s\": %.9g, \"max_abs_diff\": %.9g}\n",
        hw, c, o, res ? "true" : "false", ta[rounds / 2], tb[rounds / 2],
        diff);
    std::fflush(stdout);
  }
  return 0;
}
