// Host check of the per-element optimizer directions (csrc/ops/directions.h), the code the CUDA
// kernels compile too, run by tests/test_cpp_ops.py on machines without a GPU (the CPU op's
// vectorised loops are checked against the reference there; this is the plain scalar code):
//   * AMSGrad's running maximum propagates a NaN from either operand, as torch.maximum;
//   * a finite state gives the finite direction of the formula.
// Usage: directions_test  (prints "ok <checks>" and exits 0, or the first failure and exits 1)
#include "../directions.h"

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

namespace af = autolr_fast;

namespace {

int checks = 0, failures = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok && failures++ == 0) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

// Adam's direction of one element with AMSGrad's running maximum `vmax` (t = 6, bc from double).
template <typename T>
T amsgrad_direction(T g, T v, T vmax) {
  const auto k = af::make_adam_coeffs<T>(0.9, 0.999, 1e-8, 0.0, false, false);
  const T bc1 = static_cast<T>(1.0 - std::pow(0.9, 6.0));
  const T bc2_sqrt = static_cast<T>(std::sqrt(1.0 - std::pow(0.999, 6.0)));
  return af::adam_direction<T>(T(0.5), g, true, T(0.1), true, v, true, vmax, bc1, bc2_sqrt, k);
}

template <typename T>
void check_type(const char* name) {
  volatile T nan = std::numeric_limits<T>::quiet_NaN();  // volatile: no constant folding
  const std::string t = name;
  expect(std::isnan(amsgrad_direction<T>(T(0.3), T(0.2), nan)), t + ": NaN max_exp_avg_sq must give NaN");
  expect(std::isnan(amsgrad_direction<T>(T(0.3), nan, T(0.2))), t + ": NaN exp_avg_sq must give NaN");
  expect(std::isnan(amsgrad_direction<T>(nan, T(0.2), T(0.2))), t + ": NaN gradient must give NaN");
  const T d_small = amsgrad_direction<T>(T(0.3), T(0.2), T(0.01));  // the new moment is the maximum
  const T d_large = amsgrad_direction<T>(T(0.3), T(0.2), T(5.0));   // the running maximum is
  expect(std::isfinite(d_small) && std::isfinite(d_large) && d_large < d_small, t + ": finite maximum");
}

}  // namespace

int main() {
  check_type<float>("float");
  check_type<double>("double");
  if (failures) return 1;
  std::printf("ok %d\n", checks);
  return 0;
}
