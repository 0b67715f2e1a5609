#include "autolr_torch.h"

#include <stdexcept>

namespace autolr {

TorchController::TorchController(const std::string& path, const torch::Device& device) {
  try {
    module_ = torch::jit::load(path, device);
  } catch (const c10::Error& e) {
    throw std::runtime_error("autolr: cannot load '" + path + "' as TorchScript: " + e.what_without_backtrace());
  }
  if (!module_.find_method("step") || !module_.find_method("reset"))
    throw std::runtime_error("autolr: '" + path + "' has no step()/reset(): not written by autolr_fast.export");
  module_.eval();
}

torch::Tensor TorchController::step(const torch::Tensor& loss) {
  torch::NoGradGuard no_grad;
  return module_.get_method("step")({loss}).toTensor();
}

float TorchController::step(float loss) {
  return step(torch::tensor(loss, torch::TensorOptions().dtype(torch::kFloat32).device(rate().device()))).item<float>();
}

void TorchController::reset() { module_.get_method("reset")({}); }

torch::Tensor TorchController::buffer(const char* name) const { return module_.attr(name).toTensor(); }
torch::Tensor TorchController::h() const { return buffer("h"); }
torch::Tensor TorchController::c() const { return buffer("c"); }
torch::Tensor TorchController::rate() const { return buffer("rate"); }
float TorchController::gamma() const { return buffer("gamma").item<float>(); }

void TorchController::set_state(const torch::Tensor& h, const torch::Tensor& c, const torch::Tensor& rate) {
  torch::NoGradGuard no_grad;
  if (!h.sizes().equals(this->h().sizes()) || !c.sizes().equals(this->c().sizes()) || rate.numel() != 1)
    throw std::invalid_argument("autolr: set_state shapes do not match the controller");
  if (!torch::isfinite(h).all().item<bool>() || !torch::isfinite(c).all().item<bool>() || !torch::isfinite(rate).all().item<bool>())
    throw std::invalid_argument("autolr: set_state values must be finite");
  const float r = rate.item<float>();
  if (r < 0.f || r > gamma())  // as the C API's autolr_set_state
    throw std::invalid_argument("autolr: set_state rate must be in [0, gamma]");
  this->h().copy_(h);
  this->c().copy_(c);
  this->rate().copy_(rate.reshape({}));
}

}  // namespace autolr
