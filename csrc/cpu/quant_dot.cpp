// The integer-dot quantized linear on the CPU (quant_matmul_dot): x quantized to int8 per block
// of 32 once per call, then int32 dot products against the packed int8 / int4 weights, scaled
// per block (quant_dot.h). Against the float path (quant_matmul.cpp) it trades the exactness of x
// for doing no per-weight float work: a weight is unpacked to a byte, never to a float, and one
// instruction (vpdpbusd) or two (vpmaddubsw + vpmaddwd) multiply and sum 32 or 64 of them.
//
// The instruction set is chosen at run time: AVX-512 VNNI, else AVX-VNNI, else AVX2, by CPUID
// (__builtin_cpu_supports, which also checks that the OS saves the wider registers).
// FASTLM_QUANT_ISA=avx2|avx_vnni|avx512_vnni, or torch.ops.fastlm_C.quant_dot_isa, forces one.
//
// Threads: rows of W in chunks of 64 KiB (up to 256 KiB for M <= 4), claimed from a shared
// counter (cpu/pool.h); for M > 1 a chunk's rows are walked once per 4 rows of x (per 16, then 8,
// on the 512-bit kernels; per 8 for int4 on the 256-bit ones, while that many are left), so the
// chunk's bytes come from memory once and from L2 after that, and each unpacked weight serves
// that many rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "cpu/pool.h"
#include "cpu/quant_dot.h"
#include "cpu/vec.h"
#include "fastlm.h"

namespace fastlm {
namespace qdot {

// --- the instruction set ------------------------------------------------------------------------

namespace {

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::avx512_vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case Isa::avx_vnni:
      return __builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("avx2");
    default:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512_vnni: return "avx512_vnni";
    case Isa::avx_vnni: return "avx_vnni";
    default: return "avx2";
  }
}

Isa best_isa() {
  if (const char* env = std::getenv("FASTLM_QUANT_ISA")) {
    for (Isa isa : {Isa::avx2, Isa::avx_vnni, Isa::avx512_vnni}) {
      if (std::strcmp(env, isa_name(isa)) == 0 && cpu_has(isa)) return isa;
    }
  }
  for (Isa isa : {Isa::avx512_vnni, Isa::avx_vnni}) {
    if (cpu_has(isa)) return isa;
  }
  return Isa::avx2;
}

std::atomic<int> g_isa{0};  // 0: not chosen yet

Isa current_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v == 0) {
    v = static_cast<int>(best_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

RowsFn rows_fn(Isa isa) {
  switch (isa) {
    case Isa::avx512_vnni: return rows_avx512;
    case Isa::avx_vnni: return rows_avxvnni;
    default: return rows_avx2;
  }
}

// --- activation quantization --------------------------------------------------------------------

// One block of 32 floats to int8: d = absmax / 127, q = round(x / d) (ties to even), and the sum
// of q. A block holding a NaN or an infinity gets d = NaN and q = 0, so that every output it
// touches is NaN rather than a finite number.
template <typename T>
inline void quant_block(const T* x, __m256i& q, float& d, int32_t& sum) {
  __m256 f[4];
  __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int i = 0; i < 4; ++i) {
    f[i] = vec::load(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, f[i]));
    bad = _mm256_add_ps(bad, _mm256_mul_ps(f[i], _mm256_setzero_ps()));  // NaN for inf or NaN
  }
  const bool finite = _mm256_movemask_ps(_mm256_cmp_ps(bad, bad, _CMP_UNORD_Q)) == 0;
  float m;
  {
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    t = _mm_max_ss(t, _mm_movehdup_ps(t));
    m = _mm_cvtss_f32(t);
  }
  if (!finite) {
    q = _mm256_setzero_si256();
    d = std::numeric_limits<float>::quiet_NaN();
    sum = 0;
    return;
  }
  d = m / 127.f;
  const __m256 inv = _mm256_set1_ps(m > 0.f ? 127.f / m : 0.f);
  __m256i i[4];
  for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(f[j], inv));
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  sum = _mm_cvtsi128_si32(s4);
  // packs interleave the 128-bit lanes; the permutation puts k back in order.
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  q = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

