// oneDNN 2-D convolutions as XLA FFI handlers for the CPU backend (see onednn.py).
//
// Layouts are XLA's row-major defaults for NHWC activations and HWIO kernels:
//   x  [N, H, W, C]      w  [KH, KW, C, O]      y  [N, OH, OW, O]
//   OH = (H + pad_top + pad_bottom - KH) / stride_h + 1   (likewise OW)
// Three handlers, one per pass, all float32, no dilation, no groups:
//   kdjax_onednn_conv_fwd           y  = conv(x, w)
//   kdjax_onednn_conv_bwd_data      dx = d<y, dy>/dx   (result shape gives x's shape)
//   kdjax_onednn_conv_bwd_weights   dw = d<y, dy>/dw   (result shape gives w's shape)
// Attributes: strides = [sh, sw], padding = [top, bottom, left, right] (int64 arrays).
//
// Activations stay in NHWC (oneDNN's brgemm kernels read it directly); kernels are reordered
// between HWIO and the layout the primitive picks. Primitives are built once per geometry and
// cached. Calls run one at a time (each uses every core), reusing one scratchpad.

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

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

// One convolution's shape: x [n, h, w, c], kernel [kh, kw, c, o], strides, padding.
struct Geometry {
  std::array<int64_t, 13> v;  // n h w c kh kw o sh sw top bottom left right
  int64_t oh() const { return (v[1] + v[9] + v[10] - v[4]) / v[7] + 1; }
  int64_t ow() const { return (v[2] + v[11] + v[12] - v[5]) / v[8] + 1; }
  memory::desc x() const { return {{v[0], v[3], v[1], v[2]}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc y() const { return {{v[0], v[6], oh(), ow()}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc w(Tag tag) const { return {{v[6], v[3], v[4], v[5]}, memory::data_type::f32, tag}; }
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
  size_t scratchpad_bytes = 0;
  std::string impl;          // oneDNN's implementation name, e.g. "brg:avx512_core"
};

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g,
                                                    const dnnl::primitive_attr& attr) {
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training,
                                    dnnl::algorithm::convolution_direct, g.x(), g.w(Tag::any),
                                    g.y(), g.strides(), g.pad_l(), g.pad_r());
  return dnnl::convolution_forward::primitive_desc(d, attr, Engine());
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
    dnnl::convolution_backward_data::primitive_desc pd(
        {dnnl::algorithm::convolution_direct, g.x(), g.w(Tag::any), g.y(), g.strides(),
         g.pad_l(), g.pad_r()},
        attr, Engine(), fwd);
    Adopt<dnnl::convolution_backward_data>(pd, pd.weights_desc(), plan.get());
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        {dnnl::algorithm::convolution_direct, g.x(), g.w(Tag::any), g.y(), g.strides(),
         g.pad_l(), g.pad_r()},
        attr, Engine(), fwd);
    Adopt<dnnl::convolution_backward_weights>(pd, pd.diff_weights_desc(), plan.get());
  }
  plan->reorder_w = plan->prim_w != plan->hwio_w;
  if (plan->reorder_w) {
    plan->w_reorder = pass == kBwdWeights
                          ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                Engine(), plan->prim_w, Engine(), plan->hwio_w))
                          : dnnl::reorder(dnnl::reorder::primitive_desc(
                                Engine(), plan->hwio_w, Engine(), plan->prim_w));
  }
  return plan;
}

// A buffer that grows to the largest size asked for and is reused (uninitialised: the primitives
// write before they read).
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

const Plan& GetPlan(Pass pass, const Geometry& g) {
  static std::mutex mu;
  static std::map<std::pair<int, std::array<int64_t, 13>>, std::unique_ptr<Plan>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[{pass, g.v}];
  if (!slot) slot = Build(pass, g);
  return *slot;
}

