// autolr_torch.h - thin libtorch wrapper over an exported controller (torch::jit::load).
// Built only with -DAUTOLR_WITH_TORCH=ON. For trainers that already link libtorch; otherwise use
// the dependency-free C API in autolr.h (same file, same rates).
#pragma once

#include <torch/script.h>

#include <string>

namespace autolr {

class TorchController {
 public:
  // Loads the file written by autolr_fast.export.export(); throws std::runtime_error on failure.
  explicit TorchController(const std::string& path, const torch::Device& device = torch::kCPU);

  // The guarded step: the rate (0-dim float tensor on the module's device) from a loss tensor.
  torch::Tensor step(const torch::Tensor& loss);
  float step(float loss);
  void reset();

  // State (h, c, rate) as tensors, for checkpointing together with the model.
  torch::Tensor h() const;
  torch::Tensor c() const;
  torch::Tensor rate() const;
  float gamma() const;
  void set_state(const torch::Tensor& h, const torch::Tensor& c, const torch::Tensor& rate);

  torch::jit::script::Module& module() { return module_; }

 private:
  torch::Tensor buffer(const char* name) const;
  torch::jit::script::Module module_;
};

}  // namespace autolr
