// MLR-SNet controller step and its weight gradient on the CPU, as raw loops over the weights.
//
// The step is a few thousand multiply-adds: ATen op calls (each ~1-5 us of dispatch) would
// dominate it, so the kernel reads data pointers directly, keeps its scratch in a
// thread-local buffer (no allocation after the first call) and allocates only the returned
// `ok` flag. Semantics: reference.mlrsnet_guarded_step (+ lr_k <- rate * scales[k]) and
// reference.mlrsnet_param_grads; weight layout: the reference.py module docstring.
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "mlrsnet_cpu.h"
#include "ops_common.h"

namespace autolr_fast {
namespace {

constexpr int64_t kWeightsPerCell = 8;

// Pointers to one stacked cell's weights; `in` is its input size (1 for cell 0, H after).
struct CellWeights {
  const float *w0, *b0, *w2, *b2, *v0, *vb0, *v2, *vb2;
  int64_t in;
};

struct Net {
  int64_t layers = 0, hidden = 0, mid = 0;
  c10::SmallVector<CellWeights, 4> cells;  // no heap allocation up to 4 stacked cells
  const float* head_w = nullptr;
  const float* head_b = nullptr;
};

double read_scalar(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 1-element tensor, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; this kernel needs CPU tensors");
  const void* p = t.const_data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat: return *static_cast<const float*>(p);
    case at::kDouble: return *static_cast<const double*>(p);
    case at::kHalf: return static_cast<float>(*static_cast<const c10::Half*>(p));
    case at::kBFloat16: return static_cast<float>(*static_cast<const c10::BFloat16*>(p));
    default: TORCH_CHECK(false, op, ": ", name, " must be a floating tensor, got ", t.scalar_type());
  }
  return 0.0;
}

// What write_scalar needs, checked before anything is written (bad input changes no state).
void bump_version(const Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }

void check_writable(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 1-element tensor, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; this kernel needs CPU tensors");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be a float32 or float64 tensor, got ", t.scalar_type());
}

void write_scalar(const char* op, const char* name, const Tensor& t, double value) {
  check_writable(op, name, t);
  void* p = t.mutable_data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat: *static_cast<float*>(p) = static_cast<float>(value); break;
    case at::kDouble: *static_cast<double*>(p) = value; break;
    default: TORCH_CHECK(false, op, ": ", name, " must be a float32 or float64 tensor, got ", t.scalar_type());
  }
}

void check_f32(const char* op, const char* name, const Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ", shape,
              " (see the weight layout in autolr_fast/ops/reference.py)");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous; call .contiguous() on it");
}

Net check_net(const char* op, const Tensor& h, const Tensor& c, TensorList weights) {
  TORCH_CHECK(h.dim() == 2 && h.size(0) >= 1 && h.size(1) >= 2, op,
              ": h must have shape (num_layers, hidden) with hidden >= 2, got ", h.sizes());
  Net net;
  net.layers = h.size(0);
  net.hidden = h.size(1);
  net.mid = net.hidden / 2;
  const int64_t H = net.hidden, M = net.mid;
  check_f32(op, "h", h, {net.layers, H});
  check_f32(op, "c", c, {net.layers, H});
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kWeightsPerCell * net.layers + 2, op, ": expected ",
              kWeightsPerCell * net.layers + 2, " weight tensors for ", net.layers, " cell(s), got ", weights.size());
  for (int64_t l = 0; l < net.layers; ++l) {
    const int64_t in = l == 0 ? 1 : H;
    const Tensor* w = &weights[kWeightsPerCell * l];
    check_f32(op, "i2h.0.weight", w[0], {M, in});
    check_f32(op, "i2h.0.bias", w[1], {M});
    check_f32(op, "i2h.2.weight", w[2], {4 * H, M});
    check_f32(op, "i2h.2.bias", w[3], {4 * H});
    check_f32(op, "h2h.0.weight", w[4], {M, H});
    check_f32(op, "h2h.0.bias", w[5], {M});
    check_f32(op, "h2h.2.weight", w[6], {4 * H, M});
    check_f32(op, "h2h.2.bias", w[7], {4 * H});
    net.cells.push_back(CellWeights{w[0].const_data_ptr<float>(), w[1].const_data_ptr<float>(),
                                    w[2].const_data_ptr<float>(), w[3].const_data_ptr<float>(),
                                    w[4].const_data_ptr<float>(), w[5].const_data_ptr<float>(),
                                    w[6].const_data_ptr<float>(), w[7].const_data_ptr<float>(), in});
  }
  check_f32(op, "head.weight", weights[weights.size() - 2], {1, H});
  check_f32(op, "head.bias", weights[weights.size() - 1], {1});
  net.head_w = weights[weights.size() - 2].const_data_ptr<float>();
  net.head_b = weights[weights.size() - 1].const_data_ptr<float>();
  return net;
}

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// LSTM gates from the pre-activations z = [zi, zf, zo, zg] (4H): overwrites z with the
// activations (i, f, o, g; kept for the backward pass) and writes c_new, h_new.
void gates_generic(float* z, const float* c_prev, int64_t H, int64_t from, float* h_out, float* c_out) {
  for (int64_t j = from; j < H; ++j) {
    const float i = sigmoid(z[j]);
    const float f = sigmoid(z[H + j] - 1.f);
    const float o = sigmoid(z[2 * H + j]);
    const float g = std::tanh(z[3 * H + j]);
    z[j] = i;
    z[H + j] = f;
    z[2 * H + j] = o;
    z[3 * H + j] = g;
    const float cn = f * c_prev[j] + i * g;
    c_out[j] = cn;
    h_out[j] = o * std::tanh(cn);
  }
}

