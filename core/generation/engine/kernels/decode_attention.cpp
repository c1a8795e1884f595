// kobot::decode_attention: one query per (row, head) over that row's sequence's keys where
// they lie in the engine's KV arena, float32 accumulation. Registered as a torch operator
// (torch.ops.kobot.decode_attention); built by kernels/build.py.
//
// Decode attention is bound by reading the keys and values. Torch's bf16 batched matmuls read
// them at a fraction of the memory bandwidth, and only from one dense padded tensor, which the
// engine had to keep as a copy of the arena (a decode pool). This kernel reads each sequence's
// own keys once for the scores and its values once for the sum, in place. A prompt chunk's
// tokens are rows too (each over the keys up to its own position: causal), so one call per
// layer serves a whole step; their keys and values are in the arena already (the engine
// writes them first), while the leading `new_rows` (decoding tokens) write theirs here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

template <typename T>
void scores_generic(const float* q, const T* k, int64_t n, int64_t dim, float* out) {
  for (int64_t l = 0; l < n; ++l) {
    const T* row = k + l * dim;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < dim; ++i) acc += q[i] * to_float(row[i]);
    out[l] = acc;
  }
}

template <typename T>
void weighted_sum_generic(const float* p, const T* v, int64_t n, int64_t dim, float* out) {
  std::fill(out, out + dim, 0.f);
  for (int64_t l = 0; l < n; ++l) {
    const T* row = v + l * dim;
    const float a = p[l];
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) out[i] += a * to_float(row[i]);
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

// head_dim 64 (GPT-2's): the query and the sum live in four registers each. Keys and values
// are rows of `dim` contiguous values (the arena's [capacity, head_dim] per head).
template <int Hint, typename T>
inline void prefetch_row(const T* row) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (size_t line = 0; line < 64 * sizeof(T); line += 64) {
    _mm_prefetch(bytes + line, static_cast<_mm_hint>(Hint));
  }
}

template <typename T>
void scores64(const float* q, const T* k, int64_t n, float* out, const T* values_next) {
  const __m512 q0 = load16(q), q1 = load16(q + 16), q2 = load16(q + 32), q3 = load16(q + 48);
  for (int64_t l = 0; l < n; ++l) {
    const T* row = k + l * 64;
    if (l + PREFETCH_ROWS < n) prefetch_row<_MM_HINT_T0>(row + PREFETCH_ROWS * 64);
    prefetch_row<_MM_HINT_T1>(values_next + l * 64);
    __m512 s = _mm512_mul_ps(q0, load16(row));
    s = _mm512_fmadd_ps(q1, load16(row + 16), s);
    s = _mm512_fmadd_ps(q2, load16(row + 32), s);
    s = _mm512_fmadd_ps(q3, load16(row + 48), s);
    out[l] = _mm512_reduce_add_ps(s);
  }
}

template <typename T>
void weighted_sum64(const float* p, const T* v, int64_t n, float* out, const T* next_k,
                    int64_t next_n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t l = 0; l < n; ++l) {
    const T* row = v + l * 64;
    if (l + PREFETCH_ROWS < n) prefetch_row<_MM_HINT_T0>(row + PREFETCH_ROWS * 64);
    if (l < next_n) prefetch_row<_MM_HINT_T1>(next_k + l * 64);
    const __m512 w = _mm512_set1_ps(p[l]);
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

template <typename T>
void scores(const float* q, const T* k, int64_t n, int64_t dim, float* out,
            const T* values_next) {
#if defined(__AVX512F__)
  if (dim == 64) return scores64(q, k, n, out, values_next);
#endif
  scores_generic(q, k, n, dim, out);
}

template <typename T>
void weighted_sum(const float* p, const T* v, int64_t n, int64_t dim, float* out,
                  const T* next_k, int64_t next_n) {
#if defined(__AVX512F__)
  if (dim == 64) return weighted_sum64(p, v, n, out, next_k, next_n);
#endif
  weighted_sum_generic(p, v, n, dim, out);
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

template <typename T>
void attend(const at::Tensor& qkv, at::Tensor& buffer, const int64_t* key_offsets,
            const int64_t* value_offsets, const int64_t* head_strides, const int64_t* lengths,
            float scale, int64_t new_rows, at::Tensor& out) {
  const int64_t heads = qkv.size(2), dim = qkv.size(3);
  const int64_t row_stride = qkv.stride(0), part_stride = qkv.stride(1);
  const int64_t head_stride = qkv.stride(2);
  const T* qkv_base = qkv.data_ptr<T>();
  T* kv = buffer.data_ptr<T>();
  T* o_base = out.data_ptr<T>();
  const auto keys_of = [&](int64_t row) {
    return kv + key_offsets[row / heads] + (row % heads) * head_strides[row / heads];
  };
  const auto values_of = [&](int64_t row) {
    return kv + value_offsets[row / heads] + (row % heads) * head_strides[row / heads];
  };
  at::parallel_for(0, qkv.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(dim), sum(dim), p;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = lengths[row / heads];
      const T* q_row = qkv_base + (row / heads) * row_stride + (row % heads) * head_stride;
      T* keys = keys_of(row);
      T* values = values_of(row);
      if (row / heads < new_rows) {  // its key and value go to position n - 1 first
        std::copy(q_row + part_stride, q_row + part_stride + dim, keys + (n - 1) * dim);
        std::copy(q_row + 2 * part_stride, q_row + 2 * part_stride + dim,
                  values + (n - 1) * dim);
      }
      for (int64_t i = 0; i < dim; ++i) q[i] = to_float(q_row[i]) * scale;
      p.resize(n);
      scores(q.data(), keys, n, dim, p.data(), values);
      const float inverse = softmax_unnormalized(p.data(), n);
      const bool last = row + 1 == end;
      weighted_sum(p.data(), values, n, dim, sum.data(), last ? values : keys_of(row + 1),
                   last ? 0 : lengths[(row + 1) / heads]);
      T* o_row = o_base + row * dim;
      for (int64_t i = 0; i < dim; ++i) o_row[i] = static_cast<T>(sum[i] * inverse);
    }
  });
}

