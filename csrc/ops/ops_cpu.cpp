// CPU kernels of the autolr_fast ops for the look-ahead / hypergradient
// multi-tensor ops. The MLR-SNet step lives in mlrsnet_cpu.cpp, the CUDA kernels in
// ops_cuda.cu. Semantics: autolr_fast/ops/reference.py (functions of the same names).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <type_traits>

#include "directions.h"
#include "ops_common.h"

namespace autolr_fast {
namespace {

constexpr int64_t kGrain = 32768;     // elements per parallel task (element-wise ops)
constexpr int64_t kDotChunk = 32768;  // fixed reduction chunk: the summation order never depends on threads

template <typename F>
void parallel_elements(int64_t n, const F& f) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// Deterministic sum over [0, n) of term(i) (double): per-chunk partials in a fixed chunk grid
// (computed in parallel), then added in chunk order. Same bits for any thread count.
template <typename F>
double deterministic_sum(int64_t n, const F& term) {
  const int64_t chunks = (n + kDotChunk - 1) / kDotChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t lo = c * kDotChunk, hi = std::min(n, lo + kDotChunk);
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
      int64_t i = lo;
      for (; i + 4 <= hi; i += 4) {
        acc[0] += term(i);
        acc[1] += term(i + 1);
        acc[2] += term(i + 2);
        acc[3] += term(i + 3);
      }
      for (; i < hi; ++i) acc[0] += term(i);
      partial[static_cast<size_t>(c)] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

void check_cpu(const char* op, TensorList xs) {
  for (size_t i = 0; i < xs.size(); ++i)
    TORCH_CHECK(xs[i].device().is_cpu(), op, ": tensor ", i, " is on ", xs[i].device(),
                "; the CPU kernel needs CPU tensors");
}

double host_scalar(const char* op, const char* name, const Tensor& t) {
  check_scalar_tensor(op, name, t);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), " but the tensors are on the CPU");
  return t.item<double>();
}

Tensor scalar_result(const Tensor& like, double value) {
  Tensor out = at::empty({}, like.options().dtype(at::kFloat));
  *out.data_ptr<float>() = static_cast<float>(value);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The two drivers of every op: a look-ahead and a dot product over the tensors. The direction
// comes from a binder, `bind(Tag<scalar_t>{}, t, use)`, which calls `use(d)` with `d(i)` the
// direction of element i of tensor t in opmath (a binder may call `use` with a differently
// specialised functor, e.g. one per set of present Adam states). As in the reference, d is
// rounded to the tensor's dtype before it is used (as the optimizer's stored state is), and
// w_hat = w - alpha * d is computed in opmath with alpha unrounded and rounded once, as
// torch's `param.add_(d, alpha=-lr)`; <g_val, d> is accumulated in double.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct Tag {
  using type = scalar_t;
};

template <typename Bind>
std::vector<Tensor> lookahead_over(const std::vector<Tensor>& params, double alpha, const Bind& bind) {
  std::vector<Tensor> out;
  out.reserve(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    Tensor o = at::empty(params[t].sizes(), params[t].options());
    const auto dtype = params[t].scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "autolr_fast_lookahead_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const opmath_t alpha_t = static_cast<opmath_t>(alpha);
      const scalar_t* w = params[t].const_data_ptr<scalar_t>();
      scalar_t* y = o.mutable_data_ptr<scalar_t>();
      bind(Tag<scalar_t>{}, t, [&](const auto& d) {
        parallel_elements(o.numel(), [&](int64_t i) {
          const opmath_t di = static_cast<opmath_t>(static_cast<scalar_t>(d(i)));
          y[i] = static_cast<scalar_t>(static_cast<opmath_t>(w[i]) - alpha_t * di);
        });
      });
    });
    out.push_back(std::move(o));
  }
  return out;
}

template <typename Bind>
Tensor dot_over(const std::vector<Tensor>& vals, const Bind& bind) {
  double total = 0.0;
  for (size_t t = 0; t < vals.size(); ++t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals[t].scalar_type(), "autolr_fast_hyper_dot_cpu", [&] {
      const scalar_t* v = vals[t].const_data_ptr<scalar_t>();
      bind(Tag<scalar_t>{}, t, [&](const auto& d) {
        total += deterministic_sum(vals[t].numel(), [&](int64_t i) {
          return static_cast<double>(v[i]) * static_cast<double>(static_cast<scalar_t>(d(i)));
        });
      });
    });
  }
  return scalar_result(vals[0], total);
}

template <typename scalar_t>
const scalar_t* opt_ptr(const std::optional<Tensor>& t) {
  return t ? t->const_data_ptr<scalar_t>() : nullptr;
}

