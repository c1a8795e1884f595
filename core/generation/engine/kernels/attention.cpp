// kobot::attention: one query per (row, head) over that row's sequence's keys where
// they lie in the engine's KV arena, float32 accumulation. Registered as a torch operator
// (torch.ops.kobot.attention); built by kernels/build.py.
//
// Attention is bound by reading the keys and values. Torch's bf16 batched matmuls read them at
// a fraction of the memory bandwidth, and only from one dense padded tensor, which the engine
// had to keep as a copy of the arena (a decode pool). This kernel reads each sequence's own
// keys once for the scores and its values once for the sum, in place. Every token of a step is
// a row (a decoding token, or one of a prompt chunk's, each over the keys up to its own
// position: causal), so one call per layer serves the whole step: first every row writes its
// key and value, then every row attends.
//
// The arena holds the model's dtype, or int8 rows: a key or value of D values as D int8 (per
// row, symmetric: x ~ q * scale) followed by its float32 scale, half the bytes to read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// exp(x) for x <= 0 (Cephes' expf polynomial, relative error ~1e-7), written so that the
// compiler vectorizes a loop of it; below -87 it gives 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// A stored key or value row: the model's dtype T (D values), or int8 rows (D int8 values and
// their float32 scale: D + 4 bytes).
template <typename T>
struct Plain {
  using Elem = T;
  static int64_t width(int64_t dim) { return dim; }
  static float value(const T* row, int64_t i) { return to_float(row[i]); }
  static float scale(const T*, int64_t) { return 1.0f; }
  template <typename Source>
  static void write(const Source* source, T* row, int64_t dim) {
    std::copy(source, source + dim, row);
  }
};

struct Int8Rows {
  using Elem = uint8_t;
  static constexpr float STEPS = 127.0f;
  static int64_t width(int64_t dim) { return dim + static_cast<int64_t>(sizeof(float)); }
  static float value(const uint8_t* row, int64_t i) {
    return static_cast<float>(static_cast<int8_t>(row[i]));
  }
  static float scale(const uint8_t* row, int64_t dim) {
    float s;
    std::memcpy(&s, row + dim, sizeof(s));
    return s;
  }
  // Quantized per row: round(x * 127 / max |x|), to nearest, ties to even.
  template <typename Source>
  static void write(const Source* source, uint8_t* row, int64_t dim);
};

template <class Store>
void scores_generic(const float* q, const typename Store::Elem* k, int64_t n, int64_t dim,
                    float* out) {
  const int64_t width = Store::width(dim);
  for (int64_t l = 0; l < n; ++l) {
    const auto* row = k + l * width;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < dim; ++i) acc += q[i] * Store::value(row, i);
    out[l] = acc * Store::scale(row, dim);
  }
}

template <class Store>
void weighted_sum_generic(const float* p, const typename Store::Elem* v, int64_t n,
                          int64_t dim, float* out) {
  const int64_t width = Store::width(dim);
  std::fill(out, out + dim, 0.f);
  for (int64_t l = 0; l < n; ++l) {
    const auto* row = v + l * width;
    const float a = p[l] * Store::scale(row, dim);
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) out[i] += a * Store::value(row, i);
  }
}

#if defined(__AVX512F__)
// Each (sequence, head) reads two short streams (~n x 128 bytes), too short for the hardware
// prefetcher to ramp up; from DRAM the kernel ran at half the bandwidth it now reaches.
// Prefetched: keys and values PREFETCH_ROWS ahead into L1, the values into L2 while the scores
// are computed, and the next row's keys into L2 while the values are summed.
constexpr int64_t PREFETCH_ROWS = 8;
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const uint8_t* p) {  // int8 rows
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}

// head_dim 64 (GPT-2's): the query and the sum live in four registers each. Keys and values
// are rows of `Store::width(64)` elements (the arena's [capacity, width] per head).
template <int Hint, class Store>
inline void prefetch_row(const typename Store::Elem* row) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = Store::width(64) * static_cast<int64_t>(sizeof(*row));
  for (int64_t line = 0; line < size; line += 64) {
    _mm_prefetch(bytes + line, static_cast<_mm_hint>(Hint));
  }
}

