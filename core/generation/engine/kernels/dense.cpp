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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t PANEL = 32;
constexpr int MAX_ROWS = 12;

struct Epilogue {
  const float* bias;          // [N] or null
  const uint16_t* residual;   // [M, N] bf16 bits or null
  bool gelu;
  void* out;                  // [M, N], bf16 bits or float
  bool fp32_out;
  int64_t n;                  // row stride of residual and out
};

// The panel `ahead` panels after `panel` (number p of a thread's [.., end)), to prefetch into
// L2 while this one is read; null past the thread's last.
inline const char* panel_ahead(const uint8_t* panel, int64_t p, int64_t end, int64_t ahead,
                               int64_t panel_bytes) {
  return p + ahead < end ? reinterpret_cast<const char*>(panel + ahead * panel_bytes) : nullptr;
}

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

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")

// How to read int8 results, beside x [M, K] as round(x / x_scale) + 128 in bytes.
struct Quantized {
  const float* x_scale;     // [M]
  const float* scale;       // [N]: the weight's column scales
  const int32_t* offsets;   // [N]: 128 * column sums of the int8 weight
};

// The first `count` of 16 lanes (all 16 from 16 on).
inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// 16 bf16 values from p (only the first `count` read; the rest 0) as float32 lanes.
inline __m512 bf16_lanes(const uint16_t* p, int64_t count) {
  const __m256i bits = _mm256_maskz_loadu_epi16(first_lanes(count), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// A row of k values (`lanes(i, count)`: float32 lanes i.. of it) to unsigned bytes and its
// scale: max |x| / 127 (1 for a zero row).
template <class Lanes>
void quantize_lanes(const Lanes& lanes, int64_t k, uint8_t* out, float* scale) {
  __m512 peak = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(lanes(i, k - i)));
  const float amax = _mm512_reduce_max_ps(peak);
  *scale = amax > 0.0f ? amax / 127.0f : 1.0f;
  const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t i = 0; i < k; i += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(lanes(i, k - i), inverse));
    _mm512_mask_cvtusepi32_storeu_epi8(out + i, first_lanes(k - i), _mm512_add_epi32(q, offset));
  }
}

void quantize_row(const uint16_t* x, int64_t k, uint8_t* out, float* scale) {
  quantize_lanes([x](int64_t i, int64_t count) { return bf16_lanes(x + i, count); }, k, out,
                 scale);
}

void quantize_floats(const float* x, int64_t k, uint8_t* out, float* scale) {
  quantize_lanes(
      [x](int64_t i, int64_t count) { return _mm512_maskz_loadu_ps(first_lanes(count), x + i); },
      k, out, scale);
}

// The layer norm of a row of x (bf16), (x - mean) / sqrt(var + eps) * weight + bias, into
// `out` (float32, k values), as torch computes it: mean and variance in float32, two passes.
void normalize_row(const uint16_t* x, int64_t k, const float* weight, const float* bias,
                   float eps, float* out) {
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) total = _mm512_add_ps(total, bf16_lanes(x + i, k - i));
  const float mean = _mm512_reduce_add_ps(total) / static_cast<float>(k);
  const __m512 centre = _mm512_set1_ps(mean);
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __m512 d = _mm512_maskz_sub_ps(first_lanes(k - i), bf16_lanes(x + i, k - i), centre);
    squares = _mm512_fmadd_ps(d, d, squares);
  }
  const float variance = _mm512_reduce_add_ps(squares) / static_cast<float>(k);
  const __m512 inverse = _mm512_set1_ps(1.0f / std::sqrt(variance + eps));
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = first_lanes(k - i);
    const __m512 d = _mm512_mul_ps(_mm512_sub_ps(bf16_lanes(x + i, k - i), centre), inverse);
    const __m512 y = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(mask, weight + i),
                                     _mm512_maskz_loadu_ps(mask, bias + i));
    _mm512_mask_storeu_ps(out + i, mask, y);
  }
}