void gates_generic_all(float* z, const float* c_prev, int64_t H, float* h_out, float* c_out) {
  gates_generic(z, c_prev, H, 0, h_out, c_out);
}

// <w, x> over n floats with 8 independent lanes (vectorisable without reassociation flags).
float dot_generic(const float* __restrict w, const float* __restrict x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) acc[j] += w[k + j] * x[k + j];
  float tail = 0.f;
  for (; k < n; ++k) tail += w[k] * x[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

void matvec_generic(const float* W, const float* x, int64_t rows, int64_t cols, float* y) {
  for (int64_t r = 0; r < rows; ++r) y[r] = dot_generic(W + r * cols, x, cols);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AUTOLR_HAVE_AVX2_PATH 1
// The same dot with AVX2 + FMA (chosen at run time when the CPU has them; the binary stays
// portable). Masked loads handle the n % 8 tail, so odd hidden sizes need no scalar loop.
__attribute__((target("avx2,fma"))) float dot_avx2(const float* __restrict w, const float* __restrict x,
                                                   int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), acc1);
  }
  if (k + 8 <= n) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), acc0);
    k += 8;
  }
  if (k < n) {
    const int rem = static_cast<int>(n - k);
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), idx);
    acc1 = _mm256_fmadd_ps(_mm256_maskload_ps(w + k, mask), _mm256_maskload_ps(x + k, mask), acc1);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// y[r] = <W[r, :], x> for `rows` rows of a row-major (rows, cols) matrix, 8 rows at a time:
// 8 independent FMA chains share the x loads, one transpose-and-add reduces them together.
__attribute__((target("avx2,fma"))) void matvec_avx2(const float* __restrict W, const float* __restrict x,
                                                     int64_t rows, int64_t cols, float* __restrict y) {
  const int rem = static_cast<int>(cols % 8);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const int64_t full = cols - rem;
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    __m256 a[8];
    for (int q = 0; q < 8; ++q) a[q] = _mm256_setzero_ps();
    for (int64_t k = 0; k < full; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int q = 0; q < 8; ++q) a[q] = _mm256_fmadd_ps(_mm256_loadu_ps(W + (r + q) * cols + k), xv, a[q]);
    }
    if (rem) {
      const __m256 xv = _mm256_maskload_ps(x + full, mask);
      for (int q = 0; q < 8; ++q)
        a[q] = _mm256_fmadd_ps(_mm256_maskload_ps(W + (r + q) * cols + full, mask), xv, a[q]);
    }
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    _mm256_storeu_ps(y + r, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
  }
  for (; r < rows; ++r) y[r] = dot_avx2(W + r * cols, x, cols);
}

