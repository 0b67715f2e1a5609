// Times autolr_step in a plain C++ loop: prints one JSON line {"ns_per_step": ..., ...}.
//   step_timing CONTROLLER.pt [STEPS]
#include "autolr.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  if (argc < 2) { std::fprintf(stderr, "usage: %s CONTROLLER.pt [STEPS]\n", argv[0]); return 2; }
  long steps = argc > 2 ? std::atol(argv[2]) : 200000;
  autolr_runtime* rt = nullptr;
  if (autolr_open_file(argv[1], &rt) != AUTOLR_OK) { std::fprintf(stderr, "%s\n", autolr_last_error()); return 1; }
  volatile float sink = 0.f;
  for (long i = 0; i < 1000; ++i) sink = sink + autolr_step(rt, 2.0f - 1e-4f * float(i));
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    autolr_reset(rt);
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < steps; ++i) sink = sink + autolr_step(rt, 2.0f / (1.0f + 1e-3f * float(i % 5000)));
    double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / double(steps);
    if (ns < best) best = ns;
  }
  std::printf("{\"ns_per_step\": %.1f, \"steps\": %ld, \"hidden\": %d, \"layers\": %d, \"final_rate\": %.6g}\n", best, steps,
              autolr_hidden_size(rt), autolr_num_layers(rt), double(autolr_rate(rt)));
  autolr_free(rt);
  return 0;
}
