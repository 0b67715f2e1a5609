// CUDA kernels of the look-ahead / hypergradient multi-tensor ops: one launch for a
// look-ahead over all tensors (one per table of several hundred tensors), two for a dot product
// (per-chunk partials, then one fixed-order final sum: deterministic). No host-to-device copy
// per call: the ops can be captured in CUDA graphs. alpha and the Adam step counts (one per
// parameter) are read on the device (no host sync); a CPU alpha/step (torch.optim keeps `step`
// on the CPU) is read on the host. Scalars stay in opmath (float for half/bfloat16), as in
// torch's optimizers; see directions.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "directions.h"
#include "multi_tensor_apply.cuh"
#include "ops_common.h"

namespace autolr_fast {
namespace {

using mta::TensorChunk;

// A scalar the kernel reads: `p` points to it in device memory (kind 1 float, 2 double, 3 half,
// 4 bfloat16, 5 int64, 6 int32), or, kind 0, `p` is not a pointer but carries the bits of a
// double read on the host (the Adam step column of CPU steps, see StepColumn).
__device__ __forceinline__ double read_scalar(const void* p, int kind) {
  switch (kind) {
    case 1: return *static_cast<const float*>(p);
    case 2: return *static_cast<const double*>(p);
    case 3: return static_cast<float>(*static_cast<const c10::Half*>(p));
    case 4: return static_cast<float>(*static_cast<const c10::BFloat16*>(p));
    case 5: return static_cast<double>(*static_cast<const int64_t*>(p));
    case 6: return static_cast<double>(*static_cast<const int32_t*>(p));
    default: return __longlong_as_double(static_cast<long long>(reinterpret_cast<uintptr_t>(p)));
  }
}

const void* host_value_bits(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return reinterpret_cast<const void*>(static_cast<uintptr_t>(bits));
}

int scalar_kind(const char* op, const char* name, c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return 1;
    case at::kDouble: return 2;
    case at::kHalf: return 3;
    case at::kBFloat16: return 4;
    case at::kLong: return 5;
    case at::kInt: return 6;
    default:
      TORCH_CHECK(false, op, ": ", name, " has unsupported dtype ", t, "; use a floating-point or integer tensor");
  }
  return 0;
}

// A 0-dim scalar argument (alpha): read on the device, or a CPU tensor's value read on the host.
struct DevScalar {
  const void* ptr;  // as read_scalar's p (host_value_bits of the value for a CPU tensor)
  int kind;
  __device__ __forceinline__ double get() const { return read_scalar(ptr, kind); }
};

DevScalar dev_scalar(const char* op, const char* name, const Tensor& t, const at::Device& dev) {
  check_scalar_tensor(op, name, t);
  if (t.device().is_cpu()) return DevScalar{host_value_bits(t.item<double>()), 0};
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but the tensors are on ", dev);
  return DevScalar{t.const_data_ptr(), scalar_kind(op, name, t.scalar_type())};
}

// Adam's step counts, one per tensor, as a column of the chunk table (read per chunk). All on
// the CPU (torch.optim's default): each value is read on the host and travels in its row as the
// bits of a double (kind 0; in a CUDA graph, read once at capture). All on the device with one
// dtype (capturable/fused optimizers): their pointers, read by the kernel. A mix: each step
// copied to the device as float64 first (stream-ordered, no host sync).
struct StepColumn {
  int kind = 0;
  std::vector<const void*> ptrs;
  std::vector<Tensor> copies;  // what `ptrs` points into in the mixed case
};

StepColumn step_column(const char* op, const std::vector<Tensor>& steps, const at::Device& dev) {
  StepColumn col;
  col.ptrs.reserve(steps.size());
  bool all_host = true, all_device = true;
  for (const auto& st : steps) {
    all_host = all_host && st.device().is_cpu();
    all_device = all_device && st.device() == dev && st.scalar_type() == steps[0].scalar_type();
  }
  if (all_host) {
    for (const auto& st : steps) col.ptrs.push_back(host_value_bits(st.item<double>()));
    return col;
  }
  if (all_device) {
    col.kind = scalar_kind(op, "steps", steps[0].scalar_type());
    for (const auto& st : steps) col.ptrs.push_back(st.const_data_ptr());
    return col;
  }
  // a replay would read the copies made at capture: refused, as the README's limits say
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None, op,
              ": steps mix CPU and device tensors, which cannot be captured in a CUDA graph; keep every step on "
              "the device (capturable=True or fused=True) or every step on the CPU");
  col.kind = 2;
  for (const auto& st : steps) {
    // a CPU step is pinned first: from pageable memory the copy may wait for the stream
    at::Tensor source = st.is_cuda() ? st : st.to(at::kDouble).pin_memory();
    col.copies.push_back(source.to(dev, at::kDouble, /*non_blocking=*/true, /*copy=*/true));
    col.ptrs.push_back(col.copies.back().const_data_ptr());
  }
  return col;
}

