// torch_example.cpp: a libtorch training loop taking its learning rate from an exported
// MLR-SNet controller (autolr_torch). Built with -DAUTOLR_WITH_TORCH=ON.
//   torch_example CONTROLLER.pt
#include <torch/torch.h>

#include <cstdio>

#include "autolr_torch.h"

int main(int argc, char** argv) {
  if (argc < 2) { std::fprintf(stderr, "usage: %s CONTROLLER.pt\n", argv[0]); return 2; }
  torch::manual_seed(0);
  autolr::TorchController controller(argv[1]);
  auto x = torch::randn({512, 10});
  auto y = (x.matmul(torch::randn({10, 1})) > 0).to(torch::kLong).squeeze(1);
  torch::nn::Linear model(10, 2);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.0));
  for (int step = 0; step < 200; ++step) {
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    loss.backward();
    const float lr = controller.step(loss.item<float>());
    for (auto& group : opt.param_groups()) static_cast<torch::optim::SGDOptions&>(group.options()).lr(lr);
    opt.step();
    if (step % 50 == 0) std::printf("step %3d  loss %.4f  lr %.4f\n", step, loss.item<float>(), lr);
  }
  return 0;
}
