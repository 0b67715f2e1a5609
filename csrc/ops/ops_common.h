// Argument checks and small helpers shared by the CPU and the CUDA multi-tensor ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

namespace autolr_fast {

using at::Tensor;
using at::TensorList;
using OptTensorList = c10::List<std::optional<Tensor>>;

inline bool is_float_like(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// x (= name[i]) must share device, dtype and shape with ref (= params[i]).
inline void check_pair(const char* op, const char* name, size_t i, const Tensor& ref, const Tensor& x) {
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, "[", i, "] is on ", x.device(), " but params[", i,
              "] is on ", ref.device(), "; move them to one device");
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, "[", i, "] has dtype ", x.scalar_type(),
              " but params[", i, "] has ", ref.scalar_type(), "; use one dtype per parameter");
  TORCH_CHECK(x.sizes() == ref.sizes(), op, ": ", name, "[", i, "] has shape ", x.sizes(), " but params[", i,
              "] has ", ref.sizes());
}

inline void check_list_like(const char* op, const char* name, TensorList ref, TensorList xs) {
  TORCH_CHECK(xs.size() == ref.size(), op, ": ", name, " has ", xs.size(), " tensors but params has ", ref.size(),
              "; pass one tensor per parameter");
  for (size_t i = 0; i < xs.size(); ++i) check_pair(op, name, i, ref[i], xs[i]);
}

inline void check_params(const char* op, TensorList params) {
  TORCH_CHECK(!params.empty(), op, ": needs at least one tensor");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(is_float_like(params[i].scalar_type()), op, ": params[", i, "] has dtype ",
                params[i].scalar_type(), "; only float32/float64/float16/bfloat16 are supported");
  }
}

// Optional list (Tensor?[]): same length; present entries must match params[i].
inline std::vector<std::optional<Tensor>> check_optional_list(const char* op, const char* name, TensorList ref,
                                                              const OptTensorList& xs) {
  TORCH_CHECK(xs.size() == ref.size(), op, ": ", name, " has ", xs.size(), " entries but params has ", ref.size(),
              "; pass one tensor (or None) per parameter");
  std::vector<std::optional<Tensor>> out;
  out.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    std::optional<Tensor> x = xs.get(i);
    if (x.has_value() && x->defined()) {
      check_pair(op, name, i, ref[i], *x);
      out.emplace_back(x->contiguous());
    } else {
      out.emplace_back(std::nullopt);
    }
  }
  return out;
}

inline std::vector<Tensor> contiguous_all(TensorList xs) {
  std::vector<Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.contiguous());
  return out;
}

// The inputs of the SGD ops, checked against params (and each other) and made contiguous.
struct SgdLists {
  std::vector<Tensor> params, grads;
  std::vector<std::optional<Tensor>> bufs;  // momentum buffers; nullopt before the first step
};

inline SgdLists check_sgd_lists(const char* op, TensorList params, TensorList grads, const OptTensorList& bufs) {
  check_params(op, params);
  check_list_like(op, "grads", params, grads);
  return SgdLists{contiguous_all(params), contiguous_all(grads),
                  check_optional_list(op, "momentum_buffers", params, bufs)};
}

inline void check_scalar_tensor(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 1-element tensor, got shape ", t.sizes());
}

// The inputs of the Adam/AdamW ops, likewise, with one step count per parameter (torch.optim
// keeps a step per parameter: one without a gradient on some steps has a smaller count).
struct AdamLists {
  std::vector<Tensor> params, grads;
  std::vector<std::optional<Tensor>> m, v, vmax;  // exp_avgs, exp_avg_sqs, max_exp_avg_sqs (AMSGrad)
  std::vector<Tensor> steps;                      // 1-element each: the stored step (0 before the first)
};

inline AdamLists check_adam_lists(const char* op, TensorList params, TensorList grads, const OptTensorList& m,
                                  const OptTensorList& v, const OptTensorList& vmax, TensorList steps) {
  check_params(op, params);
  check_list_like(op, "grads", params, grads);
  TORCH_CHECK(steps.size() == params.size(), op, ": steps has ", steps.size(), " tensors but params has ",
              params.size(), "; pass each parameter's own step count (its optimizer state's 'step', 0 if none)");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1, op, ": steps[", i, "] must be a 1-element tensor, got shape ",
                steps[i].sizes());
    TORCH_CHECK(steps[i].device().is_cpu() || steps[i].device() == params[i].device(), op, ": steps[", i,
                "] is on ", steps[i].device(), " but params[", i, "] is on ", params[i].device(),
                "; keep each step on the CPU or on its parameter's device");
  }
  return AdamLists{contiguous_all(params), contiguous_all(grads), check_optional_list(op, "exp_avgs", params, m),
                   check_optional_list(op, "exp_avg_sqs", params, v),
                   check_optional_list(op, "max_exp_avg_sqs", params, vmax), steps.vec()};
}

// The validation gradients of the hyper_dot ops: one per parameter, like it.
inline std::vector<Tensor> check_val_grads(const char* op, TensorList params, TensorList vals) {
  check_list_like(op, "val_grads", params, vals);
  return contiguous_all(vals);
}

}  // namespace autolr_fast
