// XLA FFI handlers: 2-D convolution with oneDNN (forward, backward data,
// backward weights), float32, NHWC activations and HWIO kernels.
//
// Every operand may carry extra leading (vmap) dimensions; they are looped
// over, one convolution each (vmap_method='broadcast_all' on the Python side
// gives all operands the same ones). Strides and explicit (low, high) pads
// are attributes; no dilation, one group.
//
// oneDNN picks its own blocked weight layout (format_tag::any), so HWIO
// kernels are reordered in (forward, backward data) and the weight gradient
// is reordered out. Primitives and their reorders are created once per shape
// and cached (creation costs milliseconds: more than a small layer's run).
// The scratchpad is user-managed, in a per-thread buffer; executions are
// serialised (one OpenMP team on the cores at a time). oneDNN's OpenMP team size is set
// per call from the "threads" attribute (0: leave OpenMP's default).
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

// Every oneDNN and fused-BN call runs on one "team thread", one call at a
// time. XLA may run two independent convolutions (a layer's two gradients),
// or a convolution and a fused batch norm (bn_act.cc), on two of its
// threads at once, and two OpenMP teams would oversubscribe the cores. And
// libgomp keeps one pool of worker threads per thread that opens a parallel
// region: started from XLA's several worker threads, the calls would leave
// several pools spinning after their regions (GOMP_SPINCOUNT), stealing the
// cores from the next call's team. From one thread there is one pool.
class TeamThread {
 public:
  ffi::Error Run(const std::function<ffi::Error()>& task) {
    std::lock_guard<std::mutex> serial(serial_mu_);
    if (!enabled_.load()) return task();
    std::unique_lock<std::mutex> lock(mu_);
    if (owner_pid_ != getpid()) {  // first call, or a forked child
      owner_pid_ = getpid();
      std::thread([this] { Loop(); }).detach();
    }
    task_ = &task;
    done_ = false;
    work_cv_.notify_one();
    done_cv_.wait(lock, [this] { return done_; });
    return std::move(result_);
  }
  void set_enabled(bool on) {
    std::lock_guard<std::mutex> serial(serial_mu_);
    enabled_.store(on);
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [this] { return task_ != nullptr; });
      const std::function<ffi::Error()>* task = task_;
      task_ = nullptr;
      lock.unlock();
      ffi::Error result = (*task)();
      lock.lock();
      result_ = std::move(result);
      done_ = true;
      done_cv_.notify_one();
    }
  }

  std::mutex serial_mu_;  // one caller at a time
  std::mutex mu_;         // guards the fields below
  std::condition_variable work_cv_, done_cv_;
  const std::function<ffi::Error()>* task_ = nullptr;
  ffi::Error result_ = ffi::Error::Success();
  bool done_ = false;
  pid_t owner_pid_ = 0;
  std::atomic<bool> enabled_{true};
};

TeamThread& Team() {
  static TeamThread* team = new TeamThread;  // never destroyed: its thread
  return *team;                              // outlives static destructors
}

}  // namespace

ffi::Error PfaOnTeamThread(const std::function<ffi::Error()>& task) {
  return Team().Run(task);
}

// A convolution whose "threads" attribute is 1 runs on the calling thread:
// a single-threaded call opens no OpenMP team, so it leaves no spinning
// pool behind, and it skips the two thread hand-offs (~18 us a call on
// this VM), which cost more than a second thread gains on a small layer
// (pfa_jax.onednn.call_threads picks 1 for those).
ffi::Error PfaRunConv(int64_t threads,
                      const std::function<ffi::Error()>& task) {
  return threads == 1 ? task() : Team().Run(task);
}

extern "C" int PfaNarrowTailMerge(const int64_t* geo, int64_t wide, int64_t mc,
                                  const float* x, const float* k,
                                  const float* bias, const float* res,
                                  float* y, const float* main, int relu,
                                  int team);

namespace {

// kFwdFused: the inference forward with a bias, then optionally a residual
// added (sum post-op: the residual is in dst beforehand) and a ReLU (eltwise
// post-op): a convolution with its batch norm folded in
// (pfa_jax.onednn.conv_bias_act).
enum Op : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2, kFwdFused = 3 };

