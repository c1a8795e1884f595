// kobot::dense: the engine's bf16 linear layers on a CPU with AVX-512 BF16; kobot::dense_int8:
// the same layers on int8 weights with VNNI (KOBOT_ENGINE_QUANT=int8).
//
// y = epilogue(x @ W) for x [M, K] bf16 and W prepacked in panels of 32 output columns:
// panels [N / 32, K / 2, 32, 2] bf16, where panels[p][kp][c][j] = W[2 kp + j][32 p + c] (the
// layout `vdpbf16ps` reads: each 64-byte row of a panel holds one pair of k for 32 columns).
// The epilogue runs on the float32 accumulators: + bias, then tanh-GELU (optional), then
// + residual (optional, bf16), then rounding to bf16 (or float32 out, for the LM head).
//
// Each thread takes a range of panels. A panel (48 KB at K = 768) is read from memory once,
// by the first tile of up to 12 rows, which also prefetches the panel after next into L2; the
// other row tiles read it from cache. That prefetch is the point: at decode shapes (a few dozen rows)
// the weights stream from memory once per step, and oneDNN's kernels left this CPU's memory
// idle while they computed (768 x 3072 at 32 rows: 0.55 ms there, 0.42 ms here; at 1 row 0.29
// against 0.15).
//
// dense_int8: W quantized per output column (int8, symmetric: W ~ q * scale[n]) in panels
// [N / 32, K / 4, 32, 4] int8, panels[p][kq][c][j] = q[4 kq + j][32 p + c] (what `vpdpbusd`
// reads: four k for each of 16 columns in one register). Each call quantizes x per row,
// symmetric, to 127 steps and stores it offset by 128 as unsigned bytes (vpdpbusd multiplies
// unsigned by signed bytes); the offset comes back out through `offsets[n]` = 128 * sum_k q[k][n].
// So y[m][n] = (acc - offsets[n]) * x_scale[m] * scale[n], then the same epilogue. Four
// products per byte lane instead of two per bf16 pair: twice the multiply-adds an instruction,
// half the bytes a weight.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t PANEL = 32;
constexpr int MAX_ROWS = 12;
constexpr int64_t AHEAD = 2;  // panels: 2 measured 5-15% faster than 1 at 1 and 32 rows

struct Epilogue {
  const float* bias;          // [N] or null
  const uint16_t* residual;   // [M, N] bf16 bits or null
  bool gelu;
  void* out;                  // [M, N], bf16 bits or float
  bool fp32_out;
  int64_t n;                  // row stride of residual and out
};

#if defined(__AVX512F__)
#define KOBOT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// e^y on float32 lanes: y = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
// (relative error ~2e-8), scaled by 2^n (vscalefps: no overflow into garbage).
KOBOT_BF16 inline __m512 exp_ps(__m512 y) {
  y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), y);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// GPT-2's tanh-GELU: x / 2 (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), with
// 1 + tanh(u) = 2 - 2 / (e^(2u) + 1).
KOBOT_BF16 inline __m512 gelu_ps(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f),
                                 _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x));
  const __m512 e = exp_ps(_mm512_add_ps(u, u));
  const __m512 two = _mm512_set1_ps(2.0f);
  const __m512 one_plus_tanh = _mm512_sub_ps(two, _mm512_div_ps(two, _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), one_plus_tanh);
}

KOBOT_BF16 inline __m512 bf16_to_ps(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

KOBOT_BF16 inline void finish(__m512 v, int64_t row, int64_t col, const Epilogue& e) {
  if (e.bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(e.bias + col));
  if (e.gelu) v = gelu_ps(v);
  if (e.residual != nullptr) v = _mm512_add_ps(v, bf16_to_ps(e.residual + row * e.n + col));
  if (e.fp32_out) {
    _mm512_storeu_ps(static_cast<float*>(e.out) + row * e.n + col, v);
  } else {
    const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(v);
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(static_cast<uint16_t*>(e.out) + row * e.n + col), rounded);
  }
}