// All params on one CUDA device with one dtype (one launch handles one dtype).
void check_cuda_lists(const char* op, TensorList params) {
  check_params(op, params);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].is_cuda() && params[i].device() == params[0].device(), op, ": params[", i, "] is on ",
                params[i].device(), "; the CUDA kernel needs all tensors on ", params[0].device());
    TORCH_CHECK(params[i].scalar_type() == params[0].scalar_type(), op, ": params[", i, "] has dtype ",
                params[i].scalar_type(), " but params[0] has ", params[0].scalar_type(),
                "; the CUDA kernel needs one dtype per call (group the parameters by dtype)");
  }
}

template <typename T>
__device__ __forceinline__ T ld(const void* p, int64_t i) {
  return static_cast<const T*>(p)[i];
}

template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ opmath_t ldo(const void* p, int64_t i) {
  return p ? static_cast<opmath_t>(static_cast<const scalar_t*>(p)[i]) : opmath_t(0);
}

// ---------------------------------------------------------------------------------------------
// Per-chunk operations
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct LookaheadOp {  // ptr: w, d, out
  DevScalar alpha;
  __device__ void operator()(const TensorChunk<3>& tc) const {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a = static_cast<opmath_t>(alpha.get());
    for (int64_t i = tc.begin + threadIdx.x; i < tc.end; i += blockDim.x) {
      const opmath_t w = static_cast<opmath_t>(ld<scalar_t>(tc.ptr[0], i));
      const opmath_t d = static_cast<opmath_t>(ld<scalar_t>(tc.ptr[1], i));
      static_cast<scalar_t*>(tc.ptr[2])[i] = static_cast<scalar_t>(w - a * d);
    }
  }
};

template <typename scalar_t>
struct HyperDotOp {  // ptr: a, b
  double* partials;
  __device__ void operator()(const TensorChunk<2>& tc) const {
    double acc = 0.0;
    for (int64_t i = tc.begin + threadIdx.x; i < tc.end; i += blockDim.x)
      acc += static_cast<double>(ld<scalar_t>(tc.ptr[0], i)) * static_cast<double>(ld<scalar_t>(tc.ptr[1], i));
    const double s = mta::block_sum(acc);
    if (threadIdx.x == 0) partials[tc.chunk] = s;
  }
};

// The look-ahead ops round d to the tensor's dtype, then w_hat = w - alpha * d in opmath with
// one rounding (see ops_cpu.cpp).
template <typename scalar_t>
struct LookaheadSgdOp {  // ptr: w, g, buf (nullable), out
  DevScalar alpha;
  SgdCoeffs<at::opmath_type<scalar_t>> k;
  __device__ void operator()(const TensorChunk<4>& tc) const {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a = static_cast<opmath_t>(alpha.get());
    const bool has_buf = tc.ptr[2] != nullptr;
    for (int64_t i = tc.begin + threadIdx.x; i < tc.end; i += blockDim.x) {
      const opmath_t w = static_cast<opmath_t>(ld<scalar_t>(tc.ptr[0], i));
      const opmath_t d = static_cast<opmath_t>(static_cast<scalar_t>(sgd_direction<opmath_t>(
          w, static_cast<opmath_t>(ld<scalar_t>(tc.ptr[1], i)), has_buf, ldo<scalar_t, opmath_t>(tc.ptr[2], i), k)));
      static_cast<scalar_t*>(tc.ptr[3])[i] = static_cast<scalar_t>(w - a * d);
    }
  }
};