// What differs between the two kernels. Both read 4 bytes of a row of x per step (a pair of
// bf16, or four unsigned bytes) against 128 bytes of a panel (32 columns of that pair or quad).
struct Bf16Kind {
  using Acc = __m512;
  static constexpr int64_t K_PER_STEP = 2;
  static constexpr int64_t AHEAD = 2;  // panels: 2 measured 5-15% faster than 1 at 1 and 32 rows
  static Acc zero() { return _mm512_setzero_ps(); }
  static Acc madd(Acc acc, __m512i x, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
  __m512 value(Acc acc, int64_t, int64_t) const { return acc; }
};

struct Int8Kind {
  using Acc = __m512i;
  static constexpr int64_t K_PER_STEP = 4;
  static constexpr int64_t AHEAD = 4;  // half the bytes a panel: 4 measured best of 2, 4 and 8
  Quantized q;
  static Acc zero() { return _mm512_setzero_si512(); }
  static Acc madd(Acc acc, __m512i x, __m512i w) {
    return _mm512_dpbusd_epi32(acc, x, w);
  }
  // (acc - offsets) * x_scale[row] * scale[col..col + 16)
  __m512 value(Acc acc, int64_t row, int64_t col) const {
    const __m512i centred = _mm512_sub_epi32(acc, _mm512_loadu_si512(q.offsets + col));
    const __m512 scale =
        _mm512_mul_ps(_mm512_loadu_ps(q.scale + col), _mm512_set1_ps(q.x_scale[row]));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(centred), scale);
  }
};

// Rows [row, row + R) of x (`row_bytes` apart) times one panel (columns [col, col + 32)); with
// `next`, a later panel's `next_bytes` are prefetched into L2 along the way.
template <class Kind, int R>
void tile(const Kind& kind, const uint8_t* x, int64_t row_bytes, int64_t steps,
          const uint8_t* panel, const char* next, int64_t next_bytes, int64_t row, int64_t col,
          const Epilogue& e) {
  typename Kind::Acc low[R], high[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    low[r] = Kind::zero();
    high[r] = Kind::zero();
  }
  const int64_t lines_per_step = next == nullptr ? 0 : (next_bytes / 64 + steps - 1) / steps;
  int64_t fetched = 0;
  const uint8_t* rows = x + row * row_bytes;
  for (int64_t step = 0; step < steps; ++step) {
    const __m512i w_low = _mm512_loadu_si512(panel + step * 128);
    const __m512i w_high = _mm512_loadu_si512(panel + step * 128 + 64);
    for (int64_t i = 0; i < lines_per_step && fetched < next_bytes; ++i, fetched += 64) {
      _mm_prefetch(next + fetched, _MM_HINT_T1);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t word;
      std::memcpy(&word, rows + r * row_bytes + 4 * step, sizeof(word));
      const __m512i all = _mm512_set1_epi32(word);
      low[r] = Kind::madd(low[r], all, w_low);
      high[r] = Kind::madd(high[r], all, w_high);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    finish(kind.value(low[r], row + r, col), row + r, col, e);
    finish(kind.value(high[r], row + r, col + 16), row + r, col + 16, e);
  }
}

// tile<Kind, rows> for 1 <= rows <= R.
template <class Kind, int R = MAX_ROWS>
void tile_of(int64_t rows, const Kind& kind, const uint8_t* x, int64_t row_bytes, int64_t steps,
             const uint8_t* panel, const char* next, int64_t next_bytes, int64_t row,
             int64_t col, const Epilogue& e) {
  if constexpr (R > 1) {
    if (rows < R) {
      tile_of<Kind, R - 1>(rows, kind, x, row_bytes, steps, panel, next, next_bytes, row, col, e);
      return;
    }
  }
  tile<Kind, R>(kind, x, row_bytes, steps, panel, next, next_bytes, row, col, e);
}

#pragma GCC pop_options

// AMX: the same panels, read as tiles. A B tile is 16 rows of a panel (16 pairs or quads of k)
// for 16 of its 32 columns, 64 bytes a row, 128 apart; an A tile 16 rows of x, 64 bytes of k
// each. Per row block of up to 32 rows and one panel: C tiles 0-3 hold rows [0, 16) and
// [16, 32) by columns [0, 16) and [16, 32); A tiles 4 and 5, B tiles 6 and 7.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,amx-tile,amx-int8,amx-bf16")

constexpr int64_t TILE_ROWS = 16;
constexpr int64_t AMX_BLOCK = 2 * TILE_ROWS;

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// The tiles for a block of `low` + `high` rows (high 0: tiles 2, 3 and 5 unused).
void configure_tiles(int64_t low, int64_t high) {
  TileConfig config;
  const int64_t rows[8] = {low, low, high, high, low, high, TILE_ROWS, TILE_ROWS};
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = static_cast<uint8_t>(rows[t]);
    config.bytes_per_row[t] = rows[t] == 0 ? 0 : 64;
  }
  _tile_loadconfig(&config);
}

