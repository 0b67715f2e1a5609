// Fuzz target for the file reader (libFuzzer entry point; fuzz_driver.cpp drives it under GCC).
// Byte 0 picks the entry: even -> autolr_open_memory (zip archive), odd -> autolr_open_weights
// (bare ALRW). Whatever opens is stepped and its state round-tripped.
#include "autolr.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  autolr_runtime* rt = nullptr;
  int st = (data[0] & 1) ? autolr_open_weights(data + 1, size - 1, &rt) : autolr_open_memory(data + 1, size - 1, &rt);
  if (st != AUTOLR_OK) {
    if (rt != nullptr || autolr_last_error()[0] == '\0') { std::fprintf(stderr, "error contract broken: st=%d msg=%s\n", st, autolr_last_error()); std::abort(); }
    return 0;
  }
  const float losses[] = {2.3f, 1.0f, NAN, -1.f, 1e30f, INFINITY, 0.f};
  for (float l : losses) {
    float r = autolr_step(rt, l);
    if (!(r >= 0.f && r <= autolr_gamma(rt))) { std::fprintf(stderr, "rate %g outside [0, gamma=%g]\n", double(r), double(autolr_gamma(rt))); std::abort(); }
  }
  std::vector<float> s(autolr_state_size(rt));
  if (autolr_get_state(rt, s.data(), s.size()) != AUTOLR_OK || autolr_set_state(rt, s.data(), s.size()) != AUTOLR_OK) {
    std::fprintf(stderr, "state round trip failed: %s\n", autolr_last_error());
    std::abort();
  }
  autolr_reset(rt);
  autolr_free(rt);
  return 0;
}