template <typename scalar_t>
struct HyperDotSgdOp {  // ptr: val, w, g, buf (nullable)
  double* partials;
  SgdCoeffs<at::opmath_type<scalar_t>> k;
  __device__ void operator()(const TensorChunk<4>& tc) const {
    using opmath_t = at::opmath_type<scalar_t>;
    const bool has_buf = tc.ptr[3] != nullptr;
    double acc = 0.0;
    for (int64_t i = tc.begin + threadIdx.x; i < tc.end; i += blockDim.x) {
      const opmath_t d = sgd_direction<opmath_t>(static_cast<opmath_t>(ld<scalar_t>(tc.ptr[1], i)),
                                                 static_cast<opmath_t>(ld<scalar_t>(tc.ptr[2], i)), has_buf,
                                                 ldo<scalar_t, opmath_t>(tc.ptr[3], i), k);
      acc += static_cast<double>(ld<scalar_t>(tc.ptr[0], i)) * static_cast<double>(static_cast<scalar_t>(d));
    }
    const double s = mta::block_sum(acc);
    if (threadIdx.x == 0) partials[tc.chunk] = s;
  }
};

template <typename scalar_t>
struct AdamArgs {
  int step_kind;  // how the step column is read (read_scalar)
  double beta1, beta2;
  AdamCoeffs<at::opmath_type<scalar_t>> k;
  // the bias corrections of the tensor whose step count `step` is (its step column entry)
  __device__ __forceinline__ void bias_corrections(const void* step, at::opmath_type<scalar_t>* bc1,
                                                   at::opmath_type<scalar_t>* bc2_sqrt) const {
    adam_bias_corrections<at::opmath_type<scalar_t>>(read_scalar(step, step_kind), beta1, beta2, bc1, bc2_sqrt);
  }
  // d at element i; p = {w, g, m, v, vmax}
  __device__ __forceinline__ at::opmath_type<scalar_t> direction(void* const* p, int64_t i,
                                                                 at::opmath_type<scalar_t> bc1,
                                                                 at::opmath_type<scalar_t> bc2_sqrt) const {
    using opmath_t = at::opmath_type<scalar_t>;
    return adam_direction<opmath_t>(static_cast<opmath_t>(ld<scalar_t>(p[0], i)),
                                    static_cast<opmath_t>(ld<scalar_t>(p[1], i)), p[2] != nullptr,
                                    ldo<scalar_t, opmath_t>(p[2], i), p[3] != nullptr, ldo<scalar_t, opmath_t>(p[3], i),
                                    p[4] != nullptr, ldo<scalar_t, opmath_t>(p[4], i), bc1, bc2_sqrt, k);
  }
};

template <typename scalar_t>
struct LookaheadAdamOp {  // ptr: w, g, m, v, vmax (nullable), step, out
  DevScalar alpha;
  AdamArgs<scalar_t> adam;
  __device__ void operator()(const TensorChunk<7>& tc) const {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a = static_cast<opmath_t>(alpha.get());
    opmath_t bc1, bc2_sqrt;
    adam.bias_corrections(tc.ptr[5], &bc1, &bc2_sqrt);
    for (int64_t i = tc.begin + threadIdx.x; i < tc.end; i += blockDim.x) {
      const opmath_t d = static_cast<opmath_t>(static_cast<scalar_t>(adam.direction(tc.ptr, i, bc1, bc2_sqrt)));
      const opmath_t w = static_cast<opmath_t>(ld<scalar_t>(tc.ptr[0], i));
      static_cast<scalar_t*>(tc.ptr[6])[i] = static_cast<scalar_t>(w - a * d);
    }
  }
};

