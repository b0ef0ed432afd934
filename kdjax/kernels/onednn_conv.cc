// oneDNN 2-D convolutions as XLA FFI handlers for the CPU backend (see onednn.py).
//
// Layouts are XLA's row-major defaults for NHWC activations and HWIO kernels:
//   x  [N, H, W, C]      w  [KH, KW, C, O]      y  [N, OH, OW, O]
//   OH = (H + pad_top + pad_bottom - KH) / stride_h + 1   (likewise OW)
// Three handlers, one per pass, no dilation, no groups, all operands float32 or all bfloat16
// (bfloat16: float32 accumulation, one rounding of the result):
//   kdjax_onednn_conv_fwd           y  = conv(x, w)
//   kdjax_onednn_conv_bwd_data      dx = d<y, dy>/dx   (result shape gives x's shape)
//   kdjax_onednn_conv_bwd_weights   dw = d<y, dy>/dw   (result shape gives w's shape)
// Attributes: strides = [sh, sw], padding = [top, bottom, left, right] (int64 arrays).
//
// Activations stay in NHWC (oneDNN's brgemm kernels read it directly); kernels are reordered
// between HWIO and the layout the primitive picks. Primitives are built once per geometry, for one
// thread, and cached. Each call splits the batch into one chunk per thread of XLA's intra-op pool
// (the pool that runs XLA's own ops) and completes asynchronously: no OpenMP team competes with
// XLA for the cores, and no thread blocks (see Call).

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

enum Pass { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution's shape: x [n, h, w, c], kernel [kh, kw, c, o], strides, padding; and the
// element type of x, w and y (f32 or bf16).
struct Geometry {
  std::array<int64_t, 13> v;  // n h w c kh kw o sh sw top bottom left right
  memory::data_type dt = memory::data_type::f32;
  int64_t oh() const { return (v[1] + v[9] + v[10] - v[4]) / v[7] + 1; }
  int64_t ow() const { return (v[2] + v[11] + v[12] - v[5]) / v[8] + 1; }
  int64_t bytes() const { return dt == memory::data_type::bf16 ? 2 : 4; }  // per element
  memory::desc x() const { return {{v[0], v[3], v[1], v[2]}, dt, Tag::nhwc}; }
  memory::desc y() const { return {{v[0], v[6], oh(), ow()}, dt, Tag::nhwc}; }
  memory::desc w(Tag tag) const { return w(tag, dt); }
  memory::desc w(Tag tag, memory::data_type type) const {
    return {{v[6], v[3], v[4], v[5]}, type, tag};
  }
  memory::dims strides() const { return {v[7], v[8]}; }
  memory::dims pad_l() const { return {v[9], v[11]}; }
  memory::dims pad_r() const { return {v[10], v[12]}; }
};

// A built primitive for one pass, and what converts its kernel to or from HWIO (if needed).
struct Plan {
  dnnl::primitive prim;
  memory::desc prim_w;       // the primitive's kernel layout
  memory::desc hwio_w;       // the caller's kernel layout
  bool reorder_w = false;    // prim_w != hwio_w
  dnnl::reorder w_reorder;   // hwio -> prim (fwd, bwd_data) or prim -> hwio (bwd_weights)
  dnnl::reorder w_accumulate;  // bwd_weights in f32: dw += prim -> hwio (adds up the chunks)
  dnnl::reorder partial_accumulate;  // bwd_weights in bf16: partial += prim, both float32
  size_t scratchpad_bytes = 0;  // what the primitive asks for
  size_t scratchpad_alloc = 0;  // what it gets (more: see Build)
  std::string impl;          // oneDNN's implementation name, e.g. "brgconv:avx512_core"
};

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g,
                                                    const dnnl::primitive_attr& attr) {
#if DNNL_VERSION_MAJOR >= 3
  return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          g.x(), g.w(Tag::any), g.y(), g.strides(), g.pad_l(), g.pad_r(), attr};
#else
  return {{dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.x(),
           g.w(Tag::any), g.y(), g.strides(), g.pad_l(), g.pad_r()},
          attr, Engine()};
#endif
}

// The backward passes' primitive descriptors, from their memory descriptors (x, the kernel, y) and
// the forward one as a hint, in oneDNN 3.x's form or 2.x's.
template <typename Pd>
Pd BackwardPd(const Geometry& g, const memory::desc& w, const dnnl::primitive_attr& attr,
              const dnnl::convolution_forward::primitive_desc& fwd) {
#if DNNL_VERSION_MAJOR >= 3
  return Pd(Engine(), dnnl::algorithm::convolution_direct, g.x(), w, g.y(), g.strides(),
            g.pad_l(), g.pad_r(), fwd, attr);
#else
  return Pd({dnnl::algorithm::convolution_direct, g.x(), w, g.y(), g.strides(), g.pad_l(),
             g.pad_r()},
            attr, Engine(), fwd);
#endif
}