struct ActBuf {
  int8_t* q;
  float *d, *corr;
  int8_t* q8;
  float* d8;
  int32_t* s8;
};

// Row i of x into the kernel order of quant_dot.h, its block scales and the zero-point sums.
template <typename T>
void quant_row(const T* x, int64_t k, int bits, int64_t group, int sb, const ActBuf& a, int64_t i) {
  const int64_t nb = k / kBlock, groups = k / group;
  int8_t* q = a.q + i * k;
  float* d = a.d + i * nb;
  float* corr = bits == 4 ? a.corr + i * groups : a.corr + i;
  // Even k to the low 8 bytes of each 128-bit lane, odd k to the high 8.
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  double total = 0.0;
  if (bits == 4) std::fill(corr, corr + groups, 0.f);
  for (int64_t b = 0; b < nb; ++b) {
    __m256i v;
    int32_t sum;
    quant_block(x + b * kBlock, v, d[b], sum);
    if (bits == 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), v);
      total += static_cast<double>(d[b]) * sum;
      continue;
    }
    corr[b * kBlock / group] += d[b] * static_cast<float>(sum);
    // [even 0..14, even 16..30 | odd 1..15, odd 17..31]
    const __m256i eo = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0xd8);
    const int64_t full = nb / sb * sb;
    const int64_t s = b < full ? sb : 1;           // this block's super-block width
    const int64_t base = b < full ? b / sb * sb : b;  // its first block
    int8_t* o = q + base * kBlock;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + (b - base) * 16), _mm256_castsi256_si128(eo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + (s + b - base) * 16), _mm256_extracti128_si256(eo, 1));
  }
  if (bits == 8) *corr = static_cast<float>(128.0 * total);
}

// Row i of x, row r of the group of R rows from i - r, into the row-interleaved order of
// quant_dot.h (Act::q8).
template <typename T>
void quant_row_il(const T* x, int64_t k, int bits, int R, const ActBuf& a, int64_t i, int64_t r) {
  const int64_t nb = k / kBlock, m0 = i - r;
  // int4: per 128-bit lane the even k, then the odd; then lanes regrouped to [even 0..30 | odd
  // 1..31], whose 4-byte words t and 4 + t are step t's even and odd k. int8: natural order.
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t b = 0; b < nb; ++b) {
    __m256i v;
    float d;
    int32_t sum;
    quant_block(x + b * kBlock, v, d, sum);
    alignas(32) int32_t w[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(w),
                       bits == 8 ? v : _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0xd8));
    int8_t* o = a.q8 + m0 * k + b * 32 * R + r * 4;
    for (int t = 0; t < 4; ++t) {
      __builtin_memcpy(o + t * 8 * R, &w[bits == 8 ? 2 * t : t], 4);
      __builtin_memcpy(o + t * 8 * R + 4 * R, &w[bits == 8 ? 2 * t + 1 : 4 + t], 4);
    }
    a.d8[m0 * nb + b * R + r] = d;
    a.s8[m0 * nb + b * R + r] = sum;
  }
}

}  // namespace
}  // namespace qdot

std::string quant_dot_isa(int64_t force) {
  using qdot::Isa;
  if (force == 0) qdot::g_isa.store(static_cast<int>(qdot::best_isa()));
  if (force > 0) {
    TORCH_CHECK(force <= 3, "quant_dot_isa: force must be -1 (query), 0 (automatic), 1 (avx2), 2 (avx512_vnni) "
                "or 3 (avx_vnni), got ", force);
    TORCH_CHECK(qdot::cpu_has(static_cast<Isa>(force)), "quant_dot_isa: this CPU has no ",
                qdot::isa_name(static_cast<Isa>(force)));
    qdot::g_isa.store(static_cast<int>(force));
  }
  return qdot::isa_name(qdot::current_isa());
}

