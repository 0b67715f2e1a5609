// ctest: the C runtime against the Python reference rates, state save/restore, and bad files.
//   test_runtime <data_dir>
#include "autolr.h"
#include "bytes.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

static int g_failures = 0, g_checks = 0;
#define CHECK(cond, ...)                                              \
  do {                                                                \
    ++g_checks;                                                       \
    if (!(cond)) {                                                    \
      ++g_failures;                                                   \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                              \
      std::fprintf(stderr, "\n");                                     \
    }                                                                 \
  } while (0)

static std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

struct Row { float loss, rate; };

static std::vector<Row> read_csv(const std::string& path) {
  std::ifstream f(path);
  std::string line;
  std::vector<Row> rows;
  std::getline(f, line);  // header
  while (std::getline(f, line)) {
    std::stringstream ss(line);
    std::string a, b, c;
    std::getline(ss, a, ',');
    std::getline(ss, b, ',');
    std::getline(ss, c, ',');
    rows.push_back({std::strtof(b.c_str(), nullptr), std::strtof(c.c_str(), nullptr)});
  }
  return rows;
}


// Where the ALRW entry lies in the archive: (offset, length), found by its magic and header.
static bool find_alrw(const std::vector<uint8_t>& f, size_t* off, size_t* len) {
  for (size_t i = 0; i + 28 <= f.size(); ++i) {
    if (std::memcmp(&f[i], "ALRW", 4) == 0) {
      uint64_t H = rd32(&f[i + 8]), L = rd32(&f[i + 12]), n = rd32(&f[i + 24]);
      *off = i;
      *len = size_t(28 + 4 * (n + 2 * L * H + 1) + 4);
      return *off + *len <= f.size();
    }
  }
  return false;
}

// Rewrite the CRC of the weights entry in the zip central directory (to forge "valid" files).
static void fix_zip_crc(std::vector<uint8_t>& f, size_t off, size_t len) {
  uint32_t crc = crc32(&f[off], len);
  const char* suffix = "extra/autolr/weights.bin";
  for (size_t i = 0; i + 46 < f.size(); ++i) {
    if (rd32(&f[i]) == 0x02014b50u) {
      size_t nl = f[i + 28] | (f[i + 29] << 8);
      std::string name(reinterpret_cast<const char*>(&f[i + 46]), std::min(nl, f.size() - i - 46));
      if (name.size() >= std::strlen(suffix) && name.compare(name.size() - std::strlen(suffix), std::string::npos, suffix) == 0)
        wr32(&f[i + 16], crc);
    }
  }
}

static void expect_error(const std::vector<uint8_t>& bytes, const char* what, int code = 0) {
  autolr_runtime* rt = reinterpret_cast<autolr_runtime*>(0x1);
  int st = autolr_open_memory(bytes.data(), bytes.size(), &rt);
  CHECK(st < 0, "%s: expected an error, got %d", what);
  CHECK(rt == nullptr, "%s: handle not NULL on error", what);
  CHECK(std::strlen(autolr_last_error()) > 0, "%s: empty error message", what);
  if (code) CHECK(st == code, "%s: expected code %d, got %d (%s)", what, code, st, autolr_last_error());
  if (st == AUTOLR_OK) autolr_free(rt);
}