// exp on 8 floats: range reduction x = n ln2 + r, degree-6 polynomial for e^r (Cephes
// coefficients), 2^n through the exponent bits; ~2 ulp on [-87, 88]. The clamp is written
// max(lo, x) / min(hi, .) so that NaN passes through (the NaN guard must still see it).
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// tanh(x) = 1 - 2 / (e^{2x} + 1): absolute error ~1e-7 (relative error grows only near 0).
__attribute__((target("avx2,fma"))) inline __m256 tanh8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp8(_mm256_add_ps(x, x));
  return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, one)));
}

__attribute__((target("avx2,fma"))) void gates_avx2(float* z, const float* c_prev, int64_t H, float* h_out,
                                                    float* c_out) {
  int64_t j = 0;
  for (; j + 8 <= H; j += 8) {
    const __m256 i = sigmoid8(_mm256_loadu_ps(z + j));
    const __m256 f = sigmoid8(_mm256_sub_ps(_mm256_loadu_ps(z + H + j), _mm256_set1_ps(1.f)));
    const __m256 o = sigmoid8(_mm256_loadu_ps(z + 2 * H + j));
    const __m256 g = tanh8(_mm256_loadu_ps(z + 3 * H + j));
    _mm256_storeu_ps(z + j, i);
    _mm256_storeu_ps(z + H + j, f);
    _mm256_storeu_ps(z + 2 * H + j, o);
    _mm256_storeu_ps(z + 3 * H + j, g);
    const __m256 cn = _mm256_add_ps(_mm256_mul_ps(f, _mm256_loadu_ps(c_prev + j)), _mm256_mul_ps(i, g));
    _mm256_storeu_ps(c_out + j, cn);
    _mm256_storeu_ps(h_out + j, _mm256_mul_ps(o, tanh8(cn)));
  }
  gates_generic(z, c_prev, H, j, h_out, c_out);  // the H % 8 tail
}
#endif


// The inner loops, picked once for this CPU.
struct Kernels {
  float (*dot)(const float*, const float*, int64_t);
  void (*matvec)(const float*, const float*, int64_t, int64_t, float*);
  void (*gates)(float*, const float*, int64_t, float*, float*);
};

Kernels pick_kernels() {
#ifdef AUTOLR_HAVE_AVX2_PATH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Kernels{dot_avx2, matvec_avx2, gates_avx2};
#endif
  return Kernels{dot_generic, matvec_generic, gates_generic_all};
}

const Kernels kKernels = pick_kernels();

inline float dot(const float* w, const float* x, int64_t n) { return kKernels.dot(w, x, n); }

// Intermediates of one cell kept for the backward pass (pointers into a scratch buffer).
struct CellTrace {
  float *pre1, *pre2, *a1, *a2, *gates;  // gates: i, f, o, g activations (4H)
};

// One cell: h_out/c_out from input x (size cell.in), previous h/c of this layer.
// `tmp` is 4H floats of scratch.
void cell_forward(const CellWeights& w, int64_t H, int64_t M, const float* x, const float* h_prev,
                  const float* c_prev, const CellTrace& tr, float* tmp, float* h_out, float* c_out) {
  if (w.in == 1) {
    for (int64_t m = 0; m < M; ++m) tr.pre1[m] = w.w0[m] * x[0];
  } else {
    kKernels.matvec(w.w0, x, M, w.in, tr.pre1);
  }
  kKernels.matvec(w.v0, h_prev, M, H, tr.pre2);
  for (int64_t m = 0; m < M; ++m) {
    const float p1 = w.b0[m] + tr.pre1[m];
    const float p2 = w.vb0[m] + tr.pre2[m];
    tr.pre1[m] = p1;
    tr.pre2[m] = p2;
    // relu that keeps a NaN (as torch.relu): the step's NaN guard must see it
    tr.a1[m] = p1 < 0.f ? 0.f : p1;
    tr.a2[m] = p2 < 0.f ? 0.f : p2;
  }
  float* z = tr.gates;
  kKernels.matvec(w.w2, tr.a1, 4 * H, M, z);
  kKernels.matvec(w.v2, tr.a2, 4 * H, M, tmp);
  for (int64_t r = 0; r < 4 * H; ++r) z[r] = (w.b2[r] + z[r]) + (w.vb2[r] + tmp[r]);
  kKernels.gates(z, c_prev, H, h_out, c_out);
}

