// The chunk table of the multi-tensor launcher: which tensors, and which slice of each, a
// block works on. Plain C++ (no CUDA, no torch), so that the host planning and the lookup the
// kernel does are compiled and checked on machines without a GPU too
// (csrc/ops/tests/chunk_table_test.cpp).
//
// Every tensor is cut into fixed chunks of kChunk elements. A launch gets one ChunkTable BY
// VALUE as a kernel argument (no device buffer, no host-to-device copy): the launch can be
// captured in a CUDA graph and replayed. The table holds up to Capacity tensors; a longer list
// is split into several launches by tensor, each with `chunk_base`, the global index of its
// first chunk. A chunk's global index depends only on the tensor sizes, never on the split or
// on the grid, so per-chunk partial sums combined in chunk order are deterministic.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#define AUTOLR_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AUTOLR_FAST_HOST_DEVICE inline
#endif

namespace autolr_fast {
namespace mta {

constexpr int64_t kChunk = 16384;  // elements per chunk (one block iteration)

// CUDA >= 12.1 takes kernel parameters up to 32764 bytes on Volta and newer (every GPU a CUDA 13
// build of torch runs on); the table keeps ~2 KB of that for the per-op arguments.
constexpr std::size_t kMaxKernelParamBytes = 32764;
constexpr std::size_t kTableBytes = 30 * 1024;

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

template <int Depth>
struct ChunkTable {
  static constexpr int kCapacity =
      static_cast<int>((kTableBytes - 5 * sizeof(int64_t)) / (2 * sizeof(int64_t) + Depth * sizeof(void*)));

  int64_t first_tensor;                 // list index of this launch's tensor 0
  int64_t ntensors;                     // tensors in this launch
  int64_t nchunks;                      // chunks in this launch
  int64_t chunk_base;                   // global index of this launch's first chunk
  int64_t first_chunk[kCapacity + 1];   // local chunk where tensor t starts; [ntensors] == nchunks
  int64_t numel[kCapacity];
  void* ptr[kCapacity][Depth];          // nullptr for an absent optional tensor
};

// One chunk as a block sees it: elements [begin, end) of tensor `tensor`; `chunk` is the global
// chunk index (the slot of a per-chunk partial).
struct ChunkSpan {
  int64_t tensor, begin, end, chunk;
};

// The span of local chunk c (0 <= c < table.nchunks): the last tensor whose first chunk is <= c
// (tensors without elements own no chunk, so they are never picked).
template <int Depth>
AUTOLR_FAST_HOST_DEVICE ChunkSpan locate(const ChunkTable<Depth>& table, int64_t c) {
  int64_t lo = 0, hi = table.ntensors - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (table.first_chunk[mid] <= c) lo = mid; else hi = mid - 1;
  }
  ChunkSpan s;
  s.tensor = lo;
  s.begin = (c - table.first_chunk[lo]) * kChunk;
  const int64_t end = s.begin + kChunk;
  s.end = table.numel[lo] < end ? table.numel[lo] : end;
  s.chunk = table.chunk_base + c;
  return s;
}

// The launches for a list of tensors (Depth pointers each): tables of at most `capacity` tensors,
// in list order (index t of a table is tensor `first_tensor + t` of the list); a group of
// tensors that owns no element gives no table.
template <int Depth>
std::vector<ChunkTable<Depth>> plan_launches(const std::vector<std::array<const void*, Depth>>& ptrs,
                                             const std::vector<int64_t>& numels,
                                             int capacity = ChunkTable<Depth>::kCapacity) {
  if (ptrs.size() != numels.size())
    throw std::invalid_argument("plan_launches: " + std::to_string(ptrs.size()) + " pointer rows for " +
                                std::to_string(numels.size()) + " tensors");
  if (capacity < 1 || capacity > ChunkTable<Depth>::kCapacity)
    throw std::invalid_argument("plan_launches: capacity " + std::to_string(capacity) + " outside [1, " +
                                std::to_string(ChunkTable<Depth>::kCapacity) + "]");
  std::vector<ChunkTable<Depth>> tables;
  int64_t base = 0;
  const int64_t n = static_cast<int64_t>(numels.size());
  for (int64_t start = 0; start < n; start += capacity) {
    const int64_t stop = start + capacity < n ? start + capacity : n;
    ChunkTable<Depth> table{};
    table.first_tensor = start;
    table.ntensors = stop - start;
    table.chunk_base = base;
    int64_t local = 0;
    for (int64_t t = start; t < stop; ++t) {
      if (numels[t] < 0) throw std::invalid_argument("plan_launches: negative numel");
      const int64_t i = t - start;
      table.first_chunk[i] = local;
      table.numel[i] = numels[t];
      for (int d = 0; d < Depth; ++d) table.ptr[i][d] = const_cast<void*>(ptrs[t][d]);
      local += chunks_of(numels[t]);
    }
    table.first_chunk[table.ntensors] = local;
    table.nchunks = local;
    base += local;
    if (local > 0) tables.push_back(table);
  }
  return tables;
}

}  // namespace mta
}  // namespace autolr_fast