static void test_fixture(const std::string& dir, const std::string& name) {
  const std::string pt = dir + "/" + name + ".pt";
  std::vector<Row> rows = read_csv(dir + "/" + name + "_rates.csv");
  CHECK(rows.size() >= 100, "%s: expected rates missing (%zu rows)", name.c_str(), rows.size());
  autolr_runtime* rt = nullptr;
  int st = autolr_open_file(pt.c_str(), &rt);
  CHECK(st == AUTOLR_OK && rt, "open %s: %d %s", pt.c_str(), st, autolr_last_error());
  if (!rt) return;
  CHECK(autolr_state_size(rt) == size_t(2 * autolr_hidden_size(rt) * autolr_num_layers(rt) + 1), "state size");
  double max_err = 0;
  std::vector<float> rates;
  for (const Row& r : rows) {
    float got = autolr_step(rt, r.loss);
    rates.push_back(got);
    max_err = std::max(max_err, double(std::fabs(got - r.rate)));
    CHECK(std::isfinite(got) && got >= 0.f && got <= autolr_gamma(rt), "rate %g outside [0, gamma]", got);
  }
  CHECK(max_err <= 1e-5, "%s: max |rate - python| = %g > 1e-5", name.c_str(), max_err);
  std::printf("%s: %zu steps, max |rate - python| = %.3g, skipped %llu\n", name.c_str(), rows.size(), max_err,
              (unsigned long long)autolr_skipped_steps(rt));
  size_t nonfinite = 0;
  for (const Row& r : rows) nonfinite += !std::isfinite(r.loss);
  CHECK(autolr_skipped_steps(rt) == nonfinite, "skipped %llu != non-finite losses %zu",
        (unsigned long long)autolr_skipped_steps(rt), nonfinite);

  // reset: the same sequence again gives the same rates
  CHECK(autolr_reset(rt) == AUTOLR_OK && autolr_rate(rt) == 0.f, "reset");
  for (size_t i = 0; i < rows.size(); ++i) {
    float got = autolr_step(rt, rows[i].loss);
    if (got != rates[i]) { CHECK(false, "after reset, step %zu: %g != %g", i, got, rates[i]); break; }
  }

  // anchor: refused arguments change nothing; a usable one makes the next step's rate about lr
  {
    std::vector<float> before(autolr_state_size(rt)), after(autolr_state_size(rt));
    autolr_get_state(rt, before.data(), before.size());
    const float g = autolr_gamma(rt);
    CHECK(autolr_anchor(rt, NAN, 0.1f) == AUTOLR_E_ARGUMENT, "anchor on a NaN loss");
    CHECK(autolr_anchor(rt, 1.f, 0.f) == AUTOLR_E_ARGUMENT, "anchor with lr 0");
    CHECK(autolr_anchor(rt, 1.f, INFINITY) == AUTOLR_E_ARGUMENT, "anchor with lr inf");
    autolr_get_state(rt, after.data(), after.size());
    CHECK(before == after && autolr_gamma(rt) == g, "a refused anchor changed the state");
    CHECK(autolr_anchor(rt, 1.f, 3e38f) == AUTOLR_E_ARGUMENT && std::strstr(autolr_last_error(), "overflows"),
          "anchor with an lr that overflows: %s", autolr_last_error());
    CHECK(autolr_set_gamma(rt, 0.f) == AUTOLR_E_ARGUMENT && autolr_set_gamma(rt, NAN) == AUTOLR_E_ARGUMENT &&
          autolr_gamma(rt) == g, "set_gamma refuses 0 and NaN");
    autolr_reset(rt);
    if (autolr_anchor(rt, 0.9f, 0.05f) == AUTOLR_OK) {
      const float r = autolr_step(rt, 0.9f);
      CHECK(std::fabs(r - 0.05f) <= 1e-3f * 0.05f, "rate after anchoring at 0.05: %g", r);
      // a checkpoint of an anchored run: gamma and state; a fresh handle resumes it
      std::vector<float> st(autolr_state_size(rt));
      autolr_get_state(rt, st.data(), st.size());
      const float anchored_gamma = autolr_gamma(rt), next = autolr_step(rt, 0.8f);
      autolr_runtime* again = nullptr;
      CHECK(autolr_open_file(pt.c_str(), &again) == AUTOLR_OK, "reopen for resume");
      if (again) {
        CHECK(autolr_set_gamma(again, anchored_gamma) == AUTOLR_OK, "set_gamma");
        CHECK(autolr_set_state(again, st.data(), st.size()) == AUTOLR_OK, "set_state: %s", autolr_last_error());
        CHECK(autolr_step(again, 0.8f) == next, "a resumed anchored run continues at its rate");
        autolr_free(again);
      }
    } else {
      CHECK(std::strstr(autolr_last_error(), "settles at p") != nullptr, "anchor error: %s", autolr_last_error());
    }
  }
  autolr_free(rt);  // the anchor moved gamma: the checks below start from the file's again
  rt = nullptr;
  CHECK(autolr_open_file(pt.c_str(), &rt) == AUTOLR_OK, "reopen: %s", autolr_last_error());
  if (!rt) return;

  // state: save after 50 steps, run 30, restore, run the same 30 again -> identical
  autolr_reset(rt);
  for (size_t i = 0; i < 50; ++i) autolr_step(rt, rows[i].loss);
  std::vector<float> state(autolr_state_size(rt));
  CHECK(autolr_get_state(rt, state.data(), state.size()) == AUTOLR_OK, "get_state");
  CHECK(state.back() == rates[49], "state rate %g != %g", state.back(), rates[49]);
  std::vector<float> first, second;
  for (size_t i = 50; i < 80; ++i) first.push_back(autolr_step(rt, rows[i].loss));
  CHECK(autolr_set_state(rt, state.data(), state.size()) == AUTOLR_OK, "set_state: %s", autolr_last_error());
  for (size_t i = 50; i < 80; ++i) second.push_back(autolr_step(rt, rows[i].loss));
  CHECK(first == second, "restored state does not reproduce the rates");
  CHECK(first[29] == rates[79], "rates after 80 steps differ from the straight run");
  // bad state: wrong size / NaN / rate > gamma -> error, state unchanged
  std::vector<float> before(state.size()), after(state.size());
  autolr_get_state(rt, before.data(), before.size());
  CHECK(autolr_set_state(rt, state.data(), state.size() - 1) == AUTOLR_E_ARGUMENT, "set_state wrong size");
  std::vector<float> bad = state;
  bad[0] = NAN;
  CHECK(autolr_set_state(rt, bad.data(), bad.size()) == AUTOLR_E_ARGUMENT, "set_state NaN");
  bad = state;
  bad.back() = autolr_gamma(rt) * 2;
  CHECK(autolr_set_state(rt, bad.data(), bad.size()) == AUTOLR_E_ARGUMENT, "set_state rate > gamma");
  CHECK(std::strlen(autolr_last_error()) > 0, "set_state error message");
  autolr_get_state(rt, after.data(), after.size());
  CHECK(before == after, "a rejected set_state changed the state");
  CHECK(autolr_get_state(rt, after.data(), 3) == AUTOLR_E_ARGUMENT, "get_state wrong size");

  // open from memory == open from file
  std::vector<uint8_t> bytes = read_file(pt);
  autolr_runtime* rm = nullptr;
  CHECK(autolr_open_memory(bytes.data(), bytes.size(), &rm) == AUTOLR_OK, "open_memory: %s", autolr_last_error());
  if (rm) {
    bool same = true;
    for (size_t i = 0; i < rows.size(); ++i) same &= autolr_step(rm, rows[i].loss) == rates[i];
    CHECK(same, "open_memory gives other rates than open_file");
    autolr_free(rm);
  }
  autolr_free(rt);
}