// C tiles 0, 1 += A tile 4 (rows [0, 16)) by B tiles 6, 7; tiles 2, 3 likewise from A tile 5.
// Literal tile ids: the AMX intrinsics are macros that take them as such.
#define KOBOT_AMX_DOTS(dot)                 \
  static void dot_low() { dot(0, 4, 6); dot(1, 4, 7); }  \
  static void dot_high() { dot(2, 5, 6); dot(3, 5, 7); }

struct AmxBf16 : Bf16Kind {
  using Scalar = float;
  static Acc load(const float* p) { return _mm512_load_ps(p); }
  KOBOT_AMX_DOTS(_tile_dpbf16ps)
};

struct AmxInt8 : Int8Kind {
  using Scalar = int32_t;
  static Acc load(const int32_t* p) { return _mm512_load_si512(p); }
  KOBOT_AMX_DOTS(_tile_dpbusd)
};

// Rows [row, row + rows) (rows <= 32; more than 16 with HIGH) times one panel, with `next`'s
// bytes prefetched into L2 along the way, as `tile` does.
template <class Amx, bool HIGH>
void amx_block(const Amx& kind, const uint8_t* x, int64_t row_bytes, int64_t k_tiles,
               const uint8_t* panel, const char* next, int64_t next_bytes, int64_t row,
               int64_t rows, int64_t col, const Epilogue& e) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (HIGH) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t lines_per_step = next == nullptr ? 0 : (next_bytes / 64 + k_tiles - 1) / k_tiles;
  int64_t fetched = 0;
  const uint8_t* low = x + row * row_bytes;
  const uint8_t* high = low + TILE_ROWS * row_bytes;
  for (int64_t t = 0; t < k_tiles; ++t) {
    const uint8_t* b = panel + t * TILE_ROWS * 128;
    for (int64_t i = 0; i < lines_per_step && fetched < next_bytes; ++i, fetched += 64) {
      _mm_prefetch(next + fetched, _MM_HINT_T1);
    }
    _tile_loadd(6, b, 128);
    _tile_loadd(7, b + 64, 128);
    _tile_loadd(4, low + t * 64, row_bytes);
    Amx::dot_low();
    if constexpr (HIGH) {
      _tile_loadd(5, high + t * 64, row_bytes);
      Amx::dot_high();
    }
  }
  alignas(64) typename Amx::Scalar c[AMX_BLOCK][PANEL];
  _tile_stored(0, &c[0][0], PANEL * 4);
  _tile_stored(1, &c[0][16], PANEL * 4);
  if constexpr (HIGH) {
    _tile_stored(2, &c[TILE_ROWS][0], PANEL * 4);
    _tile_stored(3, &c[TILE_ROWS][16], PANEL * 4);
  }
  for (int64_t r = 0; r < rows; ++r) {
    finish(kind.value(Amx::load(c[r]), row + r, col), row + r, col, e);
    finish(kind.value(Amx::load(c[r] + 16), row + r, col + 16), row + r, col + 16, e);
  }
}

// run's work on AMX: each thread configures its tiles (again for a last, shorter row block)
// and releases them when done.
template <class Amx>
void run_amx(const Amx& kind, const uint8_t* x, int64_t m, int64_t k, const uint8_t* panels,
             int64_t count, const Epilogue& e) {
  const int64_t steps = k / Amx::K_PER_STEP;
  const int64_t row_bytes = steps * 4;
  const int64_t panel_bytes = steps * 128;
  const int64_t k_tiles = steps / TILE_ROWS;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    int64_t configured = -1;
    for (int64_t p = begin; p < end; ++p) {
      const uint8_t* panel = panels + p * panel_bytes;
      const char* next = panel_ahead(panel, p, end, Amx::AHEAD, panel_bytes);
      for (int64_t row = 0; row < m; row += AMX_BLOCK) {
        const int64_t rows = m - row < AMX_BLOCK ? m - row : AMX_BLOCK;
        if (rows != configured) {
          configure_tiles(std::min(rows, TILE_ROWS), std::max<int64_t>(rows - TILE_ROWS, 0));
          configured = rows;
        }
        const char* ahead = row == 0 ? next : nullptr;
        if (rows > TILE_ROWS) {
          amx_block<Amx, true>(kind, x, row_bytes, k_tiles, panel, ahead, panel_bytes, row, rows,
                               p * PANEL, e);
        } else {
          amx_block<Amx, false>(kind, x, row_bytes, k_tiles, panel, ahead, panel_bytes, row,
                                rows, p * PANEL, e);
        }
      }
    }
    if (configured >= 0) _tile_release();
  });
}
#pragma GCC pop_options