// Scratch for a whole forward: per layer a trace (4M + 4H) and the new h and c (2H), plus
// one 4H temporary shared by the layers.
size_t trace_floats(const Net& n) {
  return static_cast<size_t>(n.layers * (4 * n.mid + 6 * n.hidden) + 4 * n.hidden);
}
float* tmp_at(float* base, const Net& n) { return base + n.layers * (4 * n.mid + 6 * n.hidden); }

CellTrace trace_at(float* base, const Net& n, int64_t l) {
  float* p = base + l * (4 * n.mid + 6 * n.hidden);
  return CellTrace{p, p + n.mid, p + 2 * n.mid, p + 3 * n.mid, p + 4 * n.mid};
}
float* h_new_at(float* base, const Net& n, int64_t l) {
  return base + l * (4 * n.mid + 6 * n.hidden) + 4 * n.mid + 4 * n.hidden;
}
float* c_new_at(float* base, const Net& n, int64_t l) { return h_new_at(base, n, l) + n.hidden; }

// Full forward; returns p (before sigmoid: *logit).
float net_forward(const Net& n, float x0, const float* h, const float* c, float* scratch, float* logit) {
  const float* x = &x0;
  for (int64_t l = 0; l < n.layers; ++l) {
    float* hn = h_new_at(scratch, n, l);
    cell_forward(n.cells[l], n.hidden, n.mid, x, h + l * n.hidden, c + l * n.hidden, trace_at(scratch, n, l),
                 tmp_at(scratch, n), hn, c_new_at(scratch, n, l));
    x = hn;
  }
  *logit = n.head_b[0] + dot(n.head_w, x, n.hidden);
  return sigmoid(*logit);
}

float* thread_scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace

// Declared in mlrsnet_cpu.h (the Python fast path calls it directly).
Tensor mlrsnet_step_cpu(const Tensor& loss, const Tensor& h, const Tensor& c, TensorList weights, const Tensor& gamma,
                        const Tensor& rate, TensorList lrs, at::ArrayRef<double> scales) {
  const char* op = "mlrsnet_step_";
  const Net net = check_net(op, h, c, weights);
  // zip(lrs, scales) like dispatch.write_rates: the scheduler passes no lr tensors (but its
  // scales) when the optimizer keeps float lrs; an lr tensor without a scale is an error.
  TORCH_CHECK(lrs.size() <= scales.size(), op, ": got ", lrs.size(), " lr tensors but only ", scales.size(),
              " scales; pass one scale per param group");
  check_writable(op, "rate", rate);
  for (const Tensor& lr : lrs) check_writable(op, "lrs[k]", lr);
  // the writes below go through raw pointers: bump the version counters as the reference's
  // in-place ops do, so autograd sees the change (and an inference tensor is refused, outside
  // InferenceMode, before anything is written)
  for (const Tensor* t : {&h, &c, &rate}) bump_version(*t);
  for (const Tensor& lr : lrs) bump_version(lr);
  const double x_loss = static_cast<double>(static_cast<float>(read_scalar(op, "loss", loss)));
  const float g = static_cast<float>(read_scalar(op, "gamma", gamma));
  double new_rate = read_scalar(op, "rate", rate);
  Tensor ok_t = at::empty({}, h.options().dtype(at::kBool));
  bool ok = std::isfinite(x_loss);
  if (ok) {
    const float x0 = x_loss > 0.0 ? static_cast<float>(x_loss) : 0.f;
    float* scratch = thread_scratch(trace_floats(net));
    float logit;
    const float p = net_forward(net, x0, h.const_data_ptr<float>(), c.const_data_ptr<float>(), scratch, &logit);
    float r = g * p;
    r = r < 0.f ? 0.f : r;  // NaN stays NaN (and is caught below)
    r = r > g ? g : r;
    ok = std::isfinite(r);
    if (ok) {
      float* hp = h.mutable_data_ptr<float>();
      float* cp = c.mutable_data_ptr<float>();
      for (int64_t l = 0; l < net.layers; ++l) {
        const float* hn = h_new_at(scratch, net, l);
        const float* cn = c_new_at(scratch, net, l);
        for (int64_t j = 0; j < net.hidden; ++j) {
          hp[l * net.hidden + j] = hn[j];
          cp[l * net.hidden + j] = cn[j];
        }
      }
      write_scalar(op, "rate", rate, r);
      new_rate = read_scalar(op, "rate", rate);  // as stored (rounded to rate's dtype)
    }
  }
  for (size_t k = 0; k < lrs.size(); ++k) {
    if (scales[k] == 1.0) {
      write_scalar(op, "lrs[k]", lrs[k], new_rate);
    } else if (rate.scalar_type() == at::kFloat) {
      write_scalar(op, "lrs[k]", lrs[k], static_cast<float>(new_rate) * static_cast<float>(scales[k]));
    } else {
      write_scalar(op, "lrs[k]", lrs[k], new_rate * scales[k]);
    }
  }
  *ok_t.mutable_data_ptr<bool>() = ok;
  return ok_t;
}