static void test_bad_files(const std::string& dir) {
  const std::vector<uint8_t> good = read_file(dir + "/controller_h16_l1.pt");
  size_t off = 0, len = 0;
  CHECK(find_alrw(good, &off, &len), "ALRW blob not found in the fixture");

  autolr_runtime* rt = nullptr;
  CHECK(autolr_open_file((dir + "/does_not_exist.pt").c_str(), &rt) == AUTOLR_E_IO && rt == nullptr, "missing file");
  CHECK(std::strstr(autolr_last_error(), "does_not_exist") != nullptr, "missing-file message names the file: %s", autolr_last_error());
  CHECK(autolr_open_file(nullptr, &rt) == AUTOLR_E_ARGUMENT, "NULL path");
  CHECK(autolr_open_memory(good.data(), good.size(), nullptr) == AUTOLR_E_ARGUMENT, "NULL out");
  CHECK(std::isnan(autolr_step(nullptr, 1.f)), "step(NULL) is NaN");
  CHECK(autolr_reset(nullptr) == AUTOLR_E_ARGUMENT, "reset(NULL)");
  CHECK(autolr_anchor(nullptr, 1.f, 0.1f) == AUTOLR_E_ARGUMENT, "anchor(NULL)");
  CHECK(autolr_set_gamma(nullptr, 1.f) == AUTOLR_E_ARGUMENT, "set_gamma(NULL)");
  {
    char want[32];
    std::snprintf(want, sizeof want, "%d.%d.%d ", AUTOLR_VERSION_MAJOR, AUTOLR_VERSION_MINOR, AUTOLR_VERSION_PATCH);
    CHECK(std::strncmp(autolr_version(), want, std::strlen(want)) == 0, "version macros %s vs %s", want,
          autolr_version());
  }
  autolr_free(nullptr);

  expect_error({}, "empty", AUTOLR_E_FORMAT);
  // random bytes
  std::mt19937 rng(7);
  for (int k = 0; k < 50; ++k) {
    std::vector<uint8_t> r(size_t(rng() % 4096));
    for (auto& b : r) b = uint8_t(rng());
    expect_error(r, "random bytes");
  }
  // every truncation length (step 1 near the end and through the blob, coarser elsewhere)
  for (size_t n = 0; n < good.size(); n += (n >= off && n <= off + len) || n + 200 > good.size() ? 1 : 97) {
    std::vector<uint8_t> t(good.begin(), good.begin() + long(n));
    // once the zip's first header is there, a cut file is damaged, not foreign
    expect_error(t, "truncated", n >= 4 ? AUTOLR_E_CORRUPT : AUTOLR_E_FORMAT);
  }
  // a flipped bit anywhere in the weights entry -> CRC error
  for (size_t i = off; i < off + len; i += 3) {
    std::vector<uint8_t> c = good;
    c[i] ^= uint8_t(1u << (i % 8));
    expect_error(c, "corrupted weights", AUTOLR_E_CORRUPT);
  }
  // bit flips elsewhere: OK (TorchScript code is not read) or an error, never a crash
  int opened = 0;
  for (size_t i = 0; i < good.size(); i += 7) {
    if (i >= off && i < off + len) continue;
    std::vector<uint8_t> c = good;
    c[i] ^= 0x5A;
    autolr_runtime* h = nullptr;
    int st = autolr_open_memory(c.data(), c.size(), &h);
    if (st == AUTOLR_OK) { ++opened; autolr_step(h, 1.f); autolr_free(h); }
    else CHECK(h == nullptr && std::strlen(autolr_last_error()) > 0, "error without message");
  }
  CHECK(opened > 0, "no flip outside the weights was tolerated (the reader reads too much?)");
  // wrong version, with both CRCs fixed up so that only the version is wrong
  {
    std::vector<uint8_t> v = good;
    wr32(&v[off + 4], 99);
    wr32(&v[off + len - 4], crc32(&v[off], len - 4));
    fix_zip_crc(v, off, len);
    expect_error(v, "wrong version", AUTOLR_E_VERSION);
    CHECK(std::strstr(autolr_last_error(), "version 99") != nullptr, "version message: %s", autolr_last_error());
    // and a wrong weight count -> corrupt
    std::vector<uint8_t> w = good;
    wr32(&w[off + 24], rd32(&w[off + 24]) + 1);
    wr32(&w[off + len - 4], crc32(&w[off], len - 4));
    fix_zip_crc(w, off, len);
    expect_error(w, "wrong weight count", AUTOLR_E_CORRUPT);
    // a huge hidden size -> rejected before any allocation
    std::vector<uint8_t> h = good;
    wr32(&h[off + 8], 0x7FFFFFFF);
    wr32(&h[off + len - 4], crc32(&h[off], len - 4));
    fix_zip_crc(h, off, len);
    expect_error(h, "huge hidden", AUTOLR_E_FORMAT);
  }
  // the bare blob: opens; bad magic -> format error
  {
    std::vector<uint8_t> blob(good.begin() + long(off), good.begin() + long(off + len));
    autolr_runtime* b = nullptr;
    CHECK(autolr_open_weights(blob.data(), blob.size(), &b) == AUTOLR_OK, "open_weights: %s", autolr_last_error());
    autolr_free(b);
    blob[0] = 'X';
    CHECK(autolr_open_weights(blob.data(), blob.size(), &b) == AUTOLR_E_FORMAT && b == nullptr, "bad magic");
  }
  // a zip without the entry (the archive with the entry name changed)
  {
    std::vector<uint8_t> z = good;
    for (size_t i = 0; i + 24 < z.size(); ++i)
      if (std::memcmp(&z[i], "extra/autolr/weights.bin", 24) == 0) z[i + 13] = 'W';
    expect_error(z, "no weights entry", AUTOLR_E_FORMAT);
  }
}

