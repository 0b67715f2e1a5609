// Multi-tensor apply (in the spirit of apex's multi_tensor_apply, written for this project).
//
// Tensors are cut into fixed chunks of kChunk elements (chunk_table.h). The chunk table and the
// data pointers travel BY VALUE in the kernel arguments (up to ~30 KB, CUDA >= 12.1), read in
// place through __grid_constant__: no device buffer, no host-to-device copy, so a launch can be
// captured in a CUDA graph and replayed. One launch covers up to ChunkTable<Depth>::kCapacity
// tensors (several hundred; apex's 4 KB tables hold a few dozen); longer lists take one launch
// per table. Blocks walk the chunks grid-stride. A chunk's global index depends only on the
// tensor sizes, never on the split or the grid, so reductions that combine per-chunk partials
// in chunk order are deterministic.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <vector>

#include "chunk_table.h"

namespace autolr_fast {
namespace mta {

constexpr int kBlock = 512;  // threads per block

template <int Depth>
struct TensorChunk {
  int64_t chunk;       // global chunk index (also the slot of a per-chunk partial)
  int64_t begin, end;  // element range inside the tensor
  int64_t tensor;      // tensor index in the launch's table
  void* ptr[Depth];    // data pointers (nullptr for an absent optional tensor)
};

template <int Depth, typename Op>
__global__ void __launch_bounds__(kBlock) multi_tensor_kernel(const __grid_constant__ ChunkTable<Depth> table, Op op) {
  for (int64_t c = blockIdx.x; c < table.nchunks; c += gridDim.x) {
    const ChunkSpan s = locate(table, c);
    TensorChunk<Depth> tc;
    tc.chunk = s.chunk;
    tc.tensor = s.tensor;
    tc.begin = s.begin;
    tc.end = s.end;
#pragma unroll
    for (int d = 0; d < Depth; ++d) tc.ptr[d] = table.ptr[s.tensor][d];
    op(tc);
  }
}

// Host side: the lists as Depth pointers per tensor plus numels, all on CUDA device
// `device_index`, launched on its current stream. Returns the number of chunks (0: nothing
// launched), the size a per-chunk partials buffer needs.
template <int Depth, typename Op>
int64_t launch(const std::vector<std::array<const void*, Depth>>& ptrs, const std::vector<int64_t>& numels,
               c10::DeviceIndex device_index, const Op& op) {
  static_assert(sizeof(ChunkTable<Depth>) + sizeof(Op) <= kMaxKernelParamBytes,
                "the chunk table and the op's arguments exceed CUDA's kernel parameter limit");
  const auto tables = plan_launches<Depth>(ptrs, numels);
  if (tables.empty()) return 0;
  int sms = 0;  // an attribute query: no stream work, fine during graph capture
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index));
  auto stream = c10::cuda::getCurrentCUDAStream(device_index);
  int64_t total = 0;
  for (const auto& table : tables) {
    const int64_t grid = std::min<int64_t>(table.nchunks, int64_t{sms} * 4);
    multi_tensor_kernel<Depth, Op><<<static_cast<unsigned>(grid), kBlock, 0, stream.stream()>>>(table, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    total += table.nchunks;
  }
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