// Rows [row, row + R) of x times one panel (columns [col, col + 32)); with `next`, a later
// panel's `next_bytes` are prefetched into L2 along the way.
template <int R>
KOBOT_BF16 void tile(const uint16_t* x, int64_t k, const uint16_t* panel, const char* next,
                     int64_t next_bytes, int64_t row, int64_t col, const Epilogue& e) {
  __m512 low[R], high[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    low[r] = _mm512_setzero_ps();
    high[r] = _mm512_setzero_ps();
  }
  const int64_t pairs = k / 2;
  const int64_t lines_per_pair = next == nullptr ? 0 : (next_bytes / 64 + pairs - 1) / pairs;
  int64_t fetched = 0;
  const uint16_t* rows = x + row * k;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const __m512bh w_low = (__m512bh)_mm512_loadu_si512(panel + kp * 64);
    const __m512bh w_high = (__m512bh)_mm512_loadu_si512(panel + kp * 64 + 32);
    for (int64_t i = 0; i < lines_per_pair && fetched < next_bytes; ++i, fetched += 64) {
      _mm_prefetch(next + fetched, _MM_HINT_T1);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, rows + r * k + 2 * kp, sizeof(pair));
      const __m512bh both = (__m512bh)_mm512_set1_epi32(pair);
      low[r] = _mm512_dpbf16_ps(low[r], both, w_low);
      high[r] = _mm512_dpbf16_ps(high[r], both, w_high);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    finish(low[r], row + r, col, e);
    finish(high[r], row + r, col + 16, e);
  }
}

using Tile = void (*)(const uint16_t*, int64_t, const uint16_t*, const char*, int64_t, int64_t,
                      int64_t, const Epilogue&);
constexpr Tile TILES[MAX_ROWS] = {tile<1>, tile<2>, tile<3>, tile<4>,  tile<5>,  tile<6>,
                                  tile<7>, tile<8>, tile<9>, tile<10>, tile<11>, tile<12>};

void run(const uint16_t* x, int64_t m, int64_t k, const uint16_t* panels, int64_t count,
         const Epilogue& e) {
  const int64_t panel_elements = (k / 2) * PANEL * 2;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const uint16_t* panel = panels + p * panel_elements;
      const char* next = p + AHEAD < end
                             ? reinterpret_cast<const char*>(panel + AHEAD * panel_elements)
                             : nullptr;
      for (int64_t row = 0; row < m; row += MAX_ROWS) {
        const int64_t rows = m - row < MAX_ROWS ? m - row : MAX_ROWS;
        TILES[rows - 1](x, k, panel, row == 0 ? next : nullptr, panel_elements * 2, row,
                        p * PANEL, e);
      }
    }
  });
}
#define KOBOT_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")))

constexpr int64_t QUAD_AHEAD = 4;  // int8 panels are half the bytes: prefetch further ahead

struct Quantized {
  const uint8_t* x;         // [M, K]: round(x / x_scale) + 128
  const float* x_scale;     // [M]
  const float* scale;       // [N]: the weight's column scales
  const int32_t* offsets;   // [N]: 128 * column sums of the int8 weight
};

// 16 bf16 values from p (only the first `count` read; the rest 0) as float32 lanes.
KOBOT_VNNI inline __m512 bf16_lanes(const uint16_t* p, int64_t count) {
  const __mmask16 mask = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// One row of x (bf16) to unsigned bytes and its scale: max |x| / 127 (1 for a zero row).
KOBOT_VNNI void quantize_row(const uint16_t* x, int64_t k, uint8_t* out, float* scale) {
  __m512 peak = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    peak = _mm512_max_ps(peak, _mm512_abs_ps(bf16_lanes(x + i, k - i)));
  }
  const float amax = _mm512_reduce_max_ps(peak);
  *scale = amax > 0.0f ? amax / 127.0f : 1.0f;
  const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t i = 0; i < k; i += 16) {
    const int64_t count = k - i < 16 ? k - i : 16;
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(bf16_lanes(x + i, count), inverse));
    const __mmask16 mask = count == 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    _mm512_mask_cvtusepi32_storeu_epi8(out + i, mask, _mm512_add_epi32(q, offset));
  }
}

