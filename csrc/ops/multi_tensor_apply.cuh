// One-launch multi-tensor apply (in the spirit of apex's multi_tensor_apply, written for this
// project).
//
// Every tensor of the lists is cut into fixed chunks of kChunk elements; the chunk -> (tensor,
// offset) table and the Depth data pointers per tensor go to the device as ONE small metadata
// buffer (one pinned host -> device copy on the current stream), so a single kernel launch
// covers any number of tensors (apex keeps the table in the kernel arguments, which caps the
// tensors per launch and needs several launches for big models). Blocks walk the chunks
// grid-stride. The chunk grid depends only on the tensor sizes, never on the launch
// configuration, so reductions that combine per-chunk partials in chunk order are
// deterministic.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <vector>

namespace autolr_fast {
namespace mta {

constexpr int64_t kChunk = 16384;  // elements per chunk (per block iteration)
constexpr int kBlock = 512;        // threads per block

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Device layout of the metadata (int64): chunk_start[n + 1], numel[n], ptr[n * Depth].
template <int Depth>
struct TensorChunk {
  int64_t chunk;       // global chunk index (also the slot of a per-chunk partial)
  int64_t begin, end;  // element range inside the tensor
  int64_t tensor;      // tensor index in the lists
  void* ptr[Depth];    // data pointers (nullptr for an absent optional tensor)
};

template <int Depth, typename Op>
__global__ void __launch_bounds__(kBlock) multi_tensor_kernel(const int64_t* __restrict__ meta, int64_t ntensors,
                                                              int64_t nchunks, Op op) {
  const int64_t* chunk_start = meta;
  const int64_t* numel = meta + ntensors + 1;
  const int64_t* ptrs = numel + ntensors;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    // the last tensor whose first chunk is <= c (tensors without elements own no chunk)
    int64_t lo = 0, hi = ntensors - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) >> 1;
      if (chunk_start[mid] <= c) lo = mid; else hi = mid - 1;
    }
    TensorChunk<Depth> tc;
    tc.chunk = c;
    tc.tensor = lo;
    tc.begin = (c - chunk_start[lo]) * kChunk;
    tc.end = min(numel[lo], tc.begin + kChunk);
#pragma unroll
    for (int d = 0; d < Depth; ++d) tc.ptr[d] = reinterpret_cast<void*>(ptrs[lo * Depth + d]);
    op(tc);
  }
}

// Host side: the lists as Depth pointers per tensor plus numels. Returns the number of chunks
// (0: nothing launched). `device_index` is the CUDA device of all tensors.
template <int Depth, typename Op>
int64_t launch(const std::vector<std::array<const void*, Depth>>& ptrs, const std::vector<int64_t>& numels,
               c10::DeviceIndex device_index, const Op& op) {
  const int64_t n = static_cast<int64_t>(numels.size());
  at::Tensor host = at::empty({(n + 1) + n + n * Depth}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.mutable_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) {
    h[t] = total;
    total += chunks_of(numels[t]);
    h[n + 1 + t] = numels[t];
    for (int d = 0; d < Depth; ++d) h[2 * n + 1 + t * Depth + d] = reinterpret_cast<int64_t>(ptrs[t][d]);
  }
  h[n] = total;
  if (total == 0) return 0;
  at::Tensor meta = at::empty({host.numel()}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, device_index));
  meta.copy_(host, /*non_blocking=*/true);  // the caching host allocator keeps `host` alive until the copy ran
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index));
  const int64_t grid = std::min<int64_t>(total, static_cast<int64_t>(sms) * 4);
  auto stream = c10::cuda::getCurrentCUDAStream(device_index);
  multi_tensor_kernel<Depth, Op><<<static_cast<unsigned>(grid), kBlock, 0, stream.stream()>>>(
      meta.const_data_ptr<int64_t>(), n, total, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return total;
}

// Deterministic block sum (fixed tree); the result is valid in thread 0. All threads call it.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double s[kBlock];
  s[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int w = kBlock / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  const double r = s[0];
  __syncthreads();  // s is reused by the next chunk of this block
  return r;
}

// Second pass: out = float(sum of partials in a fixed order), one block.
__global__ void __launch_bounds__(kBlock) finalize_sum_kernel(const double* __restrict__ partials, int64_t n,
                                                              float* __restrict__ out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kBlock) acc += partials[i];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) *out = static_cast<float>(total);
}

}  // namespace mta
}  // namespace autolr_fast
