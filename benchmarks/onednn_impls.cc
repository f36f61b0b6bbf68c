// Every oneDNN forward implementation for one 3x3 convolution, timed.
//
//   g++ -O2 benchmarks/onednn_impls.cc -I.venv/include -L.venv/lib \
//     -l:libdnnl.so.3 -Wl,-rpath,$PWD/.venv/lib -o /tmp/onednn_impls
//   OMP_NUM_THREADS=2 /tmp/onednn_impls CIN COUT HW [STRIDE]
//
// Batch 128, NHWC float32, forward_inference; walks the primitive
// descriptor's implementation list (next_impl) and prints the best of 17
// runs of each. Used for issue 12 section 3: whether any implementation
// runs a narrow-output layer (16 -> 4 at 32x32) faster than the full one.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "oneapi/dnnl/dnnl.hpp"
using namespace dnnl; using tag = memory::format_tag;
int main(int argc, char** argv) {
  int n = 128, c = atoi(argv[1]), o = atoi(argv[2]), h = atoi(argv[3]), s = argc > 4 ? atoi(argv[4]) : 1;
  int ho = h / s; int pl = s == 1 ? 1 : 0, pr = 1;
  engine eng(engine::kind::cpu, 0); stream strm(eng);
  auto f32 = memory::data_type::f32;
  memory::desc src({n, c, h, h}, f32, tag::nhwc), dst({n, o, ho, ho}, f32, tag::nhwc), wany({o, c, 3, 3}, f32, tag::any);
  primitive_attr attr; 
  convolution_forward::primitive_desc pd(eng, prop_kind::forward_inference, algorithm::convolution_direct, src, wany, dst, {s, s}, {pl, pl}, {s==1?1:pr-0, s==1?1:pr-0}, attr);
  std::vector<float> xs(n*c*h*h, 1.0f), ys(n*o*ho*ho), ws(o*c*9*4 + 4096, 0.5f);
  do {
    auto p = convolution_forward(pd);
    memory x(src, eng, xs.data()), y(dst, eng, ys.data()), w(pd.weights_desc(), eng, ws.data());
    std::vector<float> scratch(pd.scratchpad_desc().get_size()/4 + 16);
    double best = 1e9;
    for (int r = 0; r < 20; ++r) {
      auto t = std::chrono::steady_clock::now();
      p.execute(strm, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, y}}); strm.wait();
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
      if (r > 2 && ms < best) best = ms;
    }
    double gf = 2.0 * n * ho * ho * o * c * 9 / best / 1e6;
    printf("%3d->%3d %dx%d s%d  %-28s %7.3f ms %6.1f GFLOP/s\n", c, o, h, h, s, pd.impl_info_str(), best, gf);
  } while (pd.next_impl());
}