template <class Store>
void scores64(const float* q, const typename Store::Elem* k, int64_t n, float* out,
              const typename Store::Elem* values_next) {
  constexpr int64_t dim = 64;
  const int64_t width = Store::width(dim);
  const __m512 q0 = load16(q), q1 = load16(q + 16), q2 = load16(q + 32), q3 = load16(q + 48);
  for (int64_t l = 0; l < n; ++l) {
    const auto* row = k + l * width;
    if (l + PREFETCH_ROWS < n) prefetch_row<_MM_HINT_T0, Store>(row + PREFETCH_ROWS * width);
    prefetch_row<_MM_HINT_T1, Store>(values_next + l * width);
    __m512 s = _mm512_mul_ps(q0, load16(row));
    s = _mm512_fmadd_ps(q1, load16(row + 16), s);
    s = _mm512_fmadd_ps(q2, load16(row + 32), s);
    s = _mm512_fmadd_ps(q3, load16(row + 48), s);
    out[l] = _mm512_reduce_add_ps(s) * Store::scale(row, dim);
  }
}

template <class Store>
void weighted_sum64(const float* p, const typename Store::Elem* v, int64_t n, float* out,
                    const typename Store::Elem* next_k, int64_t next_n) {
  constexpr int64_t dim = 64;
  const int64_t width = Store::width(dim);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t l = 0; l < n; ++l) {
    const auto* row = v + l * width;
    if (l + PREFETCH_ROWS < n) prefetch_row<_MM_HINT_T0, Store>(row + PREFETCH_ROWS * width);
    if (l < next_n) prefetch_row<_MM_HINT_T1, Store>(next_k + l * width);
    const __m512 w = _mm512_set1_ps(p[l] * Store::scale(row, dim));
    a0 = _mm512_fmadd_ps(w, load16(row), a0);
    a1 = _mm512_fmadd_ps(w, load16(row + 16), a1);
    a2 = _mm512_fmadd_ps(w, load16(row + 32), a2);
    a3 = _mm512_fmadd_ps(w, load16(row + 48), a3);
  }
  _mm512_storeu_ps(out, a0);
  _mm512_storeu_ps(out + 16, a1);
  _mm512_storeu_ps(out + 32, a2);
  _mm512_storeu_ps(out + 48, a3);
}
#endif

template <typename Source>
void Int8Rows::write(const Source* source, uint8_t* row, int64_t dim) {
#if defined(__AVX512F__)
  if (dim == 64) {
    const __m512 x[4] = {load16(source), load16(source + 16), load16(source + 32),
                         load16(source + 48)};
    __m512 peak = _mm512_abs_ps(x[0]);
    for (int i = 1; i < 4; ++i) peak = _mm512_max_ps(peak, _mm512_abs_ps(x[i]));
    const float top = _mm512_reduce_max_ps(peak);
    const __m512 inverse = _mm512_set1_ps(top > 0.f ? STEPS / top : 0.f);
    for (int i = 0; i < 4; ++i) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(x[i], inverse));  // nearest, even
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 16 * i), _mm512_cvtsepi32_epi8(q));
    }
    const float s = top / STEPS;
    std::memcpy(row + dim, &s, sizeof(s));
    return;
  }
#endif
  float peak = 0.f;
  for (int64_t i = 0; i < dim; ++i) peak = std::max(peak, std::fabs(to_float(source[i])));
  const float inverse = peak > 0.f ? STEPS / peak : 0.f;
  for (int64_t i = 0; i < dim; ++i) {
    const float q = std::nearbyint(to_float(source[i]) * inverse);
    row[i] = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(q, -STEPS, STEPS)));
  }
  const float s = peak / STEPS;
  std::memcpy(row + dim, &s, sizeof(s));
}