// Fills the plan's primitive, kernel layout, scratchpad size and name from a primitive descriptor.
template <typename Primitive, typename Pd>
void Adopt(const Pd& pd, const memory::desc& prim_w, Plan* plan) {
  plan->prim = Primitive(pd);
  plan->prim_w = prim_w;
  plan->scratchpad_bytes = pd.scratchpad_desc().get_size();
  plan->impl = pd.impl_info_str();
}

std::unique_ptr<Plan> Build(Pass pass, const Geometry& g) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto fwd = ForwardPd(g, attr);
  auto plan = std::make_unique<Plan>();
  plan->hwio_w = g.w(Tag::hwio);
  if (pass == kFwd) {
    Adopt<dnnl::convolution_forward>(fwd, fwd.weights_desc(), plan.get());
  } else if (pass == kBwdData) {
    auto pd = BackwardPd<dnnl::convolution_backward_data::primitive_desc>(g, g.w(Tag::any),
                                                                          attr, fwd);
    Adopt<dnnl::convolution_backward_data>(pd, pd.weights_desc(), plan.get());
  } else {  // the weight gradient in float32 (partial sums), converted to g.dt at the end
    auto pd = BackwardPd<dnnl::convolution_backward_weights::primitive_desc>(
        g, g.w(Tag::any, memory::data_type::f32), attr, fwd);
    Adopt<dnnl::convolution_backward_weights>(pd, pd.diff_weights_desc(), plan.get());
  }
  // oneDNN 2.6's jit_1x1 kernels with a stride (AVX2; "rtus": they first copy the strided input
  // into the scratchpad) write past the scratchpad size they ask for when the channels are padded
  // to the block (e.g. 4 -> 8): heap corruption in tests on AVX2. Their buffer gets room for the
  // whole input with channels padded to 16.
  plan->scratchpad_alloc = plan->scratchpad_bytes;
  if (g.v[4] == 1 && g.v[5] == 1 && (g.v[7] > 1 || g.v[8] > 1)) {
    plan->scratchpad_alloc += g.v[0] * g.v[1] * g.v[2] * ((g.v[3] + 15) / 16 * 16) * sizeof(float);
  }
  plan->reorder_w = plan->prim_w != plan->hwio_w;
  if (plan->reorder_w) {
    plan->w_reorder = pass == kBwdWeights
                          ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                Engine(), plan->prim_w, Engine(), plan->hwio_w))
                          : dnnl::reorder(dnnl::reorder::primitive_desc(
                                Engine(), plan->hwio_w, Engine(), plan->prim_w));
  }
  if (pass == kBwdWeights) {
    dnnl::post_ops add;
    add.append_sum(1.0f);
    dnnl::primitive_attr accumulate;
    accumulate.set_post_ops(add);
    if (g.dt == memory::data_type::f32) {
      plan->w_accumulate = dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), plan->prim_w, Engine(), plan->hwio_w, accumulate));
    } else {
      plan->partial_accumulate = dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), plan->prim_w, Engine(), plan->prim_w, accumulate));
    }
  }
  return plan;
}

