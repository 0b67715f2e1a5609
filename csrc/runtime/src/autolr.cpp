// autolr runtime: minimal zip reader (stored entries), ALRW parser, plain C++ MLR-SNet step.
// Every read is bounds-checked; nothing here throws across the C ABI.
#define AUTOLR_BUILDING 1
#include "autolr.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <vector>

namespace {

constexpr uint32_t kMaxHidden = 4096;
constexpr uint32_t kMaxLayers = 16;
constexpr size_t kHeaderSize = 28;  // magic, version, hidden, layers, flags, gamma, n_weights
constexpr const char* kEntrySuffix = "extra/autolr/weights.bin";

thread_local std::string g_error;

// No exception may cross the C ABI: a message that cannot be stored (out of memory) leaves the
// error text empty, the code still says what failed.
int fail(int code, const char* msg) noexcept {
  try {
    g_error = msg;
  } catch (...) {
    g_error.clear();
  }
  return code;
}

int fail(int code, const std::string& msg) noexcept { return fail(code, msg.c_str()); }

// ``build()`` makes the message (it may allocate): for messages built where nothing catches.
template <class Build>
int fail_with(int code, Build&& build) noexcept {
  try {
    g_error = build();
  } catch (...) {
    g_error.clear();
  }
  return code;
}

// ---- CRC32 (IEEE, the zip/zlib polynomial) ------------------------------------------------------
struct CrcTable {
  uint32_t t[256];
  CrcTable() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
      t[i] = c;
    }
  }
};