// AMX is there and this process may use it (Linux gives a process the tile state on request).
bool amx_present() {
  static const bool present = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
    const unsigned tile = 1u << 24, int8 = 1u << 25, bf16 = 1u << 22;
    if ((d & (tile | int8 | bf16)) != (tile | int8 | bf16)) return false;
    constexpr long REQUEST_PERMISSION = 0x1023, TILE_DATA = 18;  // ARCH_REQ_XCOMP_PERM
    return syscall(SYS_arch_prctl, REQUEST_PERMISSION, TILE_DATA) == 0;
  }();
  return present;
}

bool amx_wanted = true;  // kobot::dense_isa("avx512") turns it off (tests, comparisons)

bool amx_runs(int64_t k, int64_t k_per_tile) {
  return amx_wanted && amx_present() && k % k_per_tile == 0;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")

// x [m, k] (bf16 or quantized bytes) times `count` panels; each thread takes a range of panels.
template <class Kind>
void run(const Kind& kind, const uint8_t* x, int64_t m, int64_t k, const uint8_t* panels,
         int64_t count, const Epilogue& e) {
  const int64_t steps = k / Kind::K_PER_STEP;
  const int64_t row_bytes = steps * 4;
  const int64_t panel_bytes = steps * 128;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const uint8_t* panel = panels + p * panel_bytes;
      const char* next = panel_ahead(panel, p, end, Kind::AHEAD, panel_bytes);
      for (int64_t row = 0; row < m; row += MAX_ROWS) {
        const int64_t rows = m - row < MAX_ROWS ? m - row : MAX_ROWS;
        tile_of(rows, kind, x, row_bytes, steps, panel, row == 0 ? next : nullptr, panel_bytes,
                row, p * PANEL, e);
      }
    }
  });
}
#pragma GCC pop_options
#endif

// Both kernels share one tile, built for AVX-512 BF16 and VNNI (every CPU with the first has
// the second).
bool supported() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n,
                  at::ScalarType type, const char* type_name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == type && t.is_contiguous(),
              op, ": ", name, " must be a contiguous ", type_name, " vector of ", n);
}

// The panels' output columns N, checked: [N / 32, K / per_step, 32, per_step] of `type`.
int64_t checked_panels(const char* op, const at::Tensor& panels, int64_t k, int64_t per_step,
                       at::ScalarType type, const char* type_name) {
  TORCH_CHECK(supported(), op, ": this CPU (or this build) has no AVX-512 BF16 + VNNI");
  TORCH_CHECK(panels.dim() == 4 && panels.size(2) == PANEL && panels.size(3) == per_step &&
                  panels.scalar_type() == type && panels.is_contiguous(),
              op, ": panels must be a contiguous [N / 32, K / ", per_step, ", 32, ", per_step,
              "] ", type_name, " tensor");
  TORCH_CHECK(panels.size(1) * per_step == k, op, ": x has ", k, " columns, the panels ",
              panels.size(1) * per_step, " rows");
  return panels.size(0) * PANEL;
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
    check_vector(op, "bias", *bias, n, at::kFloat, "float32");
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
  const at::Tensor x = checked_rows("dense", x_in);
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t n = checked_panels("dense", panels, k, 2, at::kBFloat16, "bfloat16");
  Output o = output_of("dense", x, n, bias, residual, gelu, fp32_out);
  if (m == 0) return o.out;
#if defined(__AVX512F__)
  const auto* rows = reinterpret_cast<const uint8_t*>(x.data_ptr<at::BFloat16>());
  const auto* weights = reinterpret_cast<const uint8_t*>(panels.data_ptr<at::BFloat16>());
  if (amx_runs(k, 2 * TILE_ROWS)) {
    run_amx(AmxBf16{}, rows, m, k, weights, panels.size(0), o.e);
  } else {
    run(Bf16Kind{}, rows, m, k, weights, panels.size(0), o.e);
  }
#endif
  return o.out;
}

