// Per-element optimizer directions shared by the CPU and the CUDA ops.
//
// Same formulas as autolr_fast/ops/reference.py (sgd_direction / adam_directions): the direction
// d with w <- w - lr * d that torch.optim.SGD / Adam(W) will apply next, recomputed from the
// optimizer state without modifying it. Computed in the "opmath" type T (float for
// float/half/bfloat16 tensors, double for double tensors), the scalars (coefficients, bias
// corrections, alpha) included: torch's optimizers never round them to a half/bfloat16
// parameter's dtype either.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define AUTOLR_HD __host__ __device__ __forceinline__
#else
#define AUTOLR_HD inline
#endif

namespace autolr_fast {

// Coefficients of SGD's direction, cast once to the opmath type.
template <typename T>
struct SgdCoeffs {
  T momentum;
  T one_minus_dampening;
  T weight_decay;
  bool use_momentum;
  bool use_weight_decay;
  bool nesterov;
  bool maximize;
};

template <typename T>
SgdCoeffs<T> make_sgd_coeffs(double momentum, double dampening, double weight_decay, bool nesterov,
                             bool maximize) {
  return SgdCoeffs<T>{static_cast<T>(momentum), static_cast<T>(1.0 - dampening), static_cast<T>(weight_decay),
                      momentum != 0.0, weight_decay != 0.0, nesterov, maximize};
}

// has_buf == false: the optimizer's first step (torch initialises the buffer with d itself).
template <typename T>
AUTOLR_HD T sgd_direction(T w, T g, bool has_buf, T buf, const SgdCoeffs<T>& k) {
  T d = k.maximize ? -g : g;
  if (k.use_weight_decay) d = d + k.weight_decay * w;
  if (k.use_momentum) {
    T b = has_buf ? buf * k.momentum + k.one_minus_dampening * d : d;
    d = k.nesterov ? d + k.momentum * b : b;
  }
  return d;
}

// Coefficients of Adam's direction; the bias corrections depend on each parameter's step count
// (see adam_bias_corrections), which the kernels read per tensor.
template <typename T>
struct AdamCoeffs {
  T beta1;
  T beta2;
  T one_minus_beta1;
  T one_minus_beta2;
  T eps;
  T weight_decay;
  bool use_weight_decay;
  bool decoupled;
  bool maximize;
};

template <typename T>
AdamCoeffs<T> make_adam_coeffs(double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                               bool maximize) {
  return AdamCoeffs<T>{static_cast<T>(beta1), static_cast<T>(beta2), static_cast<T>(1.0 - beta1),
                       static_cast<T>(1.0 - beta2), static_cast<T>(eps), static_cast<T>(weight_decay),
                       weight_decay != 0.0, decoupled, maximize};
}

// bc1 = 1 - beta1^t and sqrt(1 - beta2^t) with t = stored_step + 1 (the parameter's own step
// count: torch keeps one per parameter), computed in double and rounded to the opmath type T.
template <typename T>
AUTOLR_HD void adam_bias_corrections(double stored_step, double beta1, double beta2, T* bc1, T* bc2_sqrt) {
  const double t = stored_step + 1.0;
  *bc1 = static_cast<T>(1.0 - std::pow(beta1, t));
  *bc2_sqrt = static_cast<T>(std::sqrt(1.0 - std::pow(beta2, t)));
}

// max(a, b) that is NaN when either is, as torch.maximum (AMSGrad's running maximum).
template <typename T>
AUTOLR_HD T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// has_m/has_v false: first step (no moments yet); has_vmax: AMSGrad.
template <typename T>
AUTOLR_HD T adam_direction(T w, T g, bool has_m, T m, bool has_v, T v, bool has_vmax, T vmax, T bc1, T bc2_sqrt,
                           const AdamCoeffs<T>& k) {
  T gg = k.maximize ? -g : g;
  if (k.use_weight_decay && !k.decoupled) gg = gg + k.weight_decay * w;
  T m_new = has_m ? m * k.beta1 + k.one_minus_beta1 * gg : gg * k.one_minus_beta1;
  T v_new = has_v ? v * k.beta2 + k.one_minus_beta2 * gg * gg : gg * gg * k.one_minus_beta2;
  if (has_vmax) v_new = nan_max(vmax, v_new);
  T d = (m_new / bc1) / (std::sqrt(v_new) / bc2_sqrt + k.eps);
  if (k.use_weight_decay && k.decoupled) d = d + k.weight_decay * w;
  return d;
}

}  // namespace autolr_fast