struct Fused {
  const float* bias = nullptr;  // [G..., O]
  const float* res = nullptr;   // [G..., N, Ho, Wo, O] or null
  bool relu = false;
  // The primitive reads the HWIO weights as they are, with no per-call
  // reorder into oneDNN's blocked layout (pfa_jax.onednn.plain_weights).
  bool plain = false;
};

struct Shape {
  int64_t n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pb, pl, pr;
};

struct Entry {
  dnnl::primitive prim;
  memory::desc act_in;   // x or dy (nhwc)
  memory::desc act_out;  // y or dx (nhwc)
  memory::desc wei;      // oneDNN's weight layout
  memory::desc wei_user; // hwio
  bool reorder = false;  // wei != wei_user
  dnnl::reorder wei_reorder;
  memory::desc scratch;
};

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

std::mutex cache_mu;
std::unordered_map<std::string, std::unique_ptr<Entry>> cache;

std::string Key(Op op, const Shape& s, const Fused& f) {
  std::string k(reinterpret_cast<const char*>(&s), sizeof(s));
  k += static_cast<char>(op);
  k += static_cast<char>((f.res ? 1 : 0) | (f.relu ? 2 : 0) |
                         (f.plain ? 4 : 0));
  // oneDNN fixes a primitive's thread count when it is created (the
  // caller's OpenMP setting): one per count, so a single-threaded call
  // (PfaRunConv) never runs a primitive that opens a team.
  k += static_cast<char>(std::min(omp_get_max_threads(), 255));
  return k;
}

Entry* Get(Op op, const Shape& s, const Fused& f) {
  const std::string key = Key(op, s, f);
  {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second.get();
  }
  auto& eng = Engine();
  const auto f32 = memory::data_type::f32;
  memory::desc src({s.n, s.c, s.h, s.w}, f32, tag::nhwc);
  memory::desc dst({s.n, s.o, s.ho, s.wo}, f32, tag::nhwc);
  memory::desc wei_any({s.o, s.c, s.kh, s.kw}, f32, tag::any);
  memory::desc wei_user({s.o, s.c, s.kh, s.kw}, f32, tag::hwio);
  memory::dims strides = {s.sh, s.sw}, pad_l = {s.pt, s.pl},
               pad_r = {s.pb, s.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, algo, src, wei_any, dst,
      strides, pad_l, pad_r, attr);
  auto e = std::make_unique<Entry>();
  e->wei_user = wei_user;
  if (op == kFwdFused) {
    dnnl::post_ops po;
    // The residual is already in dst (the FFI call aliases the two): a sum
    // post-op, which measured +0.07 ms on a 16 -> 16 32x32 batch-128 layer
    // where a binary-add post-op reading it as a second input cost +0.4 ms.
    if (f.res) po.append_sum(1.0f);
    if (f.relu) po.append_eltwise(dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
    dnnl::primitive_attr fattr;
    fattr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    fattr.set_post_ops(po);
    memory::desc bias({s.o}, f32, tag::a);
    dnnl::convolution_forward::primitive_desc pd(
        eng, dnnl::prop_kind::forward_inference, algo, src,
        f.plain ? wei_user : wei_any, bias, dst, strides, pad_l, pad_r,
        fattr);
    e->prim = dnnl::convolution_forward(pd);
    e->act_in = src, e->act_out = dst, e->wei = pd.weights_desc();
    e->scratch = pd.scratchpad_desc();
  } else if (op == kFwd) {
    e->prim = dnnl::convolution_forward(fwd);
    e->act_in = src, e->act_out = dst, e->wei = fwd.weights_desc();
    e->scratch = fwd.scratchpad_desc();
  } else if (op == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        eng, algo, src, wei_any, dst, strides, pad_l, pad_r, fwd, attr);
    e->prim = dnnl::convolution_backward_data(pd);
    e->act_in = dst, e->act_out = src, e->wei = pd.weights_desc();
    e->scratch = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        eng, algo, src, wei_any, dst, strides, pad_l, pad_r, fwd, attr);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->act_in = src, e->act_out = dst, e->wei = pd.diff_weights_desc();
    e->scratch = pd.scratchpad_desc();
  }
  e->reorder = e->wei != wei_user;
  if (e->reorder) {
    e->wei_reorder = op == kBwdWeights
                         ? dnnl::reorder(dnnl::reorder::primitive_desc(
                               eng, e->wei, eng, wei_user))
                         : dnnl::reorder(dnnl::reorder::primitive_desc(
                               eng, wei_user, eng, e->wei));
  }
  std::lock_guard<std::mutex> lock(cache_mu);
  auto& slot = cache[key];
  if (!slot) slot = std::move(e);  // another thread may have won the race
  return slot.get();
}