// x [M, K] bf16; panels [N / 32, K / 4, 32, 4] int8; scale [N] float32; offsets [N] int32;
// bias, residual and the result as for dense.
// With norm_weight and norm_bias (float32 [K]), x is first layer-normed (norm_eps), in
// float32, and quantized from that: the norm's bf16 output is never stored.
at::Tensor dense_int8(const at::Tensor& x_in, const at::Tensor& panels, const at::Tensor& scale,
                      const at::Tensor& offsets, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& residual, bool gelu, bool fp32_out,
                      const c10::optional<at::Tensor>& norm_weight,
                      const c10::optional<at::Tensor>& norm_bias, double norm_eps) {
  const at::Tensor x = checked_rows("dense_int8", x_in);
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t n = checked_panels("dense_int8", panels, k, 4, at::kChar, "int8");
  check_vector("dense_int8", "scale", scale, n, at::kFloat, "float32");
  check_vector("dense_int8", "offsets", offsets, n, at::kInt, "int32");
  Output o = output_of("dense_int8", x, n, bias, residual, gelu, fp32_out);
  if (m == 0) return o.out;
#if defined(__AVX512F__)
  at::Tensor quantized = at::empty({m, k}, x.options().dtype(at::kByte));
  at::Tensor x_scale = at::empty({m}, x.options().dtype(at::kFloat));
  const auto* rows = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  uint8_t* bytes = quantized.data_ptr<uint8_t>();
  float* scales = x_scale.data_ptr<float>();
  TORCH_CHECK(norm_weight.has_value() == norm_bias.has_value(),
              "dense_int8: norm_weight and norm_bias come together");
  if (norm_weight.has_value()) {
    check_vector("dense_int8", "norm_weight", *norm_weight, k, at::kFloat, "float32");
    check_vector("dense_int8", "norm_bias", *norm_bias, k, at::kFloat, "float32");
    const float* weight = norm_weight->data_ptr<float>();
    const float* shift = norm_bias->data_ptr<float>();
    const auto eps = static_cast<float>(norm_eps);
    at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> normed(static_cast<size_t>(k));
      for (int64_t r = begin; r < end; ++r) {
        normalize_row(rows + r * k, k, weight, shift, eps, normed.data());
        quantize_floats(normed.data(), k, bytes + r * k, scales + r);
      }
    });
  } else {
    at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        quantize_row(rows + r * k, k, bytes + r * k, scales + r);
      }
    });
  }
  const Quantized q{scales, scale.data_ptr<float>(), offsets.data_ptr<int32_t>()};
  const auto* weights = reinterpret_cast<const uint8_t*>(panels.data_ptr<int8_t>());
  if (amx_runs(k, 4 * TILE_ROWS)) {
    run_amx(AmxInt8{{q}}, bytes, m, k, weights, panels.size(0), o.e);
  } else {
    run(Int8Kind{q}, bytes, m, k, weights, panels.size(0), o.e);
  }
#endif
  return o.out;
}

// The instructions the kernels run on: "amx" or "avx512"; `isa` chooses (amx where present).
std::string dense_isa(const c10::optional<std::string>& isa) {
#if defined(__AVX512F__)
  if (isa.has_value()) {
    TORCH_CHECK(*isa == "avx512" || (*isa == "amx" && amx_present()),
                "dense_isa: must be avx512 or, on a CPU with AMX, amx (got ", *isa, ")");
    amx_wanted = *isa == "amx";
  }
  return amx_wanted && amx_present() ? "amx" : "avx512";
#else
  TORCH_CHECK(!isa.has_value(), "dense_isa: this build has no AVX-512");
  return "none";
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kobot, m) {
  m.def("dense_isa(str? isa) -> str", &dense_isa);
  m.def(
      "dense(Tensor x, Tensor panels, Tensor? bias, Tensor? residual, bool gelu, bool fp32_out) "
      "-> Tensor");
  m.def(
      "dense_int8(Tensor x, Tensor panels, Tensor scale, Tensor offsets, Tensor? bias, "
      "Tensor? residual, bool gelu, bool fp32_out, Tensor? norm_weight=None, "
      "Tensor? norm_bias=None, float norm_eps=1e-5) -> Tensor");
}

TORCH_LIBRARY_IMPL(kobot, CPU, m) {
  m.impl("dense", &dense);
  m.impl("dense_int8", &dense_int8);
}