static void test_guard(const std::string& dir) {
  autolr_runtime* rt = nullptr;
  if (autolr_open_file((dir + "/controller_h7_l2.pt").c_str(), &rt) != AUTOLR_OK) { CHECK(false, "open"); return; }
  float r1 = autolr_step(rt, 1.0f);
  std::vector<float> s1(autolr_state_size(rt)), s2(autolr_state_size(rt));
  autolr_get_state(rt, s1.data(), s1.size());
  CHECK(autolr_step(rt, NAN) == r1 && autolr_step(rt, INFINITY) == r1 && autolr_step(rt, -INFINITY) == r1, "non-finite loss keeps the rate");
  autolr_get_state(rt, s2.data(), s2.size());
  CHECK(s1 == s2, "non-finite loss changed the state");
  CHECK(autolr_skipped_steps(rt) == 3, "skipped count");
  // negative loss == loss 0
  autolr_runtime* a = nullptr;
  autolr_runtime* b = nullptr;
  autolr_open_file((dir + "/controller_h7_l2.pt").c_str(), &a);
  autolr_open_file((dir + "/controller_h7_l2.pt").c_str(), &b);
  if (a && b) CHECK(autolr_step(a, -3.f) == autolr_step(b, 0.f), "negative loss is clamped to 0");
  // huge loss: rate stays finite in [0, gamma]
  float big = autolr_step(rt, 3e38f);
  CHECK(std::isfinite(big) && big >= 0.f && big <= autolr_gamma(rt), "huge loss rate %g", big);
  autolr_free(a);
  autolr_free(b);
  autolr_free(rt);
}

int main(int argc, char** argv) {
  if (argc < 2) { std::fprintf(stderr, "usage: %s DATA_DIR\n", argv[0]); return 2; }
  const std::string dir = argv[1];
  std::printf("autolr %s\n", autolr_version());
  test_fixture(dir, "controller_h16_l1");
  test_fixture(dir, "controller_h7_l2");
  test_bad_files(dir);
  test_guard(dir);
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures ? 1 : 0;
}