template <typename scalar_t>
struct HyperDotAdamOp {  // ptr: val, w, g, m, v, vmax (nullable), step
  double* partials;
  AdamArgs<scalar_t> adam;
  __device__ void operator()(const TensorChunk<7>& tc) const {
    using opmath_t = at::opmath_type<scalar_t>;
    opmath_t bc1, bc2_sqrt;
    adam.bias_corrections(tc.ptr[6], &bc1, &bc2_sqrt);
    double acc = 0.0;
    for (int64_t i = tc.begin + threadIdx.x; i < tc.end; i += blockDim.x) {
      const scalar_t d = static_cast<scalar_t>(adam.direction(tc.ptr + 1, i, bc1, bc2_sqrt));
      acc += static_cast<double>(ld<scalar_t>(tc.ptr[0], i)) * static_cast<double>(d);
    }
    const double s = mta::block_sum(acc);
    if (threadIdx.x == 0) partials[tc.chunk] = s;
  }
};

// ---------------------------------------------------------------------------------------------
// Host wrappers
// ---------------------------------------------------------------------------------------------
const void* ptr_or_null(const std::optional<Tensor>& t) { return t ? t->const_data_ptr() : nullptr; }

std::vector<int64_t> numels_of(const std::vector<Tensor>& xs) {
  std::vector<int64_t> n;
  n.reserve(xs.size());
  for (const auto& x : xs) n.push_back(x.numel());
  return n;
}

std::vector<Tensor> empty_like_all(const std::vector<Tensor>& xs) {
  std::vector<Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(at::empty(x.sizes(), x.options()));
  return out;
}