const int64_t* int64_data(const at::Tensor& t, int64_t rows, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == 1,
              "decode_attention: ", name, " must be a contiguous int64 vector");
  TORCH_CHECK(t.numel() == rows, "decode_attention: one entry of ", name, " per query row");
  return t.data_ptr<int64_t>();
}

// qkv [B, 3, H, D] (each row of D contiguous): the new token's query, key and value of each
// sequence b. Row b's keys for head h are `lengths[b]` rows of D contiguous values at
// buffer[key_offsets[b] + h * head_strides[b]], its values likewise from value_offsets[b]: the
// engine's KV arena blocks [n_layer, 2, H, capacity, D], read in place. Rows b < new_rows
// write their key and value at position lengths[b] - 1 first (the others' are there: rows of
// one sequence's prompt read each other's). Returns [B, H, D] in qkv's dtype.
at::Tensor decode_attention(const at::Tensor& qkv, at::Tensor buffer,
                            const at::Tensor& key_offsets, const at::Tensor& value_offsets,
                            const at::Tensor& head_strides, const at::Tensor& lengths,
                            double scale, int64_t new_rows) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(1) == 3 && qkv.stride(3) == 1,
              "decode_attention: qkv must be [B, 3, H, D] with rows of D contiguous values");
  TORCH_CHECK(buffer.is_contiguous(), "decode_attention: the KV buffer must be contiguous");
  TORCH_CHECK(buffer.scalar_type() == qkv.scalar_type(),
              "decode_attention: qkv and KV buffer must share a dtype");
  const int64_t rows = qkv.size(0), heads = qkv.size(2), dim = qkv.size(3);
  const int64_t* k = int64_data(key_offsets, rows, "key_offsets");
  const int64_t* v = int64_data(value_offsets, rows, "value_offsets");
  const int64_t* stride = int64_data(head_strides, rows, "head_strides");
  const int64_t* n = int64_data(lengths, rows, "lengths");
  TORCH_CHECK(0 <= new_rows && new_rows <= rows, "decode_attention: new_rows out of range");
  const int64_t size = buffer.numel();
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(n[b] >= 1 && stride[b] >= n[b] * dim, "decode_attention: length out of range");
    const int64_t span = (heads - 1) * stride[b] + n[b] * dim;
    TORCH_CHECK(k[b] >= 0 && v[b] >= 0 && k[b] + span <= size && v[b] + span <= size,
                "decode_attention: keys or values outside the KV buffer");
  }
  at::Tensor out = at::empty({rows, heads, dim}, qkv.options());
  const float scale_f = static_cast<float>(scale);
  if (qkv.scalar_type() == at::kFloat) {
    attend<float>(qkv, buffer, k, v, stride, n, scale_f, new_rows, out);
  } else if (qkv.scalar_type() == at::kBFloat16) {
    attend<c10::BFloat16>(qkv, buffer, k, v, stride, n, scale_f, new_rows, out);
  } else {
    TORCH_CHECK(false, "decode_attention: float32 or bfloat16 only");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kobot, m) {
  m.def(
      "decode_attention(Tensor qkv, Tensor(a!) buffer, Tensor key_offsets, Tensor value_offsets, "
      "Tensor head_strides, Tensor lengths, float scale, int new_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(kobot, CPU, m) { m.impl("decode_attention", &decode_attention); }