// Weight reorders below this size run on the calling thread alone: waking
// an OpenMP team costs more than copying a small kernel.
constexpr int64_t kSerialReorderBytes = 1 << 20;

void Reorder(dnnl::reorder& r, dnnl::stream& strm, memory& from, memory& to,
             int64_t bytes) {
  if (bytes >= kSerialReorderBytes) {
    r.execute(strm, from, to);
    return;
  }
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  r.execute(strm, from, to);
  omp_set_num_threads(threads);
}

// Per-thread buffers: scratchpad and the blocked weights.
float* Buffer(std::vector<float>& buf, size_t bytes) {
  size_t n = (bytes + sizeof(float) - 1) / sizeof(float) + 16;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

int64_t Prod(ffi::Span<const int64_t> d, size_t from, size_t to) {
  int64_t p = 1;
  for (size_t i = from; i < to; ++i) p *= d[i];
  return p;
}

// a: the activation whose spatial dims are (h, w) [..., N, H, W, C];
// b: the other activation [..., N, Ho, Wo, O]; k: kernel [..., KH, KW, C, O].
ffi::Error Run(Op op, const float* a_in, const float* b_in, float* out,
               ffi::Span<const int64_t> x_dims,
               ffi::Span<const int64_t> k_dims,
               ffi::Span<const int64_t> y_dims,
               ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> pads, int64_t threads,
               const Fused& fused = Fused()) {
  const size_t r = x_dims.size();
  if (r < 4 || k_dims.size() != r || y_dims.size() != r ||
      strides.size() != 2 || pads.size() != 4)
    return ffi::Error::InvalidArgument("onednn_conv: bad ranks or attributes");
  Shape s{x_dims[r - 4], x_dims[r - 3], x_dims[r - 2], x_dims[r - 1],
          k_dims[r - 4], k_dims[r - 3], k_dims[r - 1], y_dims[r - 3],
          y_dims[r - 2], strides[0], strides[1], pads[0], pads[1],
          pads[2], pads[3]};
  if (k_dims[r - 2] != s.c || y_dims[r - 4] != s.n || y_dims[r - 1] != s.o)
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes");
  const int64_t groups = Prod(x_dims, 0, r - 4);
  if (Prod(k_dims, 0, r - 4) != groups || Prod(y_dims, 0, r - 4) != groups)
    return ffi::Error::InvalidArgument("onednn_conv: batch dims differ");
  const int64_t x_sz = s.n * s.h * s.w * s.c, y_sz = s.n * s.ho * s.wo * s.o,
                k_sz = s.kh * s.kw * s.c * s.o;
  const int64_t k_bytes = k_sz * static_cast<int64_t>(sizeof(float));
  thread_local std::vector<float> scratch_buf, wei_buf;
  return PfaRunConv(threads, [&]() -> ffi::Error {
  // The team size is the calling thread's OpenMP setting: restored after.
  const int prev_threads = omp_get_max_threads();
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  try {
    Entry* e = Get(op, s, fused);
    auto& eng = Engine();
    thread_local dnnl::stream strm(eng);
    memory scratch(e->scratch, eng,
                   Buffer(scratch_buf, e->scratch.get_size()));
    float* wei_ptr =
        e->reorder ? Buffer(wei_buf, e->wei.get_size()) : nullptr;
    for (int64_t g = 0; g < groups; ++g) {
      if (op == kFwd || op == kFwdFused) {  // a = x, b = k, out = y
        const float* x = a_in + g * x_sz;
        const float* k = b_in + g * k_sz;
        memory wu(e->wei_user, eng, const_cast<float*>(k));
        memory w = wu;
        if (e->reorder) {
          w = memory(e->wei, eng, wei_ptr);
          Reorder(e->wei_reorder, strm, wu, w, k_bytes);
        }
        std::unordered_map<int, memory> args{
            {DNNL_ARG_SRC, memory(e->act_in, eng, const_cast<float*>(x))},
            {DNNL_ARG_WEIGHTS, w},
            {DNNL_ARG_DST, memory(e->act_out, eng, out + g * y_sz)},
            {DNNL_ARG_SCRATCHPAD, scratch}};
        if (op == kFwdFused) {
          args[DNNL_ARG_BIAS] =
              memory({{s.o}, memory::data_type::f32, tag::a}, eng,
                     const_cast<float*>(fused.bias + g * s.o));
        }
        e->prim.execute(strm, args);
      } else if (op == kBwdData) {  // a = dy, b = k, out = dx
        const float* dy = a_in + g * y_sz;
        const float* k = b_in + g * k_sz;
        memory wu(e->wei_user, eng, const_cast<float*>(k));
        memory w = wu;
        if (e->reorder) {
          w = memory(e->wei, eng, wei_ptr);
          Reorder(e->wei_reorder, strm, wu, w, k_bytes);
        }
        e->prim.execute(
            strm,
            {{DNNL_ARG_DIFF_DST, memory(e->act_in, eng, const_cast<float*>(dy))},
             {DNNL_ARG_WEIGHTS, w},
             {DNNL_ARG_DIFF_SRC, memory(e->act_out, eng, out + g * x_sz)},
             {DNNL_ARG_SCRATCHPAD, scratch}});
      } else {  // a = x, b = dy, out = dk
        const float* x = a_in + g * x_sz;
        const float* dy = b_in + g * y_sz;
        memory wu(e->wei_user, eng, out + g * k_sz);
        memory w = e->reorder ? memory(e->wei, eng, wei_ptr) : wu;
        e->prim.execute(
            strm,
            {{DNNL_ARG_SRC, memory(e->act_in, eng, const_cast<float*>(x))},
             {DNNL_ARG_DIFF_DST, memory(e->act_out, eng, const_cast<float*>(dy))},
             {DNNL_ARG_DIFF_WEIGHTS, w},
             {DNNL_ARG_SCRATCHPAD, scratch}});
        if (e->reorder) Reorder(e->wei_reorder, strm, w, wu, k_bytes);
      }
    }
    strm.wait();
  } catch (const std::exception& err) {
    if (threads > 0) omp_set_num_threads(prev_threads);
    return ffi::Error::Internal(std::string("oneDNN: ") + err.what());
  }
  if (threads > 0) omp_set_num_threads(prev_threads);
  return ffi::Error::Success();
  });
}

ffi::Error Fwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
               ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> pads, int64_t threads) {
  return Run(kFwd, x.typed_data(), k.typed_data(), y->typed_data(),
             x.dimensions(), k.dimensions(), y->dimensions(), strides, pads,
             threads);
}