namespace {

// grad_p * dp/dtheta for every weight (state constant, raw loss as input, like the reference).
std::vector<Tensor> mlrsnet_param_grads_cpu(const Tensor& loss, const Tensor& h, const Tensor& c, TensorList weights,
                                            const Tensor& grad_p) {
  const char* op = "mlrsnet_param_grads";
  const Net net = check_net(op, h, c, weights);
  const int64_t H = net.hidden, M = net.mid;
  const float x0 = static_cast<float>(read_scalar(op, "loss", loss));
  const float gp = static_cast<float>(read_scalar(op, "grad_p", grad_p));
  std::vector<float> scratch(trace_floats(net));
  const float* hp = h.const_data_ptr<float>();
  const float* cp = c.const_data_ptr<float>();
  float logit;
  const float p = net_forward(net, x0, hp, cp, scratch.data(), &logit);

  std::vector<Tensor> out;
  out.reserve(weights.size());
  for (const auto& w : weights) out.push_back(at::empty(w.sizes(), w.options()));
  auto gptr = [&](size_t i) { return out[i].mutable_data_ptr<float>(); };

  // Head: p = sigmoid(head_w . x_L + head_b).
  const float dlogit = gp * p * (1.f - p);
  const float* xL = h_new_at(scratch.data(), net, net.layers - 1);
  float* ghw = gptr(weights.size() - 2);
  for (int64_t j = 0; j < H; ++j) ghw[j] = dlogit * xL[j];
  gptr(weights.size() - 1)[0] = dlogit;

  std::vector<float> dh(H), dz(4 * H), dpre1(M), dpre2(M), dx(H);
  for (int64_t j = 0; j < H; ++j) dh[j] = dlogit * net.head_w[j];
  for (int64_t l = net.layers - 1; l >= 0; --l) {
    const CellWeights& w = net.cells[l];
    const CellTrace tr = trace_at(scratch.data(), net, l);
    const float* cn = c_new_at(scratch.data(), net, l);
    const float* c_prev = cp + l * H;
    const float* gate = tr.gates;
    for (int64_t j = 0; j < H; ++j) {
      const float i = gate[j], f = gate[H + j], o = gate[2 * H + j], g = gate[3 * H + j];
      const float tc = std::tanh(cn[j]);
      const float dc = dh[j] * o * (1.f - tc * tc);
      dz[j] = dc * g * i * (1.f - i);
      dz[H + j] = dc * c_prev[j] * f * (1.f - f);
      dz[2 * H + j] = dh[j] * tc * o * (1.f - o);
      dz[3 * H + j] = dc * i * (1.f - g * g);
    }
    float* gw0 = gptr(kWeightsPerCell * l + 0);
    float* gb0 = gptr(kWeightsPerCell * l + 1);
    float* gw2 = gptr(kWeightsPerCell * l + 2);
    float* gb2 = gptr(kWeightsPerCell * l + 3);
    float* gv0 = gptr(kWeightsPerCell * l + 4);
    float* gvb0 = gptr(kWeightsPerCell * l + 5);
    float* gv2 = gptr(kWeightsPerCell * l + 6);
    float* gvb2 = gptr(kWeightsPerCell * l + 7);
    for (int64_t m = 0; m < M; ++m) dpre1[m] = dpre2[m] = 0.f;
    for (int64_t r = 0; r < 4 * H; ++r) {
      const float d = dz[r];
      gb2[r] = d;
      gvb2[r] = d;
      const float* w2r = w.w2 + r * M;
      const float* v2r = w.v2 + r * M;
      for (int64_t m = 0; m < M; ++m) {
        gw2[r * M + m] = d * tr.a1[m];
        gv2[r * M + m] = d * tr.a2[m];
        dpre1[m] += w2r[m] * d;
        dpre2[m] += v2r[m] * d;
      }
    }
    const float* x = l == 0 ? &x0 : h_new_at(scratch.data(), net, l - 1);
    const float* h_prev = hp + l * H;
    for (int64_t k = 0; k < w.in; ++k) dx[k] = 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const float d1 = tr.pre1[m] > 0.f ? dpre1[m] : 0.f;
      const float d2 = tr.pre2[m] > 0.f ? dpre2[m] : 0.f;
      gb0[m] = d1;
      gvb0[m] = d2;
      for (int64_t k = 0; k < w.in; ++k) {
        gw0[m * w.in + k] = d1 * x[k];
        dx[k] += w.w0[m * w.in + k] * d1;
      }
      for (int64_t k = 0; k < H; ++k) gv0[m * H + k] = d2 * h_prev[k];
    }
    if (l > 0)
      for (int64_t k = 0; k < H; ++k) dh[k] = dx[k];
  }
  return out;
}

}  // namespace
}  // namespace autolr_fast

