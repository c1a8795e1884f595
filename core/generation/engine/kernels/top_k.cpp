// kobot::top_k: each row's k best float32 scores, in descending order (ties: the lower token
// id first; NaN above everything, as torch.topk orders it), with their token ids. Registered as
// a torch operator (torch.ops.kobot.top_k); built by kernels/build.py.
//
// Rows of any layout are read contiguous (a copy only where they are not). The sampler needs
// the ~100 best of 51,200 logits per row. torch.topk copies every row into a
// scratch buffer of (value, index) pairs before selecting. This kernel makes two vector passes
// over the row: the maxima of k chunks (their smallest is at most the k-th best score), then
// the few scores at least that smallest maximum, of which it sorts the k best. Scores are
// compared as integers ordered like the floats (NaN largest; -0.0 just below +0.0).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// An int32 ordered as the float it holds: larger float, larger key; every NaN above +inf.
inline int32_t order_key(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const int32_t key = bits ^ ((bits >> 31) & 0x7FFFFFFF);
  return (bits & 0x7FFFFFFF) > 0x7F800000 ? INT32_MAX : key;
}

// One candidate as a uint64 whose order is the result's: higher key first, then lower index.
inline uint64_t candidate(int32_t key, int64_t index) {
  const uint64_t high = static_cast<uint32_t>(key) ^ 0x80000000u;
  return (high << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

inline int64_t index_of(uint64_t c) { return 0xFFFFFFFFu - (c & 0xFFFFFFFFu); }

int32_t max_key(const float* row, int64_t n) {
  int32_t top = INT32_MIN;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, order_key(row[i]));
  return top;
}

void collect_from(const float* row, int64_t begin, int64_t n, int32_t floor,
                  std::vector<uint64_t>& out) {
  for (int64_t i = begin; i < n; ++i) {
    const int32_t key = order_key(row[i]);
    if (key >= floor) out.push_back(candidate(key, i));
  }
}

#if defined(__AVX512F__)
constexpr int64_t LANES = 16;

inline __m512i order_keys(const float* row) {
  const __m512 values = _mm512_loadu_ps(row);
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i magnitude =
      _mm512_and_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(0x7FFFFFFF));
  const __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(_mm512_xor_si512(bits, magnitude), nan,
                               _mm512_set1_epi32(INT32_MAX));
}
#endif

int32_t chunk_max(const float* row, int64_t n) {
#if defined(__AVX512F__)
  if (n % LANES == 0) {
    __m512i top = _mm512_set1_epi32(INT32_MIN);
    for (int64_t i = 0; i < n; i += LANES) top = _mm512_max_epi32(top, order_keys(row + i));
    return _mm512_reduce_max_epi32(top);
  }
#endif
  return max_key(row, n);
}

// The k-th largest of the maxima of at least k chunks: at most the row's k-th best key. The
// chunks are at most n / k long (whole vectors where that is one or more).
int32_t floor_key(const float* row, int64_t n, int64_t k, std::vector<int32_t>& maxima) {
  int64_t size = n / k;
#if defined(__AVX512F__)
  if (size >= LANES) size = size / LANES * LANES;
#endif
  maxima.clear();
  for (int64_t begin = 0; begin < n; begin += size) {
    maxima.push_back(chunk_max(row + begin, std::min(size, n - begin)));
  }
  std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), std::greater<>());
  return maxima[static_cast<size_t>(k - 1)];
}

void collect_at_least(const float* row, int64_t n, int32_t floor, std::vector<uint64_t>& out) {
  out.clear();
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512i bound = _mm512_set1_epi32(floor);
  for (; i + LANES <= n; i += LANES) {
    const __m512i keys = order_keys(row + i);
    __mmask16 hits = _mm512_cmpge_epi32_mask(keys, bound);
    if (!hits) continue;
    alignas(64) int32_t lanes[LANES];
    _mm512_store_si512(lanes, keys);
    while (hits) {
      const int lane = __builtin_ctz(hits);
      hits &= static_cast<__mmask16>(hits - 1);
      out.push_back(candidate(lanes[lane], i + lane));
    }
  }
#endif
  collect_from(row, i, n, floor, out);
}

std::tuple<at::Tensor, at::Tensor> top_k(const at::Tensor& input, int64_t k) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kFloat,
              "top_k: scores must be float32 [rows, vocab]");
  const at::Tensor scores = input.contiguous();
  const int64_t rows = scores.size(0), vocab = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= vocab, "top_k: k must be in [1, vocab]");
  TORCH_CHECK(vocab <= INT32_MAX, "top_k: at most 2^31 - 1 scores a row");
  at::Tensor values = at::empty({rows, k}, scores.options());
  at::Tensor indices = at::empty({rows, k}, scores.options().dtype(at::kLong));
  const float* in = scores.data_ptr<float>();
  float* out_values = values.data_ptr<float>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> maxima;
    std::vector<uint64_t> found;
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * vocab;
      collect_at_least(row, vocab, floor_key(row, vocab, k, maxima), found);
      std::nth_element(found.begin(), found.begin() + (k - 1), found.end(), std::greater<>());
      std::sort(found.begin(), found.begin() + k, std::greater<>());
      for (int64_t j = 0; j < k; ++j) {
        const int64_t index = index_of(found[static_cast<size_t>(j)]);
        out_values[r * k + j] = row[index];
        out_indices[r * k + j] = index;
      }
    }
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kobot, m) {
  m.def("top_k(Tensor scores, int k) -> (Tensor values, Tensor indices)");
}

TORCH_LIBRARY_IMPL(kobot, CPU, m) { m.impl("top_k", &top_k); }