// A buffer that grows to the largest size asked for and is reused (uninitialised: the primitives
// write before they read). One per thread and purpose: a thread runs one primitive at a time.
class Workspace {
 public:
  void* Get(size_t bytes) {
    if (bytes > size_) {
      data_.reset(new uint8_t[bytes]);
      size_ = bytes;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<uint8_t[]> data_;
  size_t size_ = 0;
};

// One OpenMP thread for oneDNN while it lives. The calling thread may share OpenMP with other
// code (the Python thread, when XLA runs a call on it, or through implementation()): it gets its
// own setting back, even if what runs meanwhile throws.
struct OneOmpThread {
  const int saved = omp_get_max_threads();
  OneOmpThread() { omp_set_num_threads(1); }
  ~OneOmpThread() { omp_set_num_threads(saved); }
};

// Plans are built for one thread: XLA's pool, not OpenMP, spreads the batch over the cores.
const Plan& GetPlan(Pass pass, const Geometry& g) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, std::array<int64_t, 13>>, std::unique_ptr<Plan>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[{pass, static_cast<int>(g.dt), g.v}];
  if (!slot) {
    // oneDNN sizes its work split by the threads at creation.
    OneOmpThread one_thread;
    slot = Build(pass, g);
  }
  return *slot;
}

memory Scratchpad(const Plan& plan, Workspace* ws) {
  return memory(memory::desc({static_cast<int64_t>(plan.scratchpad_bytes)}, memory::data_type::u8,
                             Tag::x),
                Engine(), ws->Get(plan.scratchpad_alloc));
}

// One pass split over the batch: chunk i holds rows [begin(i), begin(i + 1)) of the activations.
// fwd: a = x, b = w, out = y; bwd_data: a = dy, b = w, out = dx;
// bwd_weights: a = x, b = dy, out = dw (activations NHWC, kernels HWIO). Chunks of the weight
// gradient are partial sums over their rows, written to `partials` and added up at the end.
struct Job {
  Pass pass;
  Geometry g;
  const char* a;  // bytes: elements of g.dt
  const char* b;
  char* out;
  int64_t chunks;
  const Plan* plans[2];  // for the first chunk and the last (a row fewer if chunks do not divide n)
  void* w;               // the kernel in the plans' layout (fwd, bwd_data)
  float* partials;       // chunks x the kernel's bytes (bwd_weights)

  // The kernel layout, the same for both plans (Run checks).
  const memory::desc& prim_w() const { return plans[0]->prim_w; }
  // Where chunk i's weight gradient goes: straight into dw when it is the only or first one and
  // already HWIO, else into its slot of the partial sums.
  float* dw(int64_t i) const {
    return i == 0 && !plans[0]->reorder_w ? reinterpret_cast<float*>(out)
                                          : partials + i * (prim_w().get_size() / sizeof(float));
  }

  int64_t begin(int64_t i) const {
    const int64_t n = g.v[0], q = n / chunks, r = n % chunks;
    return i * q + std::min(i, r);
  }
  Geometry chunk_geometry(int64_t i) const {
    Geometry c = g;
    c.v[0] = begin(i + 1) - begin(i);
    return c;
  }
  const Plan& plan(int64_t i) const { return *plans[begin(i + 1) - begin(i) != begin(1)]; }

  // Runs chunk i on the calling thread.
  void RunChunk(int64_t i) const {
    omp_set_num_threads(1);
    static thread_local Workspace scratch;
    const Geometry c = chunk_geometry(i);
    const Plan& p = plan(i);
    const int64_t row = begin(i);  // and the bytes of one row of x and of y:
    const int64_t x_row = g.v[1] * g.v[2] * g.v[3] * g.bytes();
    const int64_t y_row = g.oh() * g.ow() * g.v[6] * g.bytes();
    dnnl::stream stream(Engine());
    auto mem = [](const memory::desc& d, const void* ptr) {
      return memory(d, Engine(), const_cast<void*>(ptr));
    };
    if (pass == kFwd) {
      p.prim.execute(stream, {{DNNL_ARG_SRC, mem(c.x(), a + row * x_row)},
                              {DNNL_ARG_WEIGHTS, memory(prim_w(), Engine(), w)},
                              {DNNL_ARG_DST, mem(c.y(), out + row * y_row)},
                              {DNNL_ARG_SCRATCHPAD, Scratchpad(p, &scratch)}});
    } else if (pass == kBwdData) {
      p.prim.execute(stream, {{DNNL_ARG_DIFF_DST, mem(c.y(), a + row * y_row)},
                              {DNNL_ARG_WEIGHTS, memory(prim_w(), Engine(), w)},
                              {DNNL_ARG_DIFF_SRC, mem(c.x(), out + row * x_row)},
                              {DNNL_ARG_SCRATCHPAD, Scratchpad(p, &scratch)}});
    } else {
      p.prim.execute(stream, {{DNNL_ARG_SRC, mem(c.x(), a + row * x_row)},
                              {DNNL_ARG_DIFF_DST, mem(c.y(), b + row * y_row)},
                              {DNNL_ARG_DIFF_WEIGHTS, mem(prim_w(), dw(i))},
                              {DNNL_ARG_SCRATCHPAD, Scratchpad(p, &scratch)}});
    }
    stream.wait();
  }
};

// Workspaces that outlive the call that took them (its chunks may finish on other threads after
// the handler has returned), handed back when the call is done and reused by later calls.
class WorkspacePool {
 public:
  std::unique_ptr<Workspace> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return std::make_unique<Workspace>();
    auto ws = std::move(free_.back());
    free_.pop_back();
    return ws;
  }
  void Give(std::unique_ptr<Workspace> ws) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(ws));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Workspace>> free_;
};