template <int R>
KOBOT_VNNI void tile_int8(const Quantized& q, int64_t k, const int8_t* panel, const char* next,
                          int64_t next_bytes, int64_t row, int64_t col, const Epilogue& e) {
  __m512i low[R], high[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    low[r] = _mm512_setzero_si512();
    high[r] = _mm512_setzero_si512();
  }
  const int64_t quads = k / 4;
  const int64_t lines_per_quad = next == nullptr ? 0 : (next_bytes / 64 + quads - 1) / quads;
  int64_t fetched = 0;
  const uint8_t* rows = q.x + row * k;
  for (int64_t kq = 0; kq < quads; ++kq) {
    const __m512i w_low = _mm512_loadu_si512(panel + kq * 128);
    const __m512i w_high = _mm512_loadu_si512(panel + kq * 128 + 64);
    for (int64_t i = 0; i < lines_per_quad && fetched < next_bytes; ++i, fetched += 64) {
      _mm_prefetch(next + fetched, _MM_HINT_T1);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, rows + r * k + 4 * kq, sizeof(quad));
      const __m512i all = _mm512_set1_epi32(quad);
      low[r] = _mm512_dpbusd_epi32(low[r], all, w_low);
      high[r] = _mm512_dpbusd_epi32(high[r], all, w_high);
    }
  }
  const __m512 scale_low = _mm512_loadu_ps(q.scale + col);
  const __m512 scale_high = _mm512_loadu_ps(q.scale + col + 16);
  const __m512i offset_low = _mm512_loadu_si512(q.offsets + col);
  const __m512i offset_high = _mm512_loadu_si512(q.offsets + col + 16);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512 x_scale = _mm512_set1_ps(q.x_scale[row + r]);
    const __m512 v_low = _mm512_cvtepi32_ps(_mm512_sub_epi32(low[r], offset_low));
    const __m512 v_high = _mm512_cvtepi32_ps(_mm512_sub_epi32(high[r], offset_high));
    finish(_mm512_mul_ps(v_low, _mm512_mul_ps(scale_low, x_scale)), row + r, col, e);
    finish(_mm512_mul_ps(v_high, _mm512_mul_ps(scale_high, x_scale)), row + r, col + 16, e);
  }
}

using Int8Tile = void (*)(const Quantized&, int64_t, const int8_t*, const char*, int64_t,
                          int64_t, int64_t, const Epilogue&);
constexpr Int8Tile INT8_TILES[MAX_ROWS] = {
    tile_int8<1>, tile_int8<2>, tile_int8<3>, tile_int8<4>,  tile_int8<5>,  tile_int8<6>,
    tile_int8<7>, tile_int8<8>, tile_int8<9>, tile_int8<10>, tile_int8<11>, tile_int8<12>};

void run_int8(const Quantized& q, int64_t m, int64_t k, const int8_t* panels, int64_t count,
              const Epilogue& e) {
  const int64_t panel_bytes = (k / 4) * PANEL * 4;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int8_t* panel = panels + p * panel_bytes;
      const char* next = p + QUAD_AHEAD < end
                             ? reinterpret_cast<const char*>(panel + QUAD_AHEAD * panel_bytes)
                             : nullptr;
      for (int64_t row = 0; row < m; row += MAX_ROWS) {
        const int64_t rows = m - row < MAX_ROWS ? m - row : MAX_ROWS;
        INT8_TILES[rows - 1](q, k, panel, row == 0 ? next : nullptr, panel_bytes, row,
                             p * PANEL, e);
      }
    }
  });
}
#endif

bool supported() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool supported_vnni() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The epilogue's bias and residual, checked, and the output [M, N] it writes.
struct Output {
  Epilogue e;
  at::Tensor residual;
  at::Tensor out;
};

Output output_of(const char* op, const at::Tensor& x, int64_t n,
                 const c10::optional<at::Tensor>& bias,
                 const c10::optional<at::Tensor>& residual_in, bool gelu, bool fp32_out) {
  const int64_t m = x.size(0);
  Output o{Epilogue{nullptr, nullptr, gelu, nullptr, fp32_out, n}, at::Tensor(), at::Tensor()};
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous(),
                op, ": bias must be a contiguous float32 vector of ", n);
    o.e.bias = bias->data_ptr<float>();
  }
  if (residual_in.has_value()) {
    o.residual = residual_in->contiguous();
    TORCH_CHECK(o.residual.dim() == 2 && o.residual.size(0) == m && o.residual.size(1) == n &&
                    o.residual.scalar_type() == at::kBFloat16,
                op, ": residual must be a [M, N] bfloat16 matrix");
    o.e.residual = reinterpret_cast<const uint16_t*>(o.residual.data_ptr<at::BFloat16>());
  }
  o.out = at::empty({m, n}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
  o.e.out = o.out.data_ptr();
  return o;
}