ffi::Error CheckBias(ffi::Span<const int64_t> k_dims,
                     ffi::Span<const int64_t> b_dims) {
  const size_t r = k_dims.size();
  if (r < 4 || b_dims.size() != r - 3 || b_dims[r - 4] != k_dims[r - 1] ||
      Prod(b_dims, 0, r - 4) != Prod(k_dims, 0, r - 4))
    return ffi::Error::InvalidArgument("onednn_conv: bias shape");
  return ffi::Error::Success();
}

ffi::Error FwdBias(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y,
                   ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> pads, bool relu, int64_t threads,
                   bool plain) {
  if (auto e = CheckBias(k.dimensions(), b.dimensions()); e.failure())
    return e;
  Fused f;
  f.bias = b.typed_data(), f.relu = relu, f.plain = plain;
  return Run(kFwdFused, x.typed_data(), k.typed_data(), y->typed_data(),
             x.dimensions(), k.dimensions(), y->dimensions(), strides, pads,
             threads, f);
}

ffi::Error FwdBiasRes(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                      ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> res,
                      ffi::ResultBuffer<ffi::F32> y,
                      ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> pads, bool relu,
                      int64_t threads, bool plain) {
  if (auto e = CheckBias(k.dimensions(), b.dimensions()); e.failure())
    return e;
  if (res.element_count() != y->element_count())
    return ffi::Error::InvalidArgument("onednn_conv: residual shape");
  // y aliases res (input_output_aliases); XLA may still give y its own
  // buffer, which then starts as the residual.
  if (y->typed_data() != res.typed_data())
    std::memcpy(y->typed_data(), res.typed_data(), res.size_bytes());
  Fused f;
  f.bias = b.typed_data(), f.res = res.typed_data(), f.relu = relu;
  f.plain = plain;
  return Run(kFwdFused, x.typed_data(), k.typed_data(), y->typed_data(),
             x.dimensions(), k.dimensions(), y->dimensions(), strides, pads,
             threads, f);
}

