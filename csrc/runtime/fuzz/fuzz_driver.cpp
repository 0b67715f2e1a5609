// Standalone mutation fuzzer for fuzz_reader.cpp (for compilers without libFuzzer, e.g. GCC).
//   fuzz_reader SEED_FILE... [--seconds S] [--iterations N] [--seed K]
// Deterministic for a given seed; stops at whichever budget comes first. Mutations: bit flips,
// byte sets to interesting values, truncation, chunk duplication/removal, and (for the bare ALRW
// blob) the same with the blob's CRC32 fixed afterwards so that the parser behind the CRC is hit.
#include "../tests/bytes.h"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int main(int argc, char** argv) {
  std::vector<std::vector<uint8_t>> seeds;
  double seconds = 10;
  long iterations = 100000;
  unsigned seed = 1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::atof(argv[++i]);
    else if (a == "--iterations" && i + 1 < argc) iterations = std::atol(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = unsigned(std::atoi(argv[++i]));
    else {
      std::ifstream f(a, std::ios::binary);
      if (!f) { std::fprintf(stderr, "cannot read seed file %s\n", a.c_str()); return 2; }
      seeds.emplace_back((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    }
  }
  if (seeds.empty()) { std::fprintf(stderr, "usage: %s SEED_FILE... [--seconds S] [--iterations N] [--seed K]\n", argv[0]); return 2; }
  // bare ALRW blobs found inside the seed archives
  std::vector<std::vector<uint8_t>> blobs;
  for (const auto& s : seeds)
    for (size_t i = 0; i + 28 <= s.size(); ++i)
      if (std::memcmp(&s[i], "ALRW", 4) == 0) {
        auto rd = [&](size_t o) { return uint64_t(s[o]) | uint64_t(s[o + 1]) << 8 | uint64_t(s[o + 2]) << 16 | uint64_t(s[o + 3]) << 24; };
        uint64_t len = 28 + 4 * (rd(i + 24) + 2 * rd(i + 8) * rd(i + 12) + 1) + 4;
        if (i + len <= s.size()) blobs.emplace_back(s.begin() + long(i), s.begin() + long(i + len));
        break;
      }
  std::mt19937_64 rng(seed);
  const uint8_t interesting[] = {0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x50, 0x4B};
  const auto t0 = std::chrono::steady_clock::now();
  long n = 0, bytes = 0;
  for (; n < iterations; ++n) {
    if ((n & 255) == 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > seconds) break;
    const int mode = int(rng() % 3);  // 0: archive, 1: blob, 2: blob with CRC fixed
    std::vector<uint8_t> in = (mode == 0 || blobs.empty()) ? seeds[rng() % seeds.size()] : blobs[rng() % blobs.size()];
    const int muts = 1 + int(rng() % 4);
    for (int m = 0; m < muts && !in.empty(); ++m) {
      size_t pos = size_t(rng() % in.size());
      switch (rng() % 6) {
        case 0: in[pos] ^= uint8_t(1u << (rng() % 8)); break;
        case 1: in[pos] = interesting[rng() % sizeof interesting]; break;
        case 2: in.resize(pos); break;
        case 3: { size_t len = std::min<size_t>(size_t(rng() % 64), in.size() - pos); in.erase(in.begin() + long(pos), in.begin() + long(pos + len)); break; }
        case 4: { size_t len = std::min<size_t>(size_t(rng() % 64), in.size() - pos); std::vector<uint8_t> c(in.begin() + long(pos), in.begin() + long(pos + len)); in.insert(in.begin() + long(rng() % (in.size() + 1)), c.begin(), c.end()); break; }
        case 5: { if (pos + 4 <= in.size()) { uint32_t v = uint32_t(rng()); if (rng() & 1) v = 0xFFFFFFFFu >> (rng() % 32); std::memcpy(&in[pos], &v, 4); } break; }
      }
    }
    if (mode == 2 && in.size() >= 8) {
      wr32(&in[in.size() - 4], crc32(in.data(), in.size() - 4));
    }
    in.insert(in.begin(), uint8_t(mode == 0 ? 0 : 1));
    LLVMFuzzerTestOneInput(in.data(), in.size());
    bytes += long(in.size());
  }
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("fuzz_reader: %ld inputs (%.1f MB) in %.1f s, no crash\n", n, bytes / 1e6, dt);
  return 0;
}