namespace {

struct Ctx {
  const qdot::Problem* p;
  qdot::RowsFn fn;
  int64_t rows;      // rows of W per chunk
  int64_t m16, m8;   // rows of x taken 16 at once (the first m16), then 8 (up to m8): Act::q8
};

void run_chunk(void* v, int64_t c) {
  const Ctx& cx = *static_cast<const Ctx*>(v);
  const int64_t n0 = c * cx.rows, n1 = std::min(cx.p->n, n0 + cx.rows);
  for (int64_t m0 = 0; m0 < cx.m16; m0 += 16) cx.fn(*cx.p, n0, n1, m0, 16);
  for (int64_t m0 = cx.m16; m0 < cx.m8; m0 += 8) cx.fn(*cx.p, n0, n1, m0, 8);
  for (int64_t m0 = cx.m8; m0 < cx.p->m; m0 += 4) {
    cx.fn(*cx.p, n0, n1, m0, static_cast<int>(std::min<int64_t>(4, cx.p->m - m0)));
  }
}

qdot::ScaleType scale_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return qdot::ScaleType::bf16;
    case at::kHalf: return qdot::ScaleType::f16;
    default: return qdot::ScaleType::f32;
  }
}

}  // namespace

at::Tensor quant_matmul_dot_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const OptTensor& zeros, const OptTensor& bias, int64_t bits,
                                int64_t group_size) {
  using namespace qdot;
  const char* op = "quant_matmul_dot";
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % kBlock == 0, op, ": K (x.size(1)) must be a multiple of ", kBlock, ", got ", k);
  TORCH_CHECK(qweight.device().is_cpu() && qweight.dim() == 2 && qweight.is_contiguous(), op,
              ": qweight must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte), op, ": qweight must be ",
              bits == 8 ? "int8" : "uint8", " for ", bits, "-bit weights, got ", qweight.scalar_type());
  const int64_t n = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * (bits == 4 ? 2 : 1) == k, op, ": qweight has ", qweight.size(1),
              " columns, which does not match K = ", k, " for ", bits, "-bit weights");
  if (bits == 8) {
    TORCH_CHECK(group_size == k, op, ": group_size must be K = ", k, " for int8 weights, got ", group_size);
  } else {
    TORCH_CHECK((group_size == 32 || group_size == 64 || group_size == 128) && k % group_size == 0, op,
                ": int4 group_size must be 32, 64 or 128 and divide K = ", k, ", got ", group_size);
  }
  const int64_t groups = k / group_size;
  const auto st = scales.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": scales must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(scales.device().is_cpu() && scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == n &&
              scales.size(1) == groups, op, ": scales must be a contiguous CPU tensor of shape (", n, ", ", groups, ")");
  const bool has_zeros = zeros && zeros->defined();
  if (has_zeros) {
    TORCH_CHECK(bits == 4, op, ": zeros must be absent for int8 weights");
    TORCH_CHECK(zeros->scalar_type() == st && zeros->device().is_cpu() && zeros->is_contiguous() &&
                zeros->sizes() == scales.sizes(), op, ": zeros must be contiguous, of scales' dtype and shape");
  }
  const bool has_bias = bias && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == n &&
                bias->scalar_type() == x.scalar_type(), op, ": bias must be of shape (", n, ") and x's dtype");
  }
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return y.to(x.scalar_type());

  const Isa isa = current_isa();
  const int64_t nb = k / kBlock, ncorr = bits == 4 ? groups : 1;
  // x 8 or 16 rows at once where it can: int4 on the 256-bit kernels, 8 at once (rows_int4_x8; AMD
  // EPYC Zen 3, one thread, 128 x 4096 g32 weights, M = 16: about 2x rows_int4_nb's 4 at once);
  // the 512-bit ones 16 at once, then 8 (quant_dot_avx512_il.cpp).
  // With 10 or more rows past the last group of 16, they make a group of 16 with zero rows: the
  // group costs about what 8 rows cost (Zen 4, 4096 x 4096, M = 12 / 15 / 16: 1.66-1.79 /
  // 1.97-2.07 / 1.49-1.58 ms before).
  const bool wide = isa == Isa::avx512_vnni;
  const int64_t r16 = m % 16;
  const int64_t m16 = wide ? (r16 >= 10 ? m - r16 + 16 : m - r16) : 0;  // past m: the last group padded
  const int64_t m8 = m16 >= m ? m16 : wide || bits == 4 ? m16 + (m - m16) / 8 * 8 : 0;
  // One float buffer: d (M, nb), corr (M, ncorr), d8 and s8 (m8, nb), then q (M, K) and q8
  // (m8, K) bytes. The rows taken 8 or 16 at once leave their places in d, corr and q unused.
  const int64_t floats = m * (nb + ncorr) + 2 * m8 * nb;
  at::Tensor work = at::empty({floats + ((m + m8) * k + 3) / 4}, y.options());
  float* base = work.data_ptr<float>();
  int8_t* bytes = reinterpret_cast<int8_t*>(base + floats);
  const ActBuf a{bytes, base, base + m * nb, bytes + m * k, base + m * (nb + ncorr),
                 reinterpret_cast<int32_t*>(base + m * (nb + ncorr) + m8 * nb)};
  const int sb = super_blocks(isa);
  // Serial: tens of microseconds at decode sizes (prefill's M now comes here too, where this pass
  // is not yet measured on its own); an OpenMP region here left its threads spinning
  // on the cores that the pool's helpers then needed (M = 8 measured 5x slower than M = 4).
  if (m16 > m) {  // the padded group's rows of zeros
    std::memset(a.q8 + (m16 - 16) * k, 0, 16 * k);
    std::fill(a.d8 + (m16 - 16) * nb, a.d8 + m16 * nb, 0.f);
    std::fill(a.s8 + (m16 - 16) * nb, a.s8 + m16 * nb, 0);
  }
  const auto quantize_x = [&](const auto* xp) {
    for (int64_t i = 0; i < std::min(m8, m); ++i) {
      const int64_t r = i < m16 ? i % 16 : (i - m16) % 8;
      quant_row_il(xp + i * k, k, static_cast<int>(bits), i < m16 ? 16 : 8, a, i, r);
    }
    for (int64_t i = m8; i < m; ++i) quant_row(xp + i * k, k, static_cast<int>(bits), group_size, sb, a, i);
  };
  if (x.scalar_type() == at::kFloat) {
    quantize_x(x.data_ptr<float>());
  } else if (x.scalar_type() == at::kBFloat16) {
    quantize_x(x.data_ptr<c10::BFloat16>());
  } else {
    quantize_x(x.data_ptr<c10::Half>());
  }
  at::Tensor bias_f = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();

  const Problem p{Act{a.q, a.d, a.corr, a.q8, a.d8, a.s8},
                  static_cast<const uint8_t*>(qweight.data_ptr()),
                  scales.data_ptr(),
                  has_zeros ? zeros->data_ptr() : nullptr,
                  has_bias ? bias_f.data_ptr<float>() : nullptr,
                  y.data_ptr<float>(),
                  m, n, k, group_size, groups, qweight.size(1), static_cast<int>(bits), scale_type(scales)};
  const int64_t row_bytes = qweight.size(1), total = n * row_bytes;
  // With up to 4 rows of x a chunk is walked once and the weights only stream by: chunks of up to
  // 256 KiB (a sixteenth of them, at least 64 KiB, so that small layers still split evenly) read
  // faster than 64 KiB ones (AMD EPYC Zen 4, 2 threads, M = 1, int8 / int4 g32, 4096 x 4096: 72 /
  // 73% of the read -> 80 / 78%, 14336 x 4096: 95 / 84% -> 102 / 86%; M = 2..4, 4096 x 4096 and
  // 4096 x 14336: 4-20% faster). With more, a chunk is walked once per group of rows of x and must
  // stay in L2.
  const int64_t chunk_bytes = m <= 4 ? std::clamp<int64_t>(total / 16, 1 << 16, 1 << 18) : 1 << 16;
  const int64_t rows = std::max<int64_t>(1, chunk_bytes / row_bytes);
  const int64_t chunks = (n + rows - 1) / rows;
  // Alone below ~512 KiB of weights (times rows of x, up to 4), where waking a thread costs more
  // than it saves.
  const int64_t helpers = std::min<int64_t>(pool::helpers_for(chunks), total * std::min<int64_t>(m, 4) / (1 << 18) - 1);
  Ctx cx{&p, rows_fn(isa), rows, m16, m8};
  pool::parallel_chunks(chunks, static_cast<int>(std::max<int64_t>(0, helpers)), run_chunk, &cx);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace fastlm
