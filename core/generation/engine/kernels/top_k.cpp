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
#include <cmath>
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

// --- kobot::sample: the sampler's whole choice for a batch on a CPU ------------------------

// Per-row settings and inputs of `sample`.
struct SampleInputs {
  float* logits;
  int64_t vocab;
  const int64_t* seen;                 // distinct ids seen by each row, rows one after another
  c10::ArrayRef<int64_t> seen_offsets;  // [rows + 1]
  c10::ArrayRef<double> penalty;
  c10::ArrayRef<int64_t> banned;  // ids banned in each row (n-gram bans, early EOS)
  c10::ArrayRef<int64_t> banned_offsets;  // [rows + 1]
  c10::ArrayRef<int64_t> top_k;  // > 0 sample from the top k, 0 argmax, < 0 leave the row
  c10::ArrayRef<double> temperature;
  c10::ArrayRef<double> top_p;
  c10::ArrayRef<double> uniform;  // each sampled row's draw in [0, 1)
};

// Repetition penalty on the seen ids (negative scores times it, others divided), then -inf on
// the banned ones.
void penalize(float* row, const SampleInputs& in, int64_t r) {
  const float penalty = static_cast<float>(in.penalty[r]);
  if (penalty != 1.0f) {
    for (int64_t i = in.seen_offsets[r]; i < in.seen_offsets[r + 1]; ++i) {
      float& score = row[in.seen[i]];
      score = score < 0.0f ? score * penalty : score / penalty;
    }
  }
  for (int64_t i = in.banned_offsets[r]; i < in.banned_offsets[r + 1]; ++i) {
    row[in.banned[i]] = -INFINITY;
  }
}

// The first id of the largest score (NaN largest), as torch.argmax.
int64_t argmax(const float* row, int64_t n) {
  int64_t best = 0;
  int32_t best_key = order_key(row[0]);
  for (int64_t i = 1; i < n; ++i) {
    const int32_t key = order_key(row[i]);
    if (key > best_key) {
      best_key = key;
      best = i;
    }
  }
  return best;
}

// Every score at least the k-th best (ties at the k-th all kept), best first, lower id first
// among equals: Hugging Face's top-k set, in the order kobot::top_k gives it.
void top_k_set(const float* row, int64_t n, int64_t k, std::vector<int32_t>& maxima,
               std::vector<uint64_t>& found) {
  collect_at_least(row, n, floor_key(row, n, k, maxima), found);
  std::nth_element(found.begin(), found.begin() + (k - 1), found.end(), std::greater<>());
  const uint64_t kth_key = found[static_cast<size_t>(k - 1)] & 0xFFFFFFFF00000000ull;
  const auto below = std::partition(found.begin(), found.end(),
                                    [&](uint64_t c) { return c >= kth_key; });
  found.erase(below, found.end());
  std::sort(found.begin(), found.end(), std::greater<>());
}

// Softmax of `values` (descending, finite first) into `out`, as torch computes it: exp of
// each minus the first, over their float sum.
void softmax_desc(const std::vector<float>& values, size_t count, std::vector<float>& out) {
  out.resize(count);
  float sum = 0.0f;
  for (size_t i = 0; i < count; ++i) {
    out[i] = std::exp(values[i] - values[0]);
    sum += out[i];
  }
  for (size_t i = 0; i < count; ++i) out[i] /= sum;
}

// How many of the descending `values` top-p keeps (Hugging Face: drop the tokens whose
// cumulative probability from the least likely up stays at most 1 - top_p; the best is kept).
size_t top_p_kept(const std::vector<float>& values, float top_p, std::vector<float>& probs) {
  const size_t count = values.size();
  if (top_p >= 1.0f) return count;
  softmax_desc(values, count, probs);
  const float threshold = 1.0f - top_p;
  double cumulative = 0.0;
  size_t removed = 0;
  for (size_t i = count; i-- > 1;) {
    cumulative += probs[i];
    if (static_cast<float>(cumulative) > threshold) break;
    ++removed;
  }
  return count - removed;
}

// The draw: the first candidate whose cumulative probability passes uniform * total (never
// one of probability 0).
size_t draw_column(const std::vector<float>& probs, double uniform) {
  double total = 0.0;
  size_t positive = 0;
  for (float p : probs) {
    total += p;
    positive += p > 0.0f;
  }
  const double target = uniform * total;
  double cumulative = 0.0;
  size_t column = probs.size();
  for (size_t i = 0; i < probs.size(); ++i) {
    cumulative += probs[i];
    if (cumulative > target) {
      column = i;
      break;
    }
  }
  return std::min(column, positive == 0 ? size_t{0} : positive - 1);
}