template <class Store>
void scores(const float* q, const typename Store::Elem* k, int64_t n, int64_t dim, float* out,
            const typename Store::Elem* values_next) {
#if defined(__AVX512F__)
  if (dim == 64) return scores64<Store>(q, k, n, out, values_next);
#endif
  scores_generic<Store>(q, k, n, dim, out);
}

template <class Store>
void weighted_sum(const float* p, const typename Store::Elem* v, int64_t n, int64_t dim,
                  float* out, const typename Store::Elem* next_k, int64_t next_n) {
#if defined(__AVX512F__)
  if (dim == 64) return weighted_sum64<Store>(p, v, n, out, next_k, next_n);
#endif
  weighted_sum_generic<Store>(p, v, n, dim, out);
}

// softmax of p[0, n) in place; returns 1 / its sum.
inline float softmax_unnormalized(float* p, int64_t n) {
  float top = p[0];
  for (int64_t l = 1; l < n; ++l) top = std::max(top, p[l]);
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t l = 0; l < n; ++l) {
    p[l] = exp_nonpositive(p[l] - top);
    total += p[l];
  }
  return 1.0f / total;
}

// Where row r (of rows x heads: token r / heads, head r % heads) finds its keys and values.
template <class Store>
struct Blocks {
  typename Store::Elem* kv;
  const int64_t* key_offsets;
  const int64_t* value_offsets;
  const int64_t* head_strides;
  int64_t heads;
  typename Store::Elem* keys(int64_t r) const {
    return kv + key_offsets[r / heads] + (r % heads) * head_strides[r / heads];
  }
  typename Store::Elem* values(int64_t r) const {
    return kv + value_offsets[r / heads] + (r % heads) * head_strides[r / heads];
  }
};

template <typename T, class Store>
void attend(const at::Tensor& qkv, const Blocks<Store>& blocks, const int64_t* lengths,
            float scale, at::Tensor& out) {
  const int64_t heads = qkv.size(2), dim = qkv.size(3), width = Store::width(dim);
  const int64_t row_stride = qkv.stride(0), part_stride = qkv.stride(1);
  const int64_t head_stride = qkv.stride(2);
  const T* qkv_base = qkv.data_ptr<T>();
  T* o_base = out.data_ptr<T>();
  const int64_t rows = qkv.size(0) * heads;
  const auto source = [&](int64_t r) {
    return qkv_base + (r / heads) * row_stride + (r % heads) * head_stride;
  };
  // Every row's new key and value at position n - 1, before any row reads (a prompt's rows
  // read each other's).
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t at = (lengths[r / heads] - 1) * width;
      Store::write(source(r) + part_stride, blocks.keys(r) + at, dim);
      Store::write(source(r) + 2 * part_stride, blocks.values(r) + at, dim);
    }
  });
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(dim), sum(dim), p;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = lengths[r / heads];
      const T* q_row = source(r);
      const auto* keys = blocks.keys(r);
      const auto* values = blocks.values(r);
      for (int64_t i = 0; i < dim; ++i) q[i] = to_float(q_row[i]) * scale;
      p.resize(n);
      scores<Store>(q.data(), keys, n, dim, p.data(), values);
      const float inverse = softmax_unnormalized(p.data(), n);
      const bool last = r + 1 == end;
      weighted_sum<Store>(p.data(), values, n, dim, sum.data(),
                          last ? values : blocks.keys(r + 1),
                          last ? 0 : lengths[(r + 1) / heads]);
      T* o_row = o_base + r * dim;
      for (int64_t i = 0; i < dim; ++i) o_row[i] = static_cast<T>(sum[i] * inverse);
    }
  });
}