// Two-pass deterministic dot: the chunk op writes partial sums, one block adds them in order.
template <int Depth, typename MakeOp>
Tensor launch_dot(const std::vector<std::array<const void*, Depth>>& ptrs, const std::vector<int64_t>& numels,
                  const Tensor& like, const MakeOp& make_op) {
  int64_t chunks = 0;
  for (int64_t n : numels) chunks += mta::chunks_of(n);
  Tensor partials = at::empty({std::max<int64_t>(chunks, 1)}, like.options().dtype(at::kDouble));
  Tensor out = at::empty({}, like.options().dtype(at::kFloat));
  const auto dev = like.device().index();
  mta::launch<Depth>(ptrs, numels, dev, make_op(partials.mutable_data_ptr<double>()));
  auto stream = c10::cuda::getCurrentCUDAStream(dev);
  mta::finalize_sum_kernel<<<1, mta::kBlock, 0, stream.stream()>>>(partials.const_data_ptr<double>(), chunks,
                                                                   out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<Tensor> lookahead_cuda(TensorList params_in, TensorList dirs_in, const Tensor& alpha) {
  const char* op = "lookahead";
  check_cuda_lists(op, params_in);
  check_list_like(op, "dirs", params_in, dirs_in);
  c10::cuda::CUDAGuard guard(params_in[0].device());
  const DevScalar a = dev_scalar(op, "alpha", alpha, params_in[0].device());
  auto params = contiguous_all(params_in);
  auto dirs = contiguous_all(dirs_in);
  auto out = empty_like_all(params);
  std::vector<std::array<const void*, 3>> ptrs;
  for (size_t t = 0; t < params.size(); ++t)
    ptrs.push_back({params[t].const_data_ptr(), dirs[t].const_data_ptr(), out[t].const_data_ptr()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lookahead_cuda", [&] {
    mta::launch<3>(ptrs, numels_of(params), params[0].device().index(), LookaheadOp<scalar_t>{a});
  });
  return out;
}

Tensor hyper_dot_cuda(TensorList a_in, TensorList b_in) {
  const char* op = "hyper_dot";
  check_cuda_lists(op, a_in);
  check_list_like(op, "b", a_in, b_in);
  c10::cuda::CUDAGuard guard(a_in[0].device());
  auto a = contiguous_all(a_in);
  auto b = contiguous_all(b_in);
  std::vector<std::array<const void*, 2>> ptrs;
  for (size_t t = 0; t < a.size(); ++t) ptrs.push_back({a[t].const_data_ptr(), b[t].const_data_ptr()});
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(), "hyper_dot_cuda", [&] {
    out = launch_dot<2>(ptrs, numels_of(a), a[0], [](double* p) { return HyperDotOp<scalar_t>{p}; });
  });
  return out;
}

std::vector<Tensor> lookahead_sgd_cuda(TensorList params_in, TensorList grads_in, const OptTensorList& bufs_in,
                                       const Tensor& alpha, double momentum, double dampening, double weight_decay,
                                       bool nesterov, bool maximize) {
  const char* op = "lookahead_sgd";
  check_cuda_lists(op, params_in);
  const SgdLists s = check_sgd_lists(op, params_in, grads_in, bufs_in);
  c10::cuda::CUDAGuard guard(params_in[0].device());
  const DevScalar a = dev_scalar(op, "alpha", alpha, params_in[0].device());
  auto out = empty_like_all(s.params);
  std::vector<std::array<const void*, 4>> ptrs;
  for (size_t t = 0; t < s.params.size(); ++t)
    ptrs.push_back({s.params[t].const_data_ptr(), s.grads[t].const_data_ptr(), ptr_or_null(s.bufs[t]),
                    out[t].const_data_ptr()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.params[0].scalar_type(), "lookahead_sgd_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto k = make_sgd_coeffs<opmath_t>(momentum, dampening, weight_decay, nesterov, maximize);
    mta::launch<4>(ptrs, numels_of(s.params), s.params[0].device().index(), LookaheadSgdOp<scalar_t>{a, k});
  });
  return out;
}

Tensor hyper_dot_sgd_cuda(TensorList vals_in, TensorList params_in, TensorList grads_in, const OptTensorList& bufs_in,
                          double momentum, double dampening, double weight_decay, bool nesterov, bool maximize) {
  const char* op = "hyper_dot_sgd";
  check_cuda_lists(op, params_in);
  const SgdLists s = check_sgd_lists(op, params_in, grads_in, bufs_in);
  const auto vals = check_val_grads(op, params_in, vals_in);
  c10::cuda::CUDAGuard guard(params_in[0].device());
  std::vector<std::array<const void*, 4>> ptrs;
  for (size_t t = 0; t < s.params.size(); ++t)
    ptrs.push_back({vals[t].const_data_ptr(), s.params[t].const_data_ptr(), s.grads[t].const_data_ptr(),
                    ptr_or_null(s.bufs[t])});
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.params[0].scalar_type(), "hyper_dot_sgd_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto k = make_sgd_coeffs<opmath_t>(momentum, dampening, weight_decay, nesterov, maximize);
    out = launch_dot<4>(ptrs, numels_of(s.params), s.params[0],
                        [&](double* p) { return HyperDotSgdOp<scalar_t>{p, k}; });
  });
  return out;
}

// The Adam state pointers of tensor t: {w, g, m, v, vmax, step} (absent states as nullptr).
std::array<const void*, 6> adam_row(const AdamLists& s, const StepColumn& steps, size_t t) {
  return {s.params[t].const_data_ptr(), s.grads[t].const_data_ptr(), ptr_or_null(s.m[t]), ptr_or_null(s.v[t]),
          ptr_or_null(s.vmax[t]), steps.ptrs[t]};
}