uint32_t crc32(const uint8_t* p, size_t n) {
  static const CrcTable table;
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table.t[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

// ---- little-endian reads with bounds ------------------------------------------------------------
struct Bytes {
  const uint8_t* p;
  size_t n;
  bool has(size_t off, size_t len) const { return off <= n && len <= n - off; }
  uint16_t u16(size_t off) const { return uint16_t(p[off] | (p[off + 1] << 8)); }
  uint32_t u32(size_t off) const {
    return uint32_t(p[off]) | (uint32_t(p[off + 1]) << 8) | (uint32_t(p[off + 2]) << 16) | (uint32_t(p[off + 3]) << 24);
  }
  uint64_t u64(size_t off) const { return uint64_t(u32(off)) | (uint64_t(u32(off + 4)) << 32); }
  float f32(size_t off) const {
    uint32_t u = u32(off);
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// ---- zip: find the stored ALRW entry via the central directory ------------------------------------
// Local headers may use data descriptors (general-purpose bit 3, as torch writes them), so sizes
// and CRC come from the central directory; zip64 records are honoured when present.
// A zip archive's first bytes (a local file header): a file that has them and no end record was cut.
bool starts_like_zip(const uint8_t* p, size_t n) {
  return n >= 4 && p[0] == 0x50 && p[1] == 0x4b && p[2] == 0x03 && p[3] == 0x04;
}

int find_weights_entry(const Bytes& z, size_t* data_off, size_t* data_len) {
  if (z.n < 22 && starts_like_zip(z.p, z.n))
    return fail(AUTOLR_E_CORRUPT, "a zip archive cut short (" + std::to_string(z.n) + " bytes): truncated");
  if (z.n < 22) return fail(AUTOLR_E_FORMAT, "not a zip/TorchScript archive (file too short: " + std::to_string(z.n) + " bytes)");
  // End of central directory: scan back over a possible comment (<= 65535 bytes).
  size_t eocd = SIZE_MAX;
  size_t lowest = z.n >= 22 + 65535 ? z.n - 22 - 65535 : 0;
  for (size_t i = z.n - 22 + 1; i-- > lowest;) {
    if (z.u32(i) == 0x06054b50u && i + 22 + size_t(z.u16(i + 20)) == z.n) { eocd = i; break; }
  }
  if (eocd == SIZE_MAX && starts_like_zip(z.p, z.n))
    return fail(AUTOLR_E_CORRUPT, "a zip archive without its end-of-central-directory record: truncated or damaged");
  if (eocd == SIZE_MAX) return fail(AUTOLR_E_FORMAT, "not a zip/TorchScript archive (no end-of-central-directory record)");
  uint64_t entries = z.u16(eocd + 10);
  uint64_t cd_size = z.u32(eocd + 12);
  uint64_t cd_off = z.u32(eocd + 16);
  if (entries == 0xFFFFu || cd_size == 0xFFFFFFFFu || cd_off == 0xFFFFFFFFu) {
    // zip64: locator just before the EOCD
    if (eocd < 20 || z.u32(eocd - 20) != 0x07064b50u) return fail(AUTOLR_E_CORRUPT, "zip64 archive without a zip64 locator");
    uint64_t z64 = z.u64(eocd - 20 + 8);
    if (z64 > z.n || !z.has(size_t(z64), 56) || z.u32(size_t(z64)) != 0x06064b50u)
      return fail(AUTOLR_E_CORRUPT, "zip64 end-of-central-directory record out of bounds or invalid");
    entries = z.u64(size_t(z64) + 32);
    cd_size = z.u64(size_t(z64) + 40);
    cd_off = z.u64(size_t(z64) + 48);
  }
  if (cd_off > z.n || cd_size > z.n || !z.has(size_t(cd_off), size_t(cd_size)))
    return fail(AUTOLR_E_CORRUPT, "zip central directory out of bounds (truncated or corrupted file)");
  size_t pos = size_t(cd_off), end = size_t(cd_off + cd_size);
  const size_t suffix_len = std::strlen(kEntrySuffix);
  for (uint64_t e = 0; e < entries; ++e) {
    if (pos > end || end - pos < 46 || z.u32(pos) != 0x02014b50u)
      return fail(AUTOLR_E_CORRUPT, "zip central directory entry " + std::to_string(e) + " is invalid");
    uint16_t flags = z.u16(pos + 8), method = z.u16(pos + 10);
    uint32_t crc = z.u32(pos + 16);
    uint64_t csize = z.u32(pos + 20), usize = z.u32(pos + 24);
    size_t name_len = z.u16(pos + 28), extra_len = z.u16(pos + 30), comment_len = z.u16(pos + 32);
    uint64_t local = z.u32(pos + 42);
    size_t rec = 46 + name_len + extra_len + comment_len;
    if (end - pos < rec) return fail(AUTOLR_E_CORRUPT, "zip central directory entry overruns the directory");
    const char* name = reinterpret_cast<const char*>(z.p + pos + 46);
    // name == "<archive>/extra/autolr/weights.bin" with exactly one leading folder
    const char* slash = static_cast<const char*>(std::memchr(name, '/', name_len));
    bool match = slash && size_t(name + name_len - (slash + 1)) == suffix_len &&
                 std::memcmp(slash + 1, kEntrySuffix, suffix_len) == 0;
    if (match) {
      // zip64 extended information: usize, csize, local offset (each only if saturated)
      size_t x = pos + 46 + name_len, xend = x + extra_len;
      while (xend - x >= 4) {
        uint16_t id = z.u16(x), len = z.u16(x + 2);
        if (xend - x - 4 < len) return fail(AUTOLR_E_CORRUPT, "zip extra field overruns its entry");
        if (id == 0x0001) {
          size_t q = x + 4, qend = q + len;
          auto take = [&](uint64_t* v) -> bool {
            if (*v != 0xFFFFFFFFu) return true;
            if (qend - q < 8) return false;
            *v = z.u64(q);
            q += 8;
            return true;
          };
          if (!take(&usize) || !take(&csize) || !take(&local)) return fail(AUTOLR_E_CORRUPT, "zip64 extra field too short");
        }
        x += 4 + size_t(len);
      }
      if (flags & 1u) return fail(AUTOLR_E_FORMAT, "the weights entry is encrypted");
      if (method != 0)
        return fail(AUTOLR_E_FORMAT, "the weights entry is compressed (method " + std::to_string(method) +
                                         "); the runtime reads stored entries only: re-export with autolr_fast.export");
      if (csize != usize) return fail(AUTOLR_E_CORRUPT, "stored zip entry with compressed size != size");
      if (local > z.n || !z.has(size_t(local), 30) || z.u32(size_t(local)) != 0x04034b50u)
        return fail(AUTOLR_E_CORRUPT, "zip local header of the weights entry is missing or out of bounds");
      // the local header must name the same entry (as Python's zipfile checks): a directory
      // pointing at another entry's data is a damaged or crafted archive
      const size_t local_name_len = z.u16(size_t(local) + 26);
      if (local_name_len != name_len || !z.has(size_t(local) + 30, name_len) ||
          std::memcmp(z.p + size_t(local) + 30, name, name_len) != 0)
        return fail(AUTOLR_E_CORRUPT, "the zip local header of the weights entry names another file");
      uint64_t data = local + 30 + local_name_len + z.u16(size_t(local) + 28);
      if (data > z.n || usize > z.n || !z.has(size_t(data), size_t(usize)))
        return fail(AUTOLR_E_CORRUPT, "the weights entry runs past the end of the file (truncated)");
      if (crc32(z.p + data, size_t(usize)) != crc)
        return fail(AUTOLR_E_CORRUPT, "CRC32 mismatch in the zip entry of the weights (corrupted file)");
      *data_off = size_t(data);
      *data_len = size_t(usize);
      return AUTOLR_OK;
    }
    pos += rec;
  }
  return fail(AUTOLR_E_FORMAT, std::string("the archive has no '") + kEntrySuffix +
                                   "' entry: not a file written by autolr_fast.export.export");
}

}  // namespace

// ---- the runtime ---------------------------------------------------------------------------------
struct autolr_runtime {
  int H = 0, L = 0, M = 0;
  float gamma = 0.f, rate = 0.f;
  uint64_t skipped = 0;
  // Per layer, transposed so every product is an axpy over contiguous memory (vectorises without
  // reassociation): i2h0 (in, M), h2h0 (H, M), W2 = [i2h2 | h2h2]^T (2M, 4H), b0x, b0h (M), b2 (4H).
  struct Layer {
    int in = 1;
    std::vector<float> i2h0_t, b0x, h2h0_t, b0h, w2_t, b2;
  };
  std::vector<Layer> layers;
  std::vector<float> head_w;
  float head_b = 0.f;
  std::vector<float> h, c, h_new, c_new;    // (L, H)
  std::vector<float> act, z;                // (2M), (4H)
};

namespace {

// exp(x) for x <= 0 without a libm call, branch-free so that loops over it vectorise:
// x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial (rel. error ~2e-7), 2^n via the
// exponent bits. Inputs below -87 are clamped (e^-87 ~ 1.6e-38); NaN propagates.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float n_safe = n == n ? n : 0.0f;  // NaN input: p is NaN already, keep the cast defined
  const uint32_t bits = uint32_t(int32_t(n_safe) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
// sigmoid(x) = 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) for x < 0 (never overflows).
inline float sigmoid_fast(float x) {
  const float e = exp_nonpos(-std::fabs(x));
  const float s = 1.0f / (1.0f + e);
  return x >= 0.0f ? s : e * s;
}
// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|)
inline float tanh_fast(float x) {
  const float e = exp_nonpos(-2.0f * std::fabs(x));
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__SANITIZE_ADDRESS__) && !defined(AUTOLR_NO_CLONES)
#define AUTOLR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define AUTOLR_CLONES
#endif

// The gates of one cell, in place over z (4H): sigmoid(i), sigmoid(f - 1), sigmoid(o), tanh(g);
// then c' = f c + i g and h' = o tanh(c'). NaN in z propagates (as in PyTorch).
AUTOLR_CLONES void lstm_gates(float* z, const float* c, float* c_new, float* h_new, int H) {
  for (int r = 0; r < H; ++r) z[H + r] -= 1.0f;
  for (int r = 0; r < 3 * H; ++r) z[r] = sigmoid_fast(z[r]);
  for (int r = 0; r < H; ++r) z[3 * H + r] = tanh_fast(z[3 * H + r]);
  for (int r = 0; r < H; ++r) c_new[r] = z[H + r] * c[r] + z[r] * z[3 * H + r];
  for (int r = 0; r < H; ++r) h_new[r] = z[2 * H + r] * tanh_fast(c_new[r]);
}

// y = b + W x with W given transposed (wt: (cols, rows), row-major), summed over j in order.
constexpr int kTile = 16;
AUTOLR_CLONES void matvec_t(const float* wt, const float* x, const float* b, float* y, int rows, int cols) {
  int r0 = 0;
  for (; r0 + kTile <= rows; r0 += kTile) {
    float acc[kTile];
    for (int t = 0; t < kTile; ++t) acc[t] = b[r0 + t];
    for (int j = 0; j < cols; ++j) {
      const float xj = x[j];
      const float* col = wt + size_t(j) * size_t(rows) + r0;
      for (int t = 0; t < kTile; ++t) acc[t] += col[t] * xj;
    }
    for (int t = 0; t < kTile; ++t) y[r0 + t] = acc[t];
  }
  for (int r = r0; r < rows; ++r) {
    float acc = b[r];
    for (int j = 0; j < cols; ++j) acc += wt[size_t(j) * size_t(rows) + r] * x[j];
    y[r] = acc;
  }
}

// Number of weights of an MLR-SNet with hidden size H and L layers, in ALRW order.
uint64_t expected_weight_count(uint64_t H, uint64_t L) {
  const uint64_t M = H / 2;
  uint64_t n = 0;
  for (uint64_t k = 0; k < L; ++k) {
    uint64_t in = k == 0 ? 1 : H;
    n += M * in + M + 4 * H * M + 4 * H + M * H + M + 4 * H * M + 4 * H;
  }
  return n + H + 1;
}

// The largest exported file: the weights twice (TorchScript buffers and the ALRW entry) at the
// largest shape, plus room for the archive's code and zip records.
uint64_t max_file_bytes() {
  const uint64_t alrw = kHeaderSize + 4 * (expected_weight_count(kMaxHidden, kMaxLayers) +
                                           2 * uint64_t(kMaxLayers) * kMaxHidden + 1) + 4;
  return 2 * alrw + (uint64_t(64) << 20);
}

int parse_weights(const Bytes& b, autolr_runtime** out) {
  if (b.n < kHeaderSize + 4)
    return fail(AUTOLR_E_CORRUPT, "ALRW weights truncated (" + std::to_string(b.n) + " bytes, header needs " +
                                      std::to_string(kHeaderSize + 4) + ")");
  if (std::memcmp(b.p, "ALRW", 4) != 0) return fail(AUTOLR_E_FORMAT, "not ALRW weights (bad magic)");
  uint32_t version = b.u32(4), hidden = b.u32(8), layers = b.u32(12), flags = b.u32(16);
  float gamma = b.f32(20);
  uint32_t n_weights = b.u32(24);
  if (version != AUTOLR_FORMAT_VERSION)
    return fail(AUTOLR_E_VERSION, "ALRW format version " + std::to_string(version) + " is not supported (this runtime reads version " +
                                      std::to_string(AUTOLR_FORMAT_VERSION) + "); re-export or update the runtime");
  if (hidden < 2 || hidden > kMaxHidden || layers < 1 || layers > kMaxLayers)
    return fail(AUTOLR_E_FORMAT, "implausible shape hidden=" + std::to_string(hidden) + " layers=" + std::to_string(layers));
  if (flags != 0) return fail(AUTOLR_E_FORMAT, "unknown ALRW flags " + std::to_string(flags));
  const uint64_t H = hidden, L = layers, M = hidden / 2;
  const uint64_t expect = expected_weight_count(H, L);
  if (n_weights != expect)
    return fail(AUTOLR_E_CORRUPT, "weight count " + std::to_string(n_weights) + " does not match hidden=" + std::to_string(hidden) +
                                      " layers=" + std::to_string(layers) + " (expected " + std::to_string(expect) + ")");
  const uint64_t n_state = 2 * L * H + 1;
  const uint64_t total = kHeaderSize + 4 * (expect + n_state) + 4;
  if (b.n != total)
    return fail(AUTOLR_E_CORRUPT, "ALRW weights have " + std::to_string(b.n) + " bytes, expected " + std::to_string(total) +
                                      " (truncated or trailing data)");
  if (crc32(b.p, size_t(total - 4)) != b.u32(size_t(total - 4)))
    return fail(AUTOLR_E_CORRUPT, "CRC32 mismatch in the ALRW weights (corrupted)");
  if (!(std::isfinite(gamma) && gamma > 0.f)) return fail(AUTOLR_E_FORMAT, "gamma is not a positive finite number");
  for (uint64_t i = 0; i < expect + n_state; ++i)
    if (!std::isfinite(b.f32(size_t(kHeaderSize + 4 * i)))) return fail(AUTOLR_E_FORMAT, "weights or state contain NaN/Inf");
  const float rate0 = b.f32(size_t(total - 8));
  if (!(rate0 >= 0.f && rate0 <= gamma)) return fail(AUTOLR_E_FORMAT, "the stored rate is outside [0, gamma]");

  autolr_runtime* rt = new (std::nothrow) autolr_runtime;
  if (!rt) return fail(AUTOLR_E_MEMORY, "out of memory");
  try {
    rt->H = int(H); rt->L = int(L); rt->M = int(M);
    rt->gamma = gamma;
    size_t off = kHeaderSize;
    auto read = [&](size_t count) {
      std::vector<float> v(count);
      for (size_t i = 0; i < count; ++i) v[i] = b.f32(off + 4 * i);
      off += 4 * count;
      return v;
    };
    auto transpose = [](const std::vector<float>& w, size_t rows, size_t cols) {  // (rows, cols) -> (cols, rows)
      std::vector<float> t(w.size());
      for (size_t r = 0; r < rows; ++r)
        for (size_t q = 0; q < cols; ++q) t[q * rows + r] = w[r * cols + q];
      return t;
    };
    rt->layers.resize(L);
    for (uint64_t k = 0; k < L; ++k) {
      auto& ly = rt->layers[k];
      ly.in = k == 0 ? 1 : int(H);
      ly.i2h0_t = transpose(read(M * ly.in), M, ly.in);
      ly.b0x = read(M);
      std::vector<float> wx = transpose(read(4 * H * M), 4 * H, M);  // (M, 4H)
      std::vector<float> bx = read(4 * H);
      ly.h2h0_t = transpose(read(M * H), M, H);
      ly.b0h = read(M);
      std::vector<float> wh = transpose(read(4 * H * M), 4 * H, M);
      std::vector<float> bh = read(4 * H);
      ly.w2_t = wx;
      ly.w2_t.insert(ly.w2_t.end(), wh.begin(), wh.end());
      ly.b2.resize(4 * H);
      for (size_t r = 0; r < 4 * H; ++r) ly.b2[r] = bx[r] + bh[r];
    }
    rt->head_w = read(H);
    rt->head_b = read(1)[0];
    rt->h = read(L * H);
    rt->c = read(L * H);
    rt->rate = read(1)[0];
    rt->h_new.assign(L * H, 0.f);
    rt->c_new.assign(L * H, 0.f);
    rt->act.assign(2 * M, 0.f);
    rt->z.assign(4 * H, 0.f);
  } catch (const std::bad_alloc&) {
    delete rt;
    return fail(AUTOLR_E_MEMORY, "out of memory");
  }
  *out = rt;
  return AUTOLR_OK;
}

int open_bytes(const uint8_t* p, size_t n, autolr_runtime** out) {
  size_t off = 0, len = 0;
  Bytes z{p, n};
  int st = find_weights_entry(z, &off, &len);
  if (st != AUTOLR_OK) return st;
  return parse_weights(Bytes{p + off, len}, out);
}

}  // namespace

extern "C" {

int autolr_open_memory(const void* data, size_t size, autolr_runtime** out) {
  if (!out) return fail(AUTOLR_E_ARGUMENT, "autolr_open_memory: out is NULL");
  *out = nullptr;
  if (!data && size) return fail(AUTOLR_E_ARGUMENT, "autolr_open_memory: data is NULL");
  try {
    g_error.clear();
    return open_bytes(static_cast<const uint8_t*>(data), data ? size : 0, out);
  } catch (...) {
    return fail(AUTOLR_E_MEMORY, "out of memory while reading the file");
  }
}

int autolr_open_weights(const void* data, size_t size, autolr_runtime** out) {
  if (!out) return fail(AUTOLR_E_ARGUMENT, "autolr_open_weights: out is NULL");
  *out = nullptr;
  if (!data && size) return fail(AUTOLR_E_ARGUMENT, "autolr_open_weights: data is NULL");
  try {
    g_error.clear();
    return parse_weights(Bytes{static_cast<const uint8_t*>(data), data ? size : 0}, out);
  } catch (...) {
    return fail(AUTOLR_E_MEMORY, "out of memory while reading the weights");
  }
}

int autolr_open_file(const char* path, autolr_runtime** out) {
  if (!out) return fail(AUTOLR_E_ARGUMENT, "autolr_open_file: out is NULL");
  *out = nullptr;
  if (!path) return fail(AUTOLR_E_ARGUMENT, "autolr_open_file: path is NULL");
  std::FILE* f = std::fopen(path, "rb");
  if (!f) {
    const int e = errno;  // before anything that allocates can change it
    return fail_with(AUTOLR_E_IO, [&] { return std::string("cannot open '") + path + "': " + std::strerror(e); });
  }
  if (std::fgetc(f) == EOF && std::ferror(f)) {  // a folder opens on some systems, then fails to read
    const int e = errno;
    std::fclose(f);
    return fail_with(AUTOLR_E_IO, [&] { return std::string("read error on '") + path + "': " + std::strerror(e); });
  }
  // Before reading a large file whole: its size, and the zip's end record in its tail (a file that
  // is no zip is refused in a single read of at most 64 KiB). Skipped where the file cannot seek.
  if (std::fseek(f, 0, SEEK_END) == 0) {
    const long size = std::ftell(f);
    if (size >= 0 && uint64_t(size) > max_file_bytes()) {
      std::fclose(f);
      return fail_with(AUTOLR_E_FORMAT, [&] { return std::string("'") + path + "' is larger than any exported controller (" +
                                       std::to_string(max_file_bytes()) + " bytes at hidden=4096, layers=16)"; });
    }
    const long tail = size < 65557 ? size : 65557;  // the end record: 22 bytes plus a comment of < 64 KiB
    if (size >= 22 && std::fseek(f, size - tail, SEEK_SET) == 0) {
      std::vector<uint8_t> end;
      try {
        end.assign(size_t(tail), 0);
      } catch (...) {
        std::fclose(f);
        return fail(AUTOLR_E_MEMORY, "out of memory while reading the file");
      }
      // a short read leaves the decision to the full read below
      bool found = std::fread(end.data(), 1, end.size(), f) != end.size();
      for (size_t i = 0; !found && i + 4 <= end.size(); ++i)
        found = end[i] == 0x50 && end[i + 1] == 0x4b && end[i + 2] == 0x05 && end[i + 3] == 0x06;
      if (!found) {
        uint8_t head[4] = {0, 0, 0, 0};
        std::rewind(f);
        const bool zip = std::fread(head, 1, 4, f) == 4 && starts_like_zip(head, 4);
        std::fclose(f);
        if (zip)
          return fail_with(AUTOLR_E_CORRUPT, [&] { return std::string(path) + ": a zip archive without its end-of-central-directory "
                                        "record: truncated or damaged"; });
        return fail_with(AUTOLR_E_FORMAT, [&] { return std::string(path) + ": not a zip/TorchScript archive (no end-of-central-directory "
                                     "record)"; });
      }
    }
    std::rewind(f);
  } else {
    std::clearerr(f);
  }
  std::vector<uint8_t> buf;
  try {
    uint8_t chunk[65536];
    size_t got;
    while ((got = std::fread(chunk, 1, sizeof chunk, f)) > 0) {
      if (uint64_t(buf.size()) > max_file_bytes()) {
        std::fclose(f);
        return fail_with(AUTOLR_E_FORMAT, [&] { return std::string("'") + path + "' is larger than any exported controller (" +
                                         std::to_string(max_file_bytes()) + " bytes at hidden=4096, layers=16)"; });
      }
      buf.insert(buf.end(), chunk, chunk + got);
    }
  } catch (...) {
    std::fclose(f);
    return fail(AUTOLR_E_MEMORY, "out of memory while reading the file");
  }
  bool err = std::ferror(f) != 0;
  std::fclose(f);
  if (err) return fail_with(AUTOLR_E_IO, [&] { return std::string("read error on '") + path + "'"; });
  int st = autolr_open_memory(buf.data(), buf.size(), out);
  if (st != AUTOLR_OK) {
    try {
      g_error.insert(0, std::string(path) + ": ");
    } catch (...) {  // out of memory: the message stays without the path (insert changes nothing then)
    }
  }
  return st;
}

void autolr_free(autolr_runtime* rt) { delete rt; }

float autolr_step(autolr_runtime* rt, float loss) {
  if (!rt) {
    fail(AUTOLR_E_ARGUMENT, "autolr_step: handle is NULL");
    return NAN;
  }
  if (!std::isfinite(loss)) {
    ++rt->skipped;
    return rt->rate;
  }
  const int H = rt->H, M = rt->M, H4 = 4 * H;
  float* act = rt->act.data();
  float* z = rt->z.data();
  float x1 = loss > 0.f ? loss : 0.f;  // layer-0 input is a scalar
  const float* xin = &x1;
  for (int k = 0; k < rt->L; ++k) {
    const auto& ly = rt->layers[k];
    const float* hk = rt->h.data() + size_t(k) * H;
    const float* ck = rt->c.data() + size_t(k) * H;
    // act = [relu(i2h0 x + b), relu(h2h0 h + b)]
    for (int m = 0; m < M; ++m) { act[m] = ly.b0x[m]; act[M + m] = ly.b0h[m]; }
    for (int j = 0; j < ly.in; ++j) {
      const float xj = xin[j];
      const float* col = ly.i2h0_t.data() + size_t(j) * M;
      for (int m = 0; m < M; ++m) act[m] += col[m] * xj;
    }
    for (int j = 0; j < H; ++j) {
      const float hj = hk[j];
      const float* col = ly.h2h0_t.data() + size_t(j) * M;
      for (int m = 0; m < M; ++m) act[M + m] += col[m] * hj;
    }
    for (int m = 0; m < 2 * M; ++m) act[m] = (act[m] > 0.f || act[m] != act[m]) ? act[m] : 0.f;  // relu, NaN kept (as torch)
    // z = W2 act + b2 (4H), in register tiles of kTile rows (the accumulators stay in registers)
    matvec_t(ly.w2_t.data(), act, ly.b2.data(), z, H4, 2 * M);
    float* hn = rt->h_new.data() + size_t(k) * H;
    float* cn = rt->c_new.data() + size_t(k) * H;
    lstm_gates(z, ck, cn, hn, H);
    xin = hn;
  }
  float s = rt->head_b;
  for (int r = 0; r < H; ++r) s += rt->head_w[r] * xin[r];
  const float p = sigmoid_fast(s);
  float rate = rt->gamma * p;
  // Controller blew up: keep state and rate (the reference guard). Stricter than the reference
  // in one respect: a finite rate with a non-finite h or c (only with absurd weights) is refused
  // too, so the stored state is always finite.
  bool ok = std::isfinite(rate);
  for (size_t i = 0, n = rt->h_new.size(); ok && i < n; ++i) ok = std::isfinite(rt->h_new[i]) && std::isfinite(rt->c_new[i]);
  if (!ok) {
    ++rt->skipped;
    return rt->rate;
  }
  rate = rate < 0.f ? 0.f : (rate > rt->gamma ? rt->gamma : rate);
  rt->h.swap(rt->h_new);
  rt->c.swap(rt->c_new);
  rt->rate = rate;
  return rate;
}

int autolr_anchor(autolr_runtime* rt, float loss, float lr) {
  // AutoLR's default scale (autolr_fast/rate_scale.py, RateScale._anchor): settle on the run's
  // first finite loss, then the scale that makes the settled rate lr
  constexpr int kSettleSteps = 300;      // rate_scale.SETTLE_STEPS
  constexpr float kMinSettledP = 1e-3f;  // rate_scale.MIN_SETTLED_P
  if (!rt) return fail(AUTOLR_E_ARGUMENT, "autolr_anchor: handle is NULL");
  if (!(std::isfinite(lr) && lr > 0.f)) return fail(AUTOLR_E_ARGUMENT, "autolr_anchor: lr must be a positive finite number");
  if (!std::isfinite(loss)) return fail(AUTOLR_E_ARGUMENT, "autolr_anchor: the loss is not finite; anchor on the first finite loss");
  try {
    std::vector<float> h = rt->h, c = rt->c;  // restored by swap (noexcept) if the anchor is refused
    const float gamma = rt->gamma, rate = rt->rate;
    const uint64_t skipped = rt->skipped;
    rt->gamma = 1.f;
    rt->rate = 0.f;
    float p = 0.f;
    for (int i = 0; i < kSettleSteps; ++i) p = autolr_step(rt, loss);
    const float anchored = lr / p;
    // the message goes into a fixed buffer: nothing allocates between the settle and the restore
    char why[160] = "";
    if (rt->skipped != skipped)
      std::snprintf(why, sizeof why, "the controller's output is not finite on this loss");
    else if (!(p >= kMinSettledP))
      std::snprintf(why, sizeof why, "the controller settles at p = %g on this loss (a usable anchor needs p >= 1e-3)",
                    double(p));
    else if (!std::isfinite(anchored))
      std::snprintf(why, sizeof why, "lr / p overflows a float (lr is too large)");
    if (why[0] != '\0') {
      rt->h.swap(h);
      rt->c.swap(c);
      rt->gamma = gamma;
      rt->rate = rate;
      rt->skipped = skipped;
      return fail_with(AUTOLR_E_ARGUMENT, [&] { return std::string("autolr_anchor: ") + why + "; state unchanged"; });
    }
    rt->gamma = anchored;
    rt->rate = lr < anchored ? lr : anchored;
    return AUTOLR_OK;
  } catch (const std::bad_alloc&) {
    return fail(AUTOLR_E_MEMORY, "autolr_anchor: out of memory");
  }
}

int autolr_set_gamma(autolr_runtime* rt, float gamma) {
  if (!rt) return fail(AUTOLR_E_ARGUMENT, "autolr_set_gamma: handle is NULL");
  if (!(std::isfinite(gamma) && gamma > 0.f))
    return fail(AUTOLR_E_ARGUMENT, "autolr_set_gamma: gamma must be a positive finite number");
  rt->gamma = gamma;
  if (rt->rate > gamma) rt->rate = gamma;  // the rate stays in [0, gamma]
  return AUTOLR_OK;
}

int autolr_reset(autolr_runtime* rt) {
  if (!rt) return fail(AUTOLR_E_ARGUMENT, "autolr_reset: handle is NULL");
  std::fill(rt->h.begin(), rt->h.end(), 0.f);
  std::fill(rt->c.begin(), rt->c.end(), 0.f);
  rt->rate = 0.f;
  return AUTOLR_OK;
}

float autolr_rate(const autolr_runtime* rt) { return rt ? rt->rate : NAN; }
float autolr_gamma(const autolr_runtime* rt) { return rt ? rt->gamma : NAN; }
int autolr_hidden_size(const autolr_runtime* rt) { return rt ? rt->H : 0; }
int autolr_num_layers(const autolr_runtime* rt) { return rt ? rt->L : 0; }
uint64_t autolr_skipped_steps(const autolr_runtime* rt) { return rt ? rt->skipped : 0; }

size_t autolr_state_size(const autolr_runtime* rt) { return rt ? 2 * rt->h.size() + 1 : 0; }

int autolr_get_state(const autolr_runtime* rt, float* buf, size_t n) {
  if (!rt || !buf) return fail(AUTOLR_E_ARGUMENT, "autolr_get_state: NULL handle or buffer");
  const size_t want = autolr_state_size(rt);
  if (n != want) return fail_with(AUTOLR_E_ARGUMENT, [&] { return "autolr_get_state: buffer has " + std::to_string(n) + " floats, the state has " + std::to_string(want); });
  std::memcpy(buf, rt->h.data(), sizeof(float) * rt->h.size());
  std::memcpy(buf + rt->h.size(), rt->c.data(), sizeof(float) * rt->c.size());
  buf[want - 1] = rt->rate;
  return AUTOLR_OK;
}

int autolr_set_state(autolr_runtime* rt, const float* buf, size_t n) {
  if (!rt || !buf) return fail(AUTOLR_E_ARGUMENT, "autolr_set_state: NULL handle or buffer");
  const size_t want = autolr_state_size(rt);
  if (n != want) return fail_with(AUTOLR_E_ARGUMENT, [&] { return "autolr_set_state: buffer has " + std::to_string(n) + " floats, the state needs " + std::to_string(want); });
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(buf[i])) return fail_with(AUTOLR_E_ARGUMENT, [&] { return "autolr_set_state: value " + std::to_string(i) + " is not finite"; });
  if (buf[n - 1] < 0.f || buf[n - 1] > rt->gamma) return fail(AUTOLR_E_ARGUMENT, "autolr_set_state: rate is outside [0, gamma]");
  std::memcpy(rt->h.data(), buf, sizeof(float) * rt->h.size());
  std::memcpy(rt->c.data(), buf + rt->h.size(), sizeof(float) * rt->c.size());
  rt->rate = buf[n - 1];
  return AUTOLR_OK;
}

const char* autolr_last_error(void) { return g_error.c_str(); }
const char* autolr_version(void) { return "0.1.0 (ALRW v1)"; }

}  // extern "C"