at::Tensor checked_rows(const char* op, const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16,
              op, ": x must be a [M, K] bfloat16 matrix");
  return x_in.contiguous();
}

// x [M, K] bf16; panels [N / 32, K / 2, 32, 2] bf16; bias [N] float32 or none; residual
// [M, N] bf16 or none. Returns [M, N], bf16 (float32 with fp32_out).
at::Tensor dense(const at::Tensor& x_in, const at::Tensor& panels,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                 bool gelu, bool fp32_out) {
  TORCH_CHECK(supported(), "dense: this CPU (or this build) has no AVX-512 BF16");
  const at::Tensor x = checked_rows("dense", x_in);
  TORCH_CHECK(panels.dim() == 4 && panels.size(2) == PANEL && panels.size(3) == 2 &&
                  panels.scalar_type() == at::kBFloat16 && panels.is_contiguous(),
              "dense: panels must be a contiguous [N / 32, K / 2, 32, 2] bfloat16 tensor");
  const int64_t m = x.size(0), k = x.size(1), n = panels.size(0) * PANEL;
  TORCH_CHECK(panels.size(1) * 2 == k, "dense: x has ", k, " columns, the panels ",
              panels.size(1) * 2, " rows");
  Output o = output_of("dense", x, n, bias, residual, gelu, fp32_out);
  if (m == 0) return o.out;
#if defined(__AVX512F__)
  run(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), m, k,
      reinterpret_cast<const uint16_t*>(panels.data_ptr<at::BFloat16>()), panels.size(0), o.e);
#endif
  return o.out;
}

// x [M, K] bf16; panels [N / 32, K / 4, 32, 4] int8; scale [N] float32; offsets [N] int32;
// bias, residual and the result as for dense.
at::Tensor dense_int8(const at::Tensor& x_in, const at::Tensor& panels, const at::Tensor& scale,
                      const at::Tensor& offsets, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& residual, bool gelu, bool fp32_out) {
  TORCH_CHECK(supported_vnni(), "dense_int8: this CPU (or this build) has no AVX-512 VNNI");
  const at::Tensor x = checked_rows("dense_int8", x_in);
  TORCH_CHECK(panels.dim() == 4 && panels.size(2) == PANEL && panels.size(3) == 4 &&
                  panels.scalar_type() == at::kChar && panels.is_contiguous(),
              "dense_int8: panels must be a contiguous [N / 32, K / 4, 32, 4] int8 tensor");
  const int64_t m = x.size(0), k = x.size(1), n = panels.size(0) * PANEL;
  TORCH_CHECK(panels.size(1) * 4 == k, "dense_int8: x has ", k, " columns, the panels ",
              panels.size(1) * 4, " rows");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == n && scale.scalar_type() == at::kFloat &&
                  scale.is_contiguous(),
              "dense_int8: scale must be a contiguous float32 vector of ", n);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == n && offsets.scalar_type() == at::kInt &&
                  offsets.is_contiguous(),
              "dense_int8: offsets must be a contiguous int32 vector of ", n);
  Output o = output_of("dense_int8", x, n, bias, residual, gelu, fp32_out);
  if (m == 0) return o.out;
#if defined(__AVX512F__)
  at::Tensor quantized = at::empty({m, k}, x.options().dtype(at::kByte));
  at::Tensor x_scale = at::empty({m}, x.options().dtype(at::kFloat));
  const auto* rows = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  uint8_t* bytes = quantized.data_ptr<uint8_t>();
  float* scales = x_scale.data_ptr<float>();
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) quantize_row(rows + r * k, k, bytes + r * k, scales + r);
  });
  const Quantized q{bytes, scales, scale.data_ptr<float>(), offsets.data_ptr<int32_t>()};
  run_int8(q, m, k, panels.data_ptr<int8_t>(), panels.size(0), o.e);
#endif
  return o.out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kobot, m) {
  m.def(
      "dense(Tensor x, Tensor panels, Tensor? bias, Tensor? residual, bool gelu, bool fp32_out) "
      "-> Tensor");
  m.def(
      "dense_int8(Tensor x, Tensor panels, Tensor scale, Tensor offsets, Tensor? bias, "
      "Tensor? residual, bool gelu, bool fp32_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(kobot, CPU, m) {
  m.impl("dense", &dense);
  m.impl("dense_int8", &dense_int8);
}