int64_t sample_top_k(const float* row, const SampleInputs& in, int64_t r,
                     std::vector<int32_t>& maxima, std::vector<uint64_t>& found,
                     std::vector<float>& values, std::vector<float>& probs) {
  top_k_set(row, in.vocab, std::min(in.top_k[r], in.vocab), maxima, found);
  values.resize(found.size());
  for (size_t i = 0; i < found.size(); ++i) {
    values[i] = row[index_of(found[i])] / static_cast<float>(in.temperature[r]);
  }
  values.resize(top_p_kept(values, static_cast<float>(in.top_p[r]), probs));
  softmax_desc(values, values.size(), probs);
  return index_of(found[draw_column(probs, in.uniform[r])]);
}

// Ragged ids (`offsets` [rows + 1] into `count` ids, each in the vocab), checked.
void check_ragged(c10::ArrayRef<int64_t> offsets, const int64_t* ids, int64_t count,
                  int64_t rows, int64_t vocab, const char* what) {
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == rows + 1 && offsets[0] == 0 &&
                  offsets[rows] == count,
              "sample: ", what, " offsets must be rows + 1 bounds from 0 to their count");
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(offsets[r] <= offsets[r + 1], "sample: ", what, " offsets must not decrease");
  }
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < vocab, "sample: ", what, " ids must be in the vocab");
  }
}

// logits [rows, vocab] float32, penalized and banned in place; each row's token (-1 for a row
// whose top_k is negative: the caller draws it).
std::vector<int64_t> sample(at::Tensor& logits, const at::Tensor& seen_in,
                            c10::ArrayRef<int64_t> seen_offsets, c10::ArrayRef<double> penalty,
                            c10::ArrayRef<int64_t> banned, c10::ArrayRef<int64_t> banned_offsets,
                            c10::ArrayRef<int64_t> top_k, c10::ArrayRef<double> temperature,
                            c10::ArrayRef<double> top_p, c10::ArrayRef<double> uniform) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "sample: logits must be a contiguous float32 [rows, vocab] tensor");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1 && vocab <= INT32_MAX, "sample: 1 to 2^31 - 1 scores a row");
  TORCH_CHECK(seen_in.dim() == 1 && seen_in.scalar_type() == at::kLong,
              "sample: seen must be an int64 vector");
  const at::Tensor seen = seen_in.contiguous();
  check_ragged(seen_offsets, seen.data_ptr<int64_t>(), seen.size(0), rows, vocab, "seen");
  check_ragged(banned_offsets, banned.data(), static_cast<int64_t>(banned.size()), rows, vocab,
               "banned");
  for (const auto settings : {penalty.size(), top_k.size(), temperature.size(), top_p.size(),
                              uniform.size()}) {
    TORCH_CHECK(static_cast<int64_t>(settings) == rows,
                "sample: penalty, top_k, temperature, top_p and uniform need one value a row");
  }
  const SampleInputs in{logits.data_ptr<float>(), vocab, seen.data_ptr<int64_t>(), seen_offsets,
                        penalty, banned, banned_offsets, top_k, temperature, top_p, uniform};
  std::vector<int64_t> tokens(static_cast<size_t>(rows));
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> maxima;
    std::vector<uint64_t> found;
    std::vector<float> values, probs;
    for (int64_t r = begin; r < end; ++r) {
      float* row = in.logits + r * vocab;
      penalize(row, in, r);
      int64_t& token = tokens[static_cast<size_t>(r)];
      if (in.top_k[r] < 0) {
        token = -1;
      } else if (in.top_k[r] == 0) {
        token = argmax(row, vocab);
      } else {
        token = sample_top_k(row, in, r, maxima, found, values, probs);
      }
    }
  });
  return tokens;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kobot, m) {
  m.def("top_k(Tensor scores, int k) -> (Tensor values, Tensor indices)");
  m.def(
      "sample(Tensor(a!) logits, Tensor seen, int[] seen_offsets, float[] penalty, "
      "int[] banned, int[] banned_offsets, int[] top_k, float[] temperature, float[] top_p, "
      "float[] uniform) -> int[]");
}

TORCH_LIBRARY_IMPL(kobot, CPU, m) {
  m.impl("top_k", &top_k);
  m.impl("sample", &sample);
}