namespace autolr_fast {

// Declared in mlrsnet_cpu.h: reference.count_step_ on host memory.
void check_counters_cpu(const Tensor& counters) {
  TORCH_CHECK(counters.numel() == 2 && counters.scalar_type() == at::kLong && counters.device().is_cpu() &&
                  counters.is_contiguous(),
              "mlrsnet_step_: counters must be a contiguous int64 CPU tensor of 2 elements");
}

void count_step_cpu(const Tensor& loss, bool stepped, const Tensor& counters) {
  check_counters_cpu(counters);
  const double x = static_cast<float>(read_scalar("mlrsnet_step_", "loss", loss));  // as the step reads it
  bump_version(counters);
  int64_t* v = counters.mutable_data_ptr<int64_t>();
  v[0] += stepped ? 0 : 1;
  v[1] += (std::isfinite(x) && x < 0.0) ? 1 : 0;
}

namespace {

// The op's schema (autolr_fast/ops/library.py): writes `ok` and, if given, bumps the int64
// counters [skipped, negative] like reference.count_step_.
void mlrsnet_step_op_cpu(const Tensor& loss, const Tensor& h, const Tensor& c, TensorList weights,
                         const Tensor& gamma, const Tensor& rate, TensorList lrs, at::ArrayRef<double> scales,
                         const Tensor& ok, const std::optional<Tensor>& counters) {
  // the outputs are checked first: a bad ok or counters must leave the state as it was
  TORCH_CHECK(ok.numel() == 1 && ok.scalar_type() == at::kBool && ok.device().is_cpu(),
              "mlrsnet_step_: ok must be a 1-element bool CPU tensor");
  if (counters.has_value()) check_counters_cpu(*counters);
  const bool stepped = *mlrsnet_step_cpu(loss, h, c, weights, gamma, rate, lrs, scales).const_data_ptr<bool>();
  bump_version(ok);
  *ok.mutable_data_ptr<bool>() = stepped;
  if (counters.has_value()) count_step_cpu(loss, stepped, *counters);
}

}  // namespace
}  // namespace autolr_fast

// The schemas are defined once, in Python (autolr_fast/ops/library.py), beside their fake kernels.
TORCH_LIBRARY_IMPL(autolr_fast, CPU, m) {
  m.impl("mlrsnet_step_", &autolr_fast::mlrsnet_step_op_cpu);
  m.impl("mlrsnet_param_grads", &autolr_fast::mlrsnet_param_grads_cpu);
}

// The controller step is not differentiable (it runs under no_grad in the reference branch)
// and mlrsnet_param_grads *is* a backward: skip the autograd layer entirely, which also
// saves the generic autograd fallback's per-call bookkeeping (a few us on this small op).
TORCH_LIBRARY_IMPL(autolr_fast, Autograd, m) {
  m.impl("mlrsnet_step_", torch::CppFunction::makeFallthrough());
  m.impl("mlrsnet_param_grads", torch::CppFunction::makeFallthrough());
}
