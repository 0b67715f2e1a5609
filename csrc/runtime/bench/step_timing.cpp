// Times autolr_step in a plain C++ loop: prints one JSON line {"ns_per_step": ..., ...}.
//   step_timing CONTROLLER.pt [STEPS]
// The steps run in batches of 1000; ns_per_step is the median batch (robust to preemption on a
// loaded machine), min_ns_per_step the fastest batch, mean_ns_per_step the whole run.
#include "autolr.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 2) { std::fprintf(stderr, "usage: %s CONTROLLER.pt [STEPS]\n", argv[0]); return 2; }
  const long batch = 1000;
  long batches = std::max(1L, (argc > 2 ? std::atol(argv[2]) : 200000) / batch);
  autolr_runtime* rt = nullptr;
  if (autolr_open_file(argv[1], &rt) != AUTOLR_OK) { std::fprintf(stderr, "%s\n", autolr_last_error()); return 1; }
  volatile float sink = 0.f;
  for (long i = 0; i < 2000; ++i) sink = sink + autolr_step(rt, 2.0f - 1e-4f * float(i));
  autolr_reset(rt);
  std::vector<double> per;
  double total = 0;
  long i = 0;
  for (long b = 0; b < batches; ++b) {
    auto t0 = std::chrono::steady_clock::now();
    for (long k = 0; k < batch; ++k, ++i) sink = sink + autolr_step(rt, 2.0f / (1.0f + 1e-3f * float(i % 5000)));
    double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    per.push_back(ns / double(batch));
    total += ns;
  }
  std::sort(per.begin(), per.end());
  std::printf("{\"ns_per_step\": %.1f, \"min_ns_per_step\": %.1f, \"mean_ns_per_step\": %.1f, \"steps\": %ld, "
              "\"hidden\": %d, \"layers\": %d, \"final_rate\": %.6g}\n",
              per[per.size() / 2], per.front(), total / double(batches * batch), batches * batch,
              autolr_hidden_size(rt), autolr_num_layers(rt), double(autolr_rate(rt)));
  autolr_free(rt);
  return 0;
}