// d = the given tensors
auto given_directions(const std::vector<Tensor>& dirs) {
  return [&dirs](auto tag, size_t t, const auto& use) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* d = dirs[t].const_data_ptr<scalar_t>();
    use([d](int64_t i) { return static_cast<at::opmath_type<scalar_t>>(d[i]); });
  };
}

// d = SGD's next direction
auto sgd_directions(const SgdLists& s, double momentum, double dampening, double weight_decay, bool nesterov,
                    bool maximize) {
  return [&s, momentum, dampening, weight_decay, nesterov, maximize](auto tag, size_t t, const auto& use) {
    using scalar_t = typename decltype(tag)::type;
    using opmath_t = at::opmath_type<scalar_t>;
    const auto k = make_sgd_coeffs<opmath_t>(momentum, dampening, weight_decay, nesterov, maximize);
    const scalar_t* w = s.params[t].const_data_ptr<scalar_t>();
    const scalar_t* g = s.grads[t].const_data_ptr<scalar_t>();
    const scalar_t* buf = opt_ptr<scalar_t>(s.bufs[t]);
    use([=](int64_t i) {
      return sgd_direction<opmath_t>(static_cast<opmath_t>(w[i]), static_cast<opmath_t>(g[i]), buf != nullptr,
                                     buf ? static_cast<opmath_t>(buf[i]) : opmath_t(0), k);
    });
  };
}

// f(std::bool_constant<HasM>, std::bool_constant<HasV>, std::bool_constant<HasVmax>)
template <typename F>
void with_state_flags(bool has_m, bool has_v, bool has_vmax, const F& f) {
  auto vmax_level = [&](auto hm, auto hv) {
    if (has_vmax) f(hm, hv, std::true_type{}); else f(hm, hv, std::false_type{});
  };
  auto v_level = [&](auto hm) {
    if (has_v) vmax_level(hm, std::true_type{}); else vmax_level(hm, std::false_type{});
  };
  if (has_m) v_level(std::true_type{}); else v_level(std::false_type{});
}

