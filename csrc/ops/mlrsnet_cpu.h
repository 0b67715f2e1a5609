// The CPU MLR-SNet step, callable without the dispatcher (see python_fastpath.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace autolr_fast {

// The CPU MLR-SNet step behind the op autolr_fast::mlrsnet_step_: updates h, c, rate and lrs in
// place, returns `ok`.
at::Tensor mlrsnet_step_cpu(const at::Tensor& loss, const at::Tensor& h, const at::Tensor& c,
                            at::TensorList weights, const at::Tensor& gamma, const at::Tensor& rate,
                            at::TensorList lrs, at::ArrayRef<double> scales);

// Raises unless `counters` is a contiguous int64 CPU tensor of 2 elements.
void check_counters_cpu(const at::Tensor& counters);

// The scheduler's int64 counters [skipped, negative] in place (reference.count_step_).
void count_step_cpu(const at::Tensor& loss, bool stepped, const at::Tensor& counters);

}  // namespace autolr_fast