template <typename scalar_t>
AdamArgs<scalar_t> adam_args(int step_kind, double beta1, double beta2, double eps, double weight_decay,
                             bool decoupled, bool maximize) {
  using opmath_t = at::opmath_type<scalar_t>;
  return AdamArgs<scalar_t>{step_kind, beta1, beta2,
                            make_adam_coeffs<opmath_t>(beta1, beta2, eps, weight_decay, decoupled, maximize)};
}

std::vector<Tensor> lookahead_adam_cuda(TensorList params_in, TensorList grads_in, const OptTensorList& m_in,
                                        const OptTensorList& v_in, const OptTensorList& vmax_in, TensorList steps,
                                        const Tensor& alpha, double beta1, double beta2, double eps,
                                        double weight_decay, bool decoupled, bool maximize) {
  const char* op = "lookahead_adam";
  check_cuda_lists(op, params_in);
  const AdamLists s = check_adam_lists(op, params_in, grads_in, m_in, v_in, vmax_in, steps);
  c10::cuda::CUDAGuard guard(params_in[0].device());
  const DevScalar a = dev_scalar(op, "alpha", alpha, params_in[0].device());
  const StepColumn st = step_column(op, s.steps, params_in[0].device());
  auto out = empty_like_all(s.params);
  std::vector<std::array<const void*, 7>> ptrs;
  for (size_t t = 0; t < s.params.size(); ++t) {
    const auto row = adam_row(s, st, t);
    ptrs.push_back({row[0], row[1], row[2], row[3], row[4], row[5], out[t].const_data_ptr()});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.params[0].scalar_type(), "lookahead_adam_cuda", [&] {
    const auto args = adam_args<scalar_t>(st.kind, beta1, beta2, eps, weight_decay, decoupled, maximize);
    mta::launch<7>(ptrs, numels_of(s.params), s.params[0].device().index(), LookaheadAdamOp<scalar_t>{a, args});
  });
  return out;
}

Tensor hyper_dot_adam_cuda(TensorList vals_in, TensorList params_in, TensorList grads_in, const OptTensorList& m_in,
                           const OptTensorList& v_in, const OptTensorList& vmax_in, TensorList steps, double beta1,
                           double beta2, double eps, double weight_decay, bool decoupled, bool maximize) {
  const char* op = "hyper_dot_adam";
  check_cuda_lists(op, params_in);
  const AdamLists s = check_adam_lists(op, params_in, grads_in, m_in, v_in, vmax_in, steps);
  const auto vals = check_val_grads(op, params_in, vals_in);
  c10::cuda::CUDAGuard guard(params_in[0].device());
  const StepColumn st = step_column(op, s.steps, params_in[0].device());
  std::vector<std::array<const void*, 7>> ptrs;
  for (size_t t = 0; t < s.params.size(); ++t) {
    const auto row = adam_row(s, st, t);
    ptrs.push_back({vals[t].const_data_ptr(), row[0], row[1], row[2], row[3], row[4], row[5]});
  }
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.params[0].scalar_type(), "hyper_dot_adam_cuda", [&] {
    const auto args = adam_args<scalar_t>(st.kind, beta1, beta2, eps, weight_decay, decoupled, maximize);
    out = launch_dot<7>(ptrs, numels_of(s.params), s.params[0],
                        [&](double* p) { return HyperDotAdamOp<scalar_t>{p, args}; });
  });
  return out;
}

}  // namespace
}  // namespace autolr_fast

TORCH_LIBRARY_IMPL(autolr_fast, CUDA, m) {
  m.impl("lookahead", &autolr_fast::lookahead_cuda);
  m.impl("hyper_dot", &autolr_fast::hyper_dot_cuda);
  m.impl("lookahead_sgd", &autolr_fast::lookahead_sgd_cuda);
  m.impl("hyper_dot_sgd", &autolr_fast::hyper_dot_sgd_cuda);
  m.impl("lookahead_adam", &autolr_fast::lookahead_adam_cuda);
  m.impl("hyper_dot_adam", &autolr_fast::hyper_dot_adam_cuda);
}