// Runs one pass. fwd: a = x, b = w, out = y; bwd_data: a = dy, b = w, out = dx;
// bwd_weights: a = x, b = dy, out = dw (activations NHWC, kernels HWIO).
ffi::Error Run(Pass pass, const Geometry& g, void* a, void* b, void* out) {
  try {
    const Plan& plan = GetPlan(pass, g);
    // One convolution at a time: each already uses every core (OpenMP) while XLA may start
    // independent ops together (the teacher's and the student's); concurrent calls measured no
    // faster. The lock also guards the reused buffers (fresh ones would page-fault on every call).
    static std::mutex run_mu;
    static Workspace scratch, w_buf;
    std::lock_guard<std::mutex> run_lock(run_mu);
    dnnl::stream stream(Engine());
    memory scratchpad(memory::desc({static_cast<int64_t>(plan.scratchpad_bytes)},
                                   memory::data_type::u8, Tag::x),
                      Engine(), scratch.Get(plan.scratchpad_bytes));
    const size_t w_bytes = plan.prim_w.get_size();
    if (pass == kFwd || pass == kBwdData) {
      memory user_w(plan.hwio_w, Engine(), b);
      memory prim_w = plan.reorder_w ? memory(plan.prim_w, Engine(), w_buf.Get(w_bytes)) : user_w;
      if (plan.reorder_w) plan.w_reorder.execute(stream, user_w, prim_w);
      if (pass == kFwd) {
        plan.prim.execute(stream, {{DNNL_ARG_SRC, memory(g.x(), Engine(), a)},
                                   {DNNL_ARG_WEIGHTS, prim_w},
                                   {DNNL_ARG_DST, memory(g.y(), Engine(), out)},
                                   {DNNL_ARG_SCRATCHPAD, scratchpad}});
      } else {
        plan.prim.execute(stream, {{DNNL_ARG_DIFF_DST, memory(g.y(), Engine(), a)},
                                   {DNNL_ARG_WEIGHTS, prim_w},
                                   {DNNL_ARG_DIFF_SRC, memory(g.x(), Engine(), out)},
                                   {DNNL_ARG_SCRATCHPAD, scratchpad}});
      }
    } else {
      memory user_dw(plan.hwio_w, Engine(), out);
      memory prim_dw = plan.reorder_w ? memory(plan.prim_w, Engine(), w_buf.Get(w_bytes)) : user_dw;
      plan.prim.execute(stream, {{DNNL_ARG_SRC, memory(g.x(), Engine(), a)},
                                 {DNNL_ARG_DIFF_DST, memory(g.y(), Engine(), b)},
                                 {DNNL_ARG_DIFF_WEIGHTS, prim_dw},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (plan.reorder_w) plan.w_reorder.execute(stream, prim_dw, user_dw);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("kdjax oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
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

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Fwd(F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y, Ints strides, Ints padding) {
  Geometry g;
  if (auto err = MakeGeometry(x.dimensions(), w.dimensions(), strides, padding, &g);
      err.failure()) return err;
  return Run(kFwd, g, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error BwdData(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32> dx, Ints strides, Ints padding) {
  Geometry g;
  if (auto err = MakeGeometry(dx->dimensions(), w.dimensions(), strides, padding, &g);
      err.failure()) return err;
  return Run(kBwdData, g, dy.untyped_data(), w.untyped_data(), dx->untyped_data());
}

ffi::Error BwdWeights(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw, Ints strides,
                      Ints padding) {
  Geometry g;
  if (auto err = MakeGeometry(x.dimensions(), dw->dimensions(), strides, padding, &g);
      err.failure()) return err;
  return Run(kBwdWeights, g, x.untyped_data(), dy.untyped_data(), dw->untyped_data());
}

}  // namespace

#define KDJAX_CONV_BINDING                                                                  \
  ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().Attr<Ints>("strides").Attr<Ints>( \
      "padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxOnednnConvFwd, Fwd, KDJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxOnednnConvBwdData, BwdData, KDJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxOnednnConvBwdWeights, BwdWeights, KDJAX_CONV_BINDING);

// Which oneDNN implementation serves a pass, e.g. "brg:avx512_core" (for benchmarks and tests).
extern "C" const char* KdjaxOnednnImplName(int pass, const int64_t* geometry) {
  static thread_local std::string name;
  try {
    Geometry g;
    for (int i = 0; i < 13; ++i) g.v[i] = geometry[i];
    name = GetPlan(static_cast<Pass>(pass), g).impl;
  } catch (const dnnl::error& e) {
    name = std::string("error: ") + e.what();
  }
  return name.c_str();
}