// d = Adam's (AdamW's) next direction, each tensor with its own step count. Which optional
// states exist is a template argument of the element functor, so the element loops carry no
// per-element branches and vectorise.
auto adam_directions(const AdamLists& s, const std::vector<double>& stored_steps, double beta1, double beta2,
                     double eps, double weight_decay, bool decoupled, bool maximize) {
  return [=, &s, &stored_steps](auto tag, size_t t, const auto& use) {
    using scalar_t = typename decltype(tag)::type;
    using opmath_t = at::opmath_type<scalar_t>;
    const auto k = make_adam_coeffs<opmath_t>(beta1, beta2, eps, weight_decay, decoupled, maximize);
    opmath_t bc1, bc2_sqrt;
    adam_bias_corrections<opmath_t>(stored_steps[t], beta1, beta2, &bc1, &bc2_sqrt);
    const scalar_t* w = s.params[t].const_data_ptr<scalar_t>();
    const scalar_t* g = s.grads[t].const_data_ptr<scalar_t>();
    const scalar_t *m = opt_ptr<scalar_t>(s.m[t]), *v = opt_ptr<scalar_t>(s.v[t]), *vmax = opt_ptr<scalar_t>(s.vmax[t]);
    with_state_flags(m != nullptr, v != nullptr, vmax != nullptr, [&](auto hm, auto hv, auto hx) {
      constexpr bool HasM = decltype(hm)::value, HasV = decltype(hv)::value, HasVmax = decltype(hx)::value;
      use([=](int64_t i) {
        return adam_direction<opmath_t>(static_cast<opmath_t>(w[i]), static_cast<opmath_t>(g[i]), HasM,
                                        HasM ? static_cast<opmath_t>(m[i]) : opmath_t(0), HasV,
                                        HasV ? static_cast<opmath_t>(v[i]) : opmath_t(0), HasVmax,
                                        HasVmax ? static_cast<opmath_t>(vmax[i]) : opmath_t(0), bc1, bc2_sqrt, k);
      });
    });
  };
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------
std::vector<Tensor> lookahead_cpu(TensorList params_in, TensorList dirs_in, const Tensor& alpha) {
  const char* op = "lookahead";
  check_params(op, params_in);
  check_list_like(op, "dirs", params_in, dirs_in);
  check_cpu(op, params_in);
  const double a = host_scalar(op, "alpha", alpha);
  const auto dirs = contiguous_all(dirs_in);
  return lookahead_over(contiguous_all(params_in), a, given_directions(dirs));
}

Tensor hyper_dot_cpu(TensorList a_in, TensorList b_in) {
  const char* op = "hyper_dot";
  check_params(op, a_in);
  check_list_like(op, "b", a_in, b_in);
  check_cpu(op, a_in);
  const auto b = contiguous_all(b_in);
  return dot_over(contiguous_all(a_in), given_directions(b));
}

std::vector<Tensor> lookahead_sgd_cpu(TensorList params_in, TensorList grads_in, const OptTensorList& bufs_in,
                                      const Tensor& alpha, double momentum, double dampening, double weight_decay,
                                      bool nesterov, bool maximize) {
  const char* op = "lookahead_sgd";
  const SgdLists s = check_sgd_lists(op, params_in, grads_in, bufs_in);
  check_cpu(op, params_in);
  const double a = host_scalar(op, "alpha", alpha);
  return lookahead_over(s.params, a,
                        sgd_directions(s, momentum, dampening, weight_decay, nesterov, maximize));
}

Tensor hyper_dot_sgd_cpu(TensorList vals_in, TensorList params_in, TensorList grads_in, const OptTensorList& bufs_in,
                         double momentum, double dampening, double weight_decay, bool nesterov, bool maximize) {
  const char* op = "hyper_dot_sgd";
  const SgdLists s = check_sgd_lists(op, params_in, grads_in, bufs_in);
  const auto vals = check_val_grads(op, params_in, vals_in);
  check_cpu(op, params_in);
  return dot_over(vals, sgd_directions(s, momentum, dampening, weight_decay, nesterov, maximize));
}

// Every parameter's stored step (CPU tensors, as check_adam_lists made sure for CPU params).
std::vector<double> host_steps(const AdamLists& s) {
  std::vector<double> out;
  out.reserve(s.steps.size());
  for (const auto& step : s.steps) out.push_back(step.item<double>());
  return out;
}

std::vector<Tensor> lookahead_adam_cpu(TensorList params_in, TensorList grads_in, const OptTensorList& m_in,
                                       const OptTensorList& v_in, const OptTensorList& vmax_in, TensorList steps,
                                       const Tensor& alpha, double beta1, double beta2, double eps,
                                       double weight_decay, bool decoupled, bool maximize) {
  const char* op = "lookahead_adam";
  const AdamLists s = check_adam_lists(op, params_in, grads_in, m_in, v_in, vmax_in, steps);
  check_cpu(op, params_in);
  const double a = host_scalar(op, "alpha", alpha);
  const std::vector<double> stored_steps = host_steps(s);
  return lookahead_over(s.params, a,
                        adam_directions(s, stored_steps, beta1, beta2, eps, weight_decay, decoupled, maximize));
}

Tensor hyper_dot_adam_cpu(TensorList vals_in, TensorList params_in, TensorList grads_in, const OptTensorList& m_in,
                          const OptTensorList& v_in, const OptTensorList& vmax_in, TensorList steps, double beta1,
                          double beta2, double eps, double weight_decay, bool decoupled, bool maximize) {
  const char* op = "hyper_dot_adam";
  const AdamLists s = check_adam_lists(op, params_in, grads_in, m_in, v_in, vmax_in, steps);
  const auto vals = check_val_grads(op, params_in, vals_in);
  check_cpu(op, params_in);
  const std::vector<double> stored_steps = host_steps(s);
  return dot_over(vals,
                  adam_directions(s, stored_steps, beta1, beta2, eps, weight_decay, decoupled, maximize));
}

}  // namespace
}  // namespace autolr_fast

// The schemas are defined once, in Python (autolr_fast/ops/library.py), beside their fake kernels.
TORCH_LIBRARY_IMPL(autolr_fast, CPU, m) {
  m.impl("lookahead", &autolr_fast::lookahead_cpu);
  m.impl("hyper_dot", &autolr_fast::hyper_dot_cpu);
  m.impl("lookahead_sgd", &autolr_fast::lookahead_sgd_cpu);
  m.impl("hyper_dot_sgd", &autolr_fast::hyper_dot_sgd_cpu);
  m.impl("lookahead_adam", &autolr_fast::lookahead_adam_cpu);
  m.impl("hyper_dot_adam", &autolr_fast::hyper_dot_adam_cpu);
}

// Not differentiable (the meta-step needs no gradient through them). A caller who backpropagates
// through one gets torch's "not implemented" error at backward, not outputs silently cut from the
// graph.
TORCH_LIBRARY_IMPL(autolr_fast, Autograd, m) {
  for (const char* op : {"lookahead", "hyper_dot", "lookahead_sgd", "hyper_dot_sgd", "lookahead_adam",
                         "hyper_dot_adam"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