WorkspacePool& Workspaces() {
  static auto* pool = new WorkspacePool;  // never destroyed: helpers may run during exit
  return *pool;
}

ffi::Error Failed(const dnnl::error& e) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("kdjax oneDNN convolution failed: ") + e.what());
}

// One asynchronous call. Its chunks are claimed from a counter by the calling thread and by helpers
// scheduled on XLA's pool: a helper that starts late finds nothing left, so while the pool is busy
// (say with the teacher's ops beside the student's) the caller simply runs more chunks. The thread
// that finishes the last chunk adds up the weight gradient (bwd_weights), returns the workspace
// and completes the future, so no thread ever blocks waiting for another.
class Call {
 public:
  Call(const Job& job, std::unique_ptr<Workspace> ws) : job_(job), ws_(std::move(ws)) {}
  ffi::Future future() { return ffi::Future(promise_); }

  void Work() {
    for (int64_t i; (i = next_.fetch_add(1)) < job_.chunks;) {
      try {
        job_.RunChunk(i);
      } catch (const dnnl::error& e) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = Failed(e);
      }
      if (finished_.fetch_add(1) + 1 == job_.chunks) Finish();
    }
  }

 private:
  void Finish() {
    if (!error_ && job_.pass == kBwdWeights) {  // add the chunks' partial sums into dw (HWIO)
      const Plan& plan = job_.plan(0);
      try {
        dnnl::stream stream(Engine());
        memory dw(plan.hwio_w, Engine(), job_.out);
        memory first(plan.prim_w, Engine(), job_.dw(0));
        if (job_.g.dt == memory::data_type::f32) {  // dw = chunk 0's (reordered), += the others'
          if (plan.reorder_w) plan.w_reorder.execute(stream, first, dw);
          for (int64_t i = 1; i < job_.chunks; ++i) {
            memory partial(plan.prim_w, Engine(), job_.dw(i));
            plan.w_accumulate.execute(stream, partial, dw);
          }
        } else {  // bfloat16: add up in float32 into chunk 0's partial, round once into dw
          for (int64_t i = 1; i < job_.chunks; ++i) {
            memory partial(plan.prim_w, Engine(), job_.dw(i));
            plan.partial_accumulate.execute(stream, partial, first);
          }
          plan.w_reorder.execute(stream, first, dw);
        }
        stream.wait();
      } catch (const dnnl::error& e) {
        error_ = Failed(e);
      }
    }
    Workspaces().Give(std::move(ws_));
    if (error_) {
      promise_.SetError(*error_);
    } else {
      promise_.SetAvailable();
    }
  }

  const Job job_;
  std::unique_ptr<Workspace> ws_;
  std::atomic<int64_t> next_{0}, finished_{0};
  std::mutex mu_;
  std::optional<ffi::Error> error_;
  ffi::Promise promise_;
};

ffi::Future Ready(const ffi::Error& error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  if (error.failure()) {
    promise.SetError(error);
  } else {
    promise.SetAvailable();
  }
  return future;
}

ffi::Future Run(Pass pass, const Geometry& g, const void* a, const void* b, void* out,
                ffi::ThreadPool pool) {
  OneOmpThread one_thread;  // the caller runs chunks too (Work below)
  try {
    Job job{pass, g, static_cast<const char*>(a), static_cast<const char*>(b),
            static_cast<char*>(out)};
    job.chunks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), g.v[0]));
    job.plans[0] = &GetPlan(pass, job.chunk_geometry(0));
    job.plans[1] = &GetPlan(pass, job.chunk_geometry(job.chunks - 1));
    if (job.plans[0]->prim_w != job.plans[1]->prim_w) {  // never seen; keep one plan then
      job.chunks = 1;
      job.plans[0] = job.plans[1] = &GetPlan(pass, g);
    }
    const Plan& plan = *job.plans[0];
    const size_t w_bytes = plan.prim_w.get_size();
    auto ws = Workspaces().Take();
    if (pass == kBwdWeights) {
      job.partials = static_cast<float*>(ws->Get(job.chunks * w_bytes));
    } else if (plan.reorder_w) {  // the kernel in the primitive's layout, shared by the chunks
      job.w = ws->Get(w_bytes);
      dnnl::stream stream(Engine());
      memory user_w(plan.hwio_w, Engine(), const_cast<void*>(b));
      memory prim_w(plan.prim_w, Engine(), job.w);
      plan.w_reorder.execute(stream, user_w, prim_w);
      stream.wait();
    } else {
      job.w = const_cast<void*>(b);
    }
    auto call = std::make_shared<Call>(job, std::move(ws));
    ffi::Future future = call->future();
    for (int64_t i = 1; i < job.chunks; ++i) pool.Schedule([call] { call->Work(); });
    call->Work();
    return future;
  } catch (const dnnl::error& e) {
    return Ready(Failed(e));
  }
}

ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                        Geometry* g) {
  if (x.size() != 4 || w.size() != 4 || strides.size() != 2 || padding.size() != 4 ||
      x[3] != w[2]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "kdjax oneDNN convolution: expected x [N,H,W,C], w [KH,KW,C,O], 2 strides "
                      "and 4 paddings");
  }
  g->v = {x[0], x[1], x[2], x[3], w[0], w[1], w[3], strides[0], strides[1],
          padding[0], padding[1], padding[2], padding[3]};
  return ffi::Error::Success();
}