// The split forward (pfa_jax.onednn.tail_split): a layer of 16 m + t
// outputs (1 <= t <= 15) as oneDNN's forward on its first 16 m channels,
// into a scratch map, and the narrow row kernel on the last t, which also
// merges the scratch channels into y pixel by pixel
// (PfaNarrowTailMerge, narrow_conv.cc). oneDNN's last, partial vector of
// 16 output channels costs a whole one.
ffi::Error Split(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                 ffi::Buffer<ffi::F32> b, const float* res, float* y,
                 ffi::Span<const int64_t> y_dims,
                 ffi::Span<const int64_t> strides,
                 ffi::Span<const int64_t> pads, bool relu, int64_t threads,
                 bool plain) {
  if (auto e = CheckBias(k.dimensions(), b.dimensions()); e.failure())
    return e;
  const auto xd = x.dimensions(), kd = k.dimensions();
  const size_t r = xd.size();
  if (r < 4 || kd.size() != r || y_dims.size() != r || strides.size() != 2 ||
      pads.size() != 4)
    return ffi::Error::InvalidArgument("split_conv: bad ranks or attributes");
  const int64_t o = kd[r - 1], mc = o - o % 16, groups = Prod(xd, 0, r - 4);
  if (mc < 16 || mc == o)
    return ffi::Error::InvalidArgument("split_conv: needs 16 m + t outputs");
  const int64_t taps_c = kd[r - 4] * kd[r - 3] * kd[r - 2];
  const int64_t n = xd[r - 4], ho = y_dims[r - 3], wo = y_dims[r - 2];
  const int64_t x_sz = n * xd[r - 3] * xd[r - 2] * xd[r - 1],
                y_sz = n * ho * wo * o, m_sz = n * ho * wo * mc;
  thread_local std::vector<float> w_main, b_main, y_main;
  w_main.resize(groups * taps_c * mc);
  b_main.resize(groups * mc);
  y_main.resize(groups * m_sz);
  for (int64_t g = 0; g < groups; ++g) {
    const float* kg = k.typed_data() + g * taps_c * o;
    for (int64_t i = 0; i < taps_c; ++i)
      std::memcpy(&w_main[(g * taps_c + i) * mc], kg + i * o,
                  mc * sizeof(float));
    std::memcpy(&b_main[g * mc], b.typed_data() + g * o, mc * sizeof(float));
  }
  std::vector<int64_t> k_main(kd.begin(), kd.end()),
      y_main_dims(y_dims.begin(), y_dims.end());
  k_main[r - 1] = y_main_dims[r - 1] = mc;
  Fused f;
  f.bias = b_main.data(), f.relu = relu && res == nullptr, f.plain = plain;
  if (auto e = Run(kFwdFused, x.typed_data(), w_main.data(), y_main.data(),
                   xd, k_main, y_main_dims, strides, pads, threads, f);
      e.failure())
    return e;
  // Not y_main inside the lambda: a thread_local named there is the team
  // thread's own.
  const float* main_map = y_main.data();
  return PfaRunConv(threads, [&]() -> ffi::Error {
    const int team =
        threads > 0 ? static_cast<int>(threads) : omp_get_max_threads();
    const int64_t geo[12] = {n,      xd[r - 3],  xd[r - 2],  xd[r - 1],
                             kd[r - 4], kd[r - 3], ho,       wo,
                             strides[0], strides[1], pads[0], pads[2]};
    for (int64_t g = 0; g < groups; ++g) {
      if (PfaNarrowTailMerge(geo, o, mc, x.typed_data() + g * x_sz,
                             k.typed_data() + g * taps_c * o,
                             b.typed_data() + g * o,
                             res ? res + g * y_sz : nullptr, y + g * y_sz,
                             main_map + g * m_sz, relu ? 1 : 0,
                             team) != 0)
        return ffi::Error::InvalidArgument("split_conv: unsupported shapes");
    }
    return ffi::Error::Success();
  });
}