template <typename T>
void attend_in(const at::Tensor& qkv, at::Tensor& buffer, const int64_t* key_offsets,
               const int64_t* value_offsets, const int64_t* head_strides,
               const int64_t* lengths, float scale, at::Tensor& out) {
  const int64_t heads = qkv.size(2);
  if (buffer.scalar_type() == at::kByte) {
    const Blocks<Int8Rows> blocks{buffer.data_ptr<uint8_t>(), key_offsets, value_offsets,
                                  head_strides, heads};
    attend<T, Int8Rows>(qkv, blocks, lengths, scale, out);
  } else {
    const Blocks<Plain<T>> blocks{buffer.data_ptr<T>(), key_offsets, value_offsets,
                                  head_strides, heads};
    attend<T, Plain<T>>(qkv, blocks, lengths, scale, out);
  }
}

const int64_t* int64_data(const at::Tensor& t, int64_t rows, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == 1,
              "attention: ", name, " must be a contiguous int64 vector");
  TORCH_CHECK(t.numel() == rows, "attention: one entry of ", name, " per query row");
  return t.data_ptr<int64_t>();
}

// qkv [B, 3, H, D] (each row of D contiguous): each token's query, key and value. Row b's keys
// for head h are `lengths[b]` rows at buffer[key_offsets[b] + h * head_strides[b]], its values
// likewise from value_offsets[b]: the engine's KV arena blocks [n_layer, 2, H, capacity, W],
// read in place, where a row is W = D elements of qkv's dtype, or (a uint8 buffer) W = D + 4
// bytes: D int8 values and their float32 scale. Every row first writes its key and value at
// position lengths[b] - 1, then attends over positions [0, lengths[b]). Returns [B, H, D] in
// qkv's dtype.
at::Tensor attention(const at::Tensor& qkv, at::Tensor buffer,
                            const at::Tensor& key_offsets, const at::Tensor& value_offsets,
                            const at::Tensor& head_strides, const at::Tensor& lengths,
                            double scale) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(1) == 3 && qkv.stride(3) == 1,
              "attention: qkv must be [B, 3, H, D] with rows of D contiguous values");
  TORCH_CHECK(buffer.is_contiguous(), "attention: the KV buffer must be contiguous");
  const bool int8_rows = buffer.scalar_type() == at::kByte;
  TORCH_CHECK(int8_rows || buffer.scalar_type() == qkv.scalar_type(),
              "attention: the KV buffer must be qkv's dtype, or uint8 (int8 rows)");
  const int64_t rows = qkv.size(0), heads = qkv.size(2), dim = qkv.size(3);
  const int64_t width = int8_rows ? Int8Rows::width(dim) : dim;
  const int64_t* k = int64_data(key_offsets, rows, "key_offsets");
  const int64_t* v = int64_data(value_offsets, rows, "value_offsets");
  const int64_t* stride = int64_data(head_strides, rows, "head_strides");
  const int64_t* n = int64_data(lengths, rows, "lengths");
  const int64_t size = buffer.numel();
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(n[b] >= 1 && stride[b] >= n[b] * width, "attention: length out of range");
    const int64_t span = (heads - 1) * stride[b] + n[b] * width;
    TORCH_CHECK(k[b] >= 0 && v[b] >= 0 && k[b] + span <= size && v[b] + span <= size,
                "attention: keys or values outside the KV buffer");
  }
  at::Tensor out = at::empty({rows, heads, dim}, qkv.options());
  const float scale_f = static_cast<float>(scale);
  if (qkv.scalar_type() == at::kFloat) {
    attend_in<float>(qkv, buffer, k, v, stride, n, scale_f, out);
  } else if (qkv.scalar_type() == at::kBFloat16) {
    attend_in<c10::BFloat16>(qkv, buffer, k, v, stride, n, scale_f, out);
  } else {
    TORCH_CHECK(false, "attention: float32 or bfloat16 only");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kobot, m) {
  m.def(
      "attention(Tensor qkv, Tensor(a!) buffer, Tensor key_offsets, Tensor value_offsets, "
      "Tensor head_strides, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kobot, CPU, m) { m.impl("attention", &attention); }