using Ints = ffi::Span<const int64_t>;

// The geometry of a call: x's shape from `x`, the kernel's from `w`, and the element type, which
// the two operands and the result must share (float32 or bfloat16).
ffi::Error CallGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, Ints strides,
                        Ints padding, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer out,
                        Geometry* g) {
  if (auto err = MakeGeometry(x, w, strides, padding, g); err.failure()) return err;
  const ffi::DataType dt = a.element_type();
  if ((dt != ffi::DataType::F32 && dt != ffi::DataType::BF16) || b.element_type() != dt ||
      out.element_type() != dt) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "kdjax oneDNN convolution: operands and result must all be float32 or all "
                      "bfloat16");
  }
  g->dt = dt == ffi::DataType::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
  return ffi::Error::Success();
}

using Any = ffi::AnyBuffer;
using AnyResult = ffi::Result<ffi::AnyBuffer>;

ffi::Future Fwd(Any x, Any w, AnyResult y, Ints strides, Ints padding, ffi::ThreadPool pool) {
  Geometry g;
  if (auto err = CallGeometry(x.dimensions(), w.dimensions(), strides, padding, x, w, *y, &g);
      err.failure()) return Ready(err);
  return Run(kFwd, g, x.untyped_data(), w.untyped_data(), y->untyped_data(), pool);
}

ffi::Future BwdData(Any dy, Any w, AnyResult dx, Ints strides, Ints padding,
                    ffi::ThreadPool pool) {
  Geometry g;
  if (auto err = CallGeometry(dx->dimensions(), w.dimensions(), strides, padding, dy, w, *dx, &g);
      err.failure()) return Ready(err);
  return Run(kBwdData, g, dy.untyped_data(), w.untyped_data(), dx->untyped_data(), pool);
}

ffi::Future BwdWeights(Any x, Any dy, AnyResult dw, Ints strides, Ints padding,
                       ffi::ThreadPool pool) {
  Geometry g;
  if (auto err = CallGeometry(x.dimensions(), dw->dimensions(), strides, padding, x, dy, *dw, &g);
      err.failure()) return Ready(err);
  return Run(kBwdWeights, g, x.untyped_data(), dy.untyped_data(), dw->untyped_data(), pool);
}

}  // namespace

#define KDJAX_CONV_BINDING                                                                  \
  ffi::Ffi::Bind().Arg<Any>().Arg<Any>().Ret<Any>().Attr<Ints>("strides").Attr<Ints>( \
      "padding").Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxOnednnConvFwd, Fwd, KDJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxOnednnConvBwdData, BwdData, KDJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxOnednnConvBwdWeights, BwdWeights, KDJAX_CONV_BINDING);

// Which oneDNN implementation serves a pass, e.g. "brgconv:avx512_core", in float32 or (bf16 != 0)
// bfloat16; "error: ..." when oneDNN has none (for onednn.py's dispatch, benchmarks and tests).
extern "C" const char* KdjaxOnednnImplName(int pass, const int64_t* geometry, int bf16) {
  static thread_local std::string name;
  try {
    Geometry g;
    for (int i = 0; i < 13; ++i) g.v[i] = geometry[i];
    if (bf16) g.dt = memory::data_type::bf16;
    name = GetPlan(static_cast<Pass>(pass), g).impl;
  } catch (const dnnl::error& e) {
    name = std::string("error: ") + e.what();
  }
  return name.c_str();
}

// The version of the oneDNN library loaded at run time, e.g. "3.2.0" (onednn.py: version()).
extern "C" const char* KdjaxOnednnVersion() {
  static const std::string version = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
  }();
  return version.c_str();
}