ffi::Error SplitBias(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y,
                     ffi::Span<const int64_t> strides,
                     ffi::Span<const int64_t> pads, bool relu,
                     int64_t threads, bool plain) {
  return Split(x, k, b, nullptr, y->typed_data(), y->dimensions(), strides,
               pads, relu, threads, plain);
}

ffi::Error SplitBiasRes(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> res,
                        ffi::ResultBuffer<ffi::F32> y,
                        ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> pads, bool relu,
                        int64_t threads, bool plain) {
  if (res.element_count() != y->element_count())
    return ffi::Error::InvalidArgument("split_conv: residual shape");
  // y aliases res, as in FwdBiasRes; where XLA gave y its own buffer, it
  // starts as the residual.
  if (y->typed_data() != res.typed_data())
    std::memcpy(y->typed_data(), res.typed_data(), res.size_bytes());
  return Split(x, k, b, y->typed_data(), y->typed_data(), y->dimensions(),
               strides, pads, relu, threads, plain);
}

ffi::Error BwdData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> dx,
                   ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> pads, int64_t threads) {
  return Run(kBwdData, dy.typed_data(), k.typed_data(), dx->typed_data(),
             dx->dimensions(), k.dimensions(), dy.dimensions(), strides, pads,
             threads);
}

ffi::Error BwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk,
                      ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> pads, int64_t threads) {
  return Run(kBwdWeights, x.typed_data(), dy.typed_data(), dk->typed_data(),
             x.dimensions(), dk->dimensions(), dy.dimensions(), strides, pads,
             threads);
}

// The identity, called with its output aliased to its input: a fusion
// boundary XLA:CPU cannot see through (pfa_jax.onednn.materialize). XLA may
// still give the output its own buffer (it then copies to honour the alias
// elsewhere); copy only in that case.
ffi::Error Materialize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  if (out->untyped_data() != x.untyped_data()) {
    std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace

#define PFA_BIND                                   \
  ffi::Ffi::Bind()                                 \
      .Arg<ffi::Buffer<ffi::F32>>()                \
      .Arg<ffi::Buffer<ffi::F32>>()                \
      .Ret<ffi::Buffer<ffi::F32>>()                \
      .Attr<ffi::Span<const int64_t>>("strides")   \
      .Attr<ffi::Span<const int64_t>>("pads")      \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaDnnlConvFwd, Fwd, PFA_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaDnnlConvBwdData, BwdData, PFA_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaDnnlConvBwdWeights, BwdWeights, PFA_BIND);
// The folded forwards: x, kernel, bias[, residual] -> y.
#define PFA_F32 .Arg<ffi::Buffer<ffi::F32>>()
#define PFA_BIND_FUSED(ARGS)                       \
  ffi::Ffi::Bind() ARGS                            \
      .Ret<ffi::Buffer<ffi::F32>>()                \
      .Attr<ffi::Span<const int64_t>>("strides")   \
      .Attr<ffi::Span<const int64_t>>("pads")      \
      .Attr<bool>("relu")                          \
      .Attr<int64_t>("threads")                    \
      .Attr<bool>("plain_weights")

XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaDnnlConvFwdBias, FwdBias,
                              PFA_BIND_FUSED(PFA_F32 PFA_F32 PFA_F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaDnnlConvFwdBiasRes, FwdBiasRes,
                              PFA_BIND_FUSED(PFA_F32 PFA_F32 PFA_F32 PFA_F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaSplitConvFwdBias, SplitBias,
                              PFA_BIND_FUSED(PFA_F32 PFA_F32 PFA_F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaSplitConvFwdBiasRes, SplitBiasRes,
                              PFA_BIND_FUSED(PFA_F32 PFA_F32 PFA_F32 PFA_F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfaMaterialize, Materialize,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// Whether calls run on the team thread (1, the default) or on XLA's calling
// thread (0): a switch for benchmarks and tests.
extern "C" void PfaSetTeamThread(int on) { Team().set_enabled(on != 0); }

// Number of cached primitives (for tests and benchmarks).
extern "C" int64_t PfaDnnlCacheSize() {
  std::lock_guard<std::mutex> lock(cache_mu);
  return static_cast<int64_t>(cache.size());
}
