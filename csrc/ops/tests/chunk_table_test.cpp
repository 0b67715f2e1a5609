// Host check of the CUDA launcher's chunk tables (csrc/ops/chunk_table.h), run by
// tests/test_cpp_ops.py on machines without a GPU: for random tensor lists (empty tensors,
// chunk-boundary sizes, lists longer than a table holds) and several table capacities, walking
// every local chunk of every launch with the kernel's own lookup must
//   * cover every element of every tensor exactly once, in order, with that tensor's pointers;
//   * give every chunk the same global index whatever the split (deterministic partial sums);
//   * number the global chunks 0 .. total-1 with no gap.
// Usage: chunk_table_test SEED  (prints "ok <cases>" and exits 0, or the first failure and exits 1)
#include "../chunk_table.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <utility>

namespace mta = autolr_fast::mta;

namespace {

int failures = 0;

void fail(const std::string& what) {
  if (failures++ == 0) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

template <int Depth>
std::vector<std::array<const void*, Depth>> fake_pointers(size_t n) {
  std::vector<std::array<const void*, Depth>> ptrs(n);
  for (size_t t = 0; t < n; ++t)
    for (int d = 0; d < Depth; ++d)  // distinct fake addresses; every third optional slot absent
      ptrs[t][d] = (d == Depth - 1 && t % 3 == 0) ? nullptr
                                                   : reinterpret_cast<const void*>(0x1000 * (t + 1) + 8 * d);
  return ptrs;
}

// (tensor, begin) -> global chunk, over a whole plan; checks coverage on the way.
template <int Depth>
std::map<std::pair<int64_t, int64_t>, int64_t> walk(const std::vector<mta::ChunkTable<Depth>>& tables,
                                                    const std::vector<std::array<const void*, Depth>>& ptrs,
                                                    const std::vector<int64_t>& numels, const std::string& where) {
  std::map<std::pair<int64_t, int64_t>, int64_t> chunk_of;
  std::vector<int64_t> covered(numels.size(), 0);  // elements covered so far, per tensor (in order)
  int64_t expected_base = 0, last_first_tensor = -1;
  for (const auto& table : tables) {
    if (table.chunk_base != expected_base) fail(where + ": chunk_base not the running chunk count");
    if (table.first_tensor <= last_first_tensor) fail(where + ": tables out of list order");
    last_first_tensor = table.first_tensor;
    if (table.nchunks <= 0) fail(where + ": a table with no chunk was launched");
    if (table.first_chunk[table.ntensors] != table.nchunks) fail(where + ": first_chunk[ntensors] != nchunks");
    for (int64_t c = 0; c < table.nchunks; ++c) {
      const mta::ChunkSpan s = mta::locate(table, c);
      if (s.tensor < 0 || s.tensor >= table.ntensors) {
        fail(where + ": chunk points outside the table");
        continue;
      }
      const int64_t t = table.first_tensor + s.tensor;
      if (s.begin != covered[t] || s.end <= s.begin || s.end - s.begin > mta::kChunk || s.end > numels[t])
        fail(where + ": tensor " + std::to_string(t) + " chunk [" + std::to_string(s.begin) + ", " +
             std::to_string(s.end) + ") after " + std::to_string(covered[t]) + " of " + std::to_string(numels[t]));
      covered[t] = s.end;
      for (int d = 0; d < Depth; ++d)
        if (table.ptr[s.tensor][d] != ptrs[t][d]) fail(where + ": wrong pointer for tensor " + std::to_string(t));
      if (!chunk_of.emplace(std::make_pair(t, s.begin), s.chunk).second) fail(where + ": a slice was visited twice");
    }
    expected_base += table.nchunks;
  }
  for (size_t t = 0; t < numels.size(); ++t)
    if (covered[t] != numels[t])
      fail(where + ": tensor " + std::to_string(t) + " covered " + std::to_string(covered[t]) + " of " +
           std::to_string(numels[t]));
  int64_t next = 0;  // global indices 0..total-1 in list order
  for (const auto& kv : chunk_of)
    if (kv.second != next++) fail(where + ": global chunk indices not 0..total-1 in list order");
  return chunk_of;
}

template <int Depth>
int check_lists(std::mt19937_64& rng) {
  const int64_t K = mta::kChunk;
  const std::vector<int64_t> edge = {0, 1, 7, K - 1, K, K + 1, 2 * K, 3 * K - 5};
  int cases = 0;
  const int cap = mta::ChunkTable<Depth>::kCapacity;
  for (size_t n : {size_t(1), size_t(2), size_t(5), size_t(17), size_t(cap), size_t(cap + 1), size_t(2 * cap + 3)}) {
    std::vector<int64_t> numels(n);
    for (auto& v : numels) {
      const auto r = rng() % 4;
      v = r == 0 ? edge[rng() % edge.size()] : r == 1 ? int64_t(rng() % 64) : int64_t(rng() % (5 * K));
    }
    if (n > 3) numels[n - 1] = 0;  // a trailing empty tensor
    const auto ptrs = fake_pointers<Depth>(n);
    const std::string base_where = "Depth " + std::to_string(Depth) + ", " + std::to_string(n) + " tensors";
    const auto whole = walk<Depth>(mta::plan_launches<Depth>(ptrs, numels), ptrs, numels, base_where);
    for (int capacity : {1, 2, 3, 7, cap}) {
      const std::string where = base_where + ", capacity " + std::to_string(capacity);
      const auto tables = mta::plan_launches<Depth>(ptrs, numels, capacity);
      for (const auto& table : tables)
        if (table.ntensors > capacity) fail(where + ": table over capacity");
      if (walk<Depth>(tables, ptrs, numels, where) != whole) fail(where + ": global chunks depend on the split");
      ++cases;
    }
  }
  // an all-empty list launches nothing; bad arguments are refused
  if (!mta::plan_launches<Depth>(fake_pointers<Depth>(4), {0, 0, 0, 0}).empty()) fail("empty tensors launched");
  bool refused = false;
  try {
    mta::plan_launches<Depth>(fake_pointers<Depth>(2), {1, 2}, cap + 1);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  if (!refused) fail("a capacity over the table's was accepted");
  static_assert(sizeof(mta::ChunkTable<Depth>) <= mta::kTableBytes, "table over its byte budget");
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937_64 rng(argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 0);
  int cases = 0;
  for (int round = 0; round < 3; ++round)
    cases += check_lists<2>(rng) + check_lists<3>(rng) + check_lists<4>(rng) + check_lists<6>(rng);
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("ok %d\n", cases);
  return 0;
}
