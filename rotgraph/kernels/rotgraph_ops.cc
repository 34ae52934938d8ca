// rotgraph's custom onnxruntime kernels: the ops of the `rotgraph` domain as compiled CPU code.
//
// Every op here is also carried in the model as an ONNX function in standard ops, so a model runs
// without this library; registering it (rotgraph.kernels.register) makes onnxruntime run these
// kernels instead of inlining the function bodies. Each kernel computes what its function body computes,
// in the same float32 arithmetic (divisions stay divisions, rounding is half to even), so the two paths
// agree to the last bit for the quantizers and to float rounding for the Hadamard transform.
//
//   Hadamard(X) -> Y           y = x @ kron(A, B) / sqrt(n) on the last axis, n = m * 2^k: the 2^k part
//                              by in-place Walsh-Hadamard butterflies (n log2(2^k) adds), the m part
//                              (attribute `a`, the m x m +-1 matrix, absent for m = 1) as m^2 * 2^k
//                              multiply-adds.
//   FakeQuant(X) -> Y          dynamic quantize-dequantize over groups of the last axis; attributes
//                              bits, symmetric, group (0: the whole axis), clip.
//   KVQuantize(X) -> (codes, scale, zero)
//   KVDequantize(codes, scale, zero) -> X
//                              the stored KV cache: asymmetric uint8 codes per group of head_dim, 4-bit
//                              codes packed two per byte (element i low nibble, i + head_dim/2 high);
//                              attributes bits, head_dim, group, clip.
//   RotaryHadamard(X, position_ids, cos_cache, sin_cache) -> Y
//                              RoPE (halves not interleaved) and then the Hadamard transform of each head of
//                              a [batch, seq, heads * head_dim] tensor (its first rotated_heads heads per
//                              token when that attribute is set: packed QKV); attributes head_dim and `a`.
//
// Built against onnxruntime's C API headers (API version of the header; onnxruntime accepts libraries
// built for older API versions) by scripts/build_kernels.sh, for a portable x86-64 baseline unless asked
// for the build machine's own CPU, and with -ffp-contract=off: a fused multiply-add would round once where
// the function bodies round twice.
//
// Length: one file (about 950 lines) because an onnxruntime custom-op library is one translation unit
// with one registration entry point; the ops share the attribute readers, the thread split and the
// grid (rotgraph/grid.py states the formula once, tests/test_grid.py compares this code with it).
//
// Beside the kernels, plain C functions for rotgraph's own Python code (rotgraph.kernels loads them with
// ctypes; they need no onnxruntime): rotgraph_rotate_f64, the offline rotation of weights in float64 by a
// Hadamard matrix kron(A, B) as butterflies, where numpy can only multiply by its Kronecker factors, and
// the float16 <-> float64 conversions of the weight rewrites (F16C; numpy converts one value at a time).
//
// Attributes are checked when a kernel is created; a bad one (and any failure while computing) comes back
// to onnxruntime as an error status of the node, never as undefined behaviour.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <algorithm>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__SSE4_1__)
#include <smmintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace {

using Ort::Custom::Tensor;

// Eight floats as one SIMD value (GCC/Clang vector extension; one AVX or two SSE registers).
typedef float v8 __attribute__((vector_size(32)));

// Code inlined into both of the Hadamard transform's builds (see HadamardKernel::transform).
#define ROTGRAPH_INLINE inline __attribute__((always_inline))

ROTGRAPH_INLINE v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

ROTGRAPH_INLINE void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

// Whether this CPU (and its operating system) runs AVX2: the Hadamard transform has a build for it beside
// the baseline one. Asked with CPUID, so the AVX2 code is never reached on a CPU without it.
// ROTGRAPH_KERNEL_BASELINE=1 in the environment keeps to the baseline build (to test it on any CPU).
bool has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool value = [] {
    const char* baseline = std::getenv("ROTGRAPH_KERNEL_BASELINE");
    if (baseline != nullptr && std::string(baseline) == "1") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return value;
#else
  return false;
#endif
}

// A kernel's configuration error, found when the kernel is created and reported by Compute (a kernel's
// constructor has no status to return, and an exception must not cross onnxruntime's C API).
struct Checked {
  std::string error;

  void check(bool ok, const std::string& what) {
    if (!ok && error.empty()) error = what;
  }
  Ort::Status failure() const { return Ort::Status(error.c_str(), ORT_INVALID_ARGUMENT); }
};

// Run `body`, turning an exception into an error status for onnxruntime.
template <typename F>
Ort::Status guarded(const Checked& checked, F&& body) {
  if (!checked.error.empty()) return checked.failure();
  try {
    body();
  } catch (const std::exception& e) {
    return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
  }
  return Ort::Status(nullptr);
}

// An optional attribute: `fallback` when the node does not carry it.
template <typename T>
T attr_or(OrtStatus* (*get)(const OrtKernelInfo*, const char*, T*), const OrtKernelInfo* info, const char* name,
          T fallback) {
  T value = fallback;
  OrtStatus* status = get(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return fallback;
  }
  return value;
}

int64_t attr_int(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  return attr_or<int64_t>(Ort::GetApi().KernelInfoGetAttribute_int64, info, name, fallback);
}

float attr_float(const OrtKernelInfo* info, const char* name, float fallback) {
  return attr_or<float>(Ort::GetApi().KernelInfoGetAttribute_float, info, name, fallback);
}

// A required attribute: records an error in `checked` when the node does not carry it.
int64_t attr_required(const OrtKernelInfo* info, const char* name, Checked& checked) {
  int64_t value = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    checked.check(false, std::string("missing attribute ") + name);
  }
  return value;
}

// A per-thread buffer of at least `size` elements that lives across calls (no allocation per call).
template <typename T>
T* scratch(size_t slot, size_t size) {
  thread_local std::vector<T> buffers[2];
  std::vector<T>& buffer = buffers[slot];
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

int64_t rows_of(const std::vector<int64_t>& shape) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  return rows;
}

// Split `rows` over onnxruntime's intra-op threads when there is enough work for it.
template <typename F>
void for_rows(OrtKernelContext* context, int64_t rows, int64_t work_per_row, F&& body) {
  const int64_t min_work = 1 << 16;
  if (rows < 2 || rows * work_per_row < 2 * min_work) {
    body(0, rows);
    return;
  }
  const int64_t batches = std::min<int64_t>(rows, (rows * work_per_row) / min_work);
  struct Job {
    std::remove_reference_t<F>* body;
    int64_t rows, batches;
  } job{&body, rows, batches};
  auto run = [](void* data, size_t index) {
    Job* j = static_cast<Job*>(data);
    int64_t begin = j->rows * static_cast<int64_t>(index) / j->batches;
    int64_t end = j->rows * (static_cast<int64_t>(index) + 1) / j->batches;
    (*j->body)(begin, end);
  };
  Ort::KernelContext(context).ParallelFor(run, static_cast<size_t>(batches), 0, &job);
}

struct HadamardKernel : Checked {
  int64_t m = 1;
  std::vector<float> a_t;  // A transposed, scaled by 1 / sqrt(m), row-major m x m

  HadamardKernel(const OrtApi*, const OrtKernelInfo* info) {
    std::vector<int64_t> a;
    size_t size = 0;
    OrtStatus* status = Ort::GetApi().KernelInfoGetAttributeArray_int64(info, "a", nullptr, &size);
    if (status == nullptr && size > 0) {
      a.resize(size);
      status = Ort::GetApi().KernelInfoGetAttributeArray_int64(info, "a", a.data(), &size);
    }
    if (status != nullptr) {
      Ort::GetApi().ReleaseStatus(status);
      a.clear();  // absent: m = 1 (n a power of two)
    }
    if (!a.empty()) {
      m = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(a.size()))));
      check(m * m == static_cast<int64_t>(a.size()), "Hadamard: attribute a has " + std::to_string(a.size()) +
                                                         " entries, not m x m");
      check(std::all_of(a.begin(), a.end(), [](int64_t v) { return v == 1 || v == -1; }),
            "Hadamard: attribute a has an entry other than +1 or -1");
      if (!error.empty()) return;
      a_t.resize(a.size());
      const float s = static_cast<float>(1.0 / std::sqrt(static_cast<double>(m)));
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < m; ++j) a_t[i * m + j] = static_cast<float>(a[j * m + i]) * s;
    }
  }

  // dst[i, :] = sum_j A^T[i, j] * src[j, :] over [m, p] blocks, 8 * NV columns at a time in registers
  template <int NV>
  ROTGRAPH_INLINE void mix_blocks(const float* src, float* dst, int64_t p) const {
    for (int64_t i = 0; i < m; ++i) {
      const float* coefficients = a_t.data() + i * m;
      for (int64_t k0 = 0; k0 < p; k0 += 8 * NV) {
        v8 acc[NV];
        for (int q = 0; q < NV; ++q) acc[q] = v8{};
        for (int64_t j = 0; j < m; ++j) {
          const float c = coefficients[j];
          const float* v = src + j * p + k0;
          for (int q = 0; q < NV; ++q) acc[q] += c * load8(v + 8 * q);
        }
        for (int q = 0; q < NV; ++q) store8(dst + i * p + k0 + 8 * q, acc[q]);
      }
    }
  }

  ROTGRAPH_INLINE void mix(const float* src, float* dst, int64_t p) const {
    if (p >= 32) return mix_blocks<4>(src, dst, p);
    if (p == 16) return mix_blocks<2>(src, dst, p);
    if (p == 8) return mix_blocks<1>(src, dst, p);
    for (int64_t i = 0; i < m; ++i)  // p < 8: a few scalars per block
      for (int64_t k = 0; k < p; ++k) {
        float acc = 0.0f;
        for (int64_t j = 0; j < m; ++j) acc += a_t[i * m + j] * src[j * p + k];
        dst[i * p + k] = acc;
      }
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<float>& x, Tensor<float>& y) {
    return guarded(*this, [&] { run(context, x, y); });
  }

  void run(OrtKernelContext* context, const Tensor<float>& x, Tensor<float>& y) {
    const std::vector<int64_t> shape = x.Shape();
    if (shape.empty()) throw std::runtime_error("Hadamard: input has no axes");
    const int64_t n = shape.back();
    if (n <= 0 || n % m != 0)
      throw std::runtime_error("Hadamard: last axis " + std::to_string(n) + " is not a multiple of m = " +
                               std::to_string(m));
    const int64_t p = n / m;
    if (p & (p - 1)) throw std::runtime_error("Hadamard: n / m = " + std::to_string(p) + " is not a power of two");
    const int64_t rows = rows_of(shape);
    if (rows == 0) {
      y.Allocate(shape);
      return;
    }
    const float* in = x.Data();
    float* out = y.Allocate(shape);
    for_rows(context, rows, n * (log2(p) + m),
             [&](int64_t begin, int64_t end) { transform_rows(in + begin * n, out + begin * n, end - begin, n); });
  }

  static int64_t log2(int64_t p) {
    int64_t log_p = 0;
    while ((int64_t{1} << log_p) < p) ++log_p;
    return log_p;
  }

  // The transform of `rows` rows of length n (a multiple of m, n / m a power of two) from src into out,
  // on this thread; src may be out (every block is read before it is written).
  void transform_rows(const float* src, float* out, int64_t rows, int64_t n) const {
    const int64_t p = n / m;
    const float scale_p = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p)));
    float* work = m > 1 ? scratch<float>(0, static_cast<size_t>(rows * n)) : out;
    float* t = scratch<float>(1, static_cast<size_t>(p * kLanes));
    if (has_avx2())
      transform_avx2(src, work, t, out, rows, n, p, scale_p);
    else
      transform_baseline(src, work, t, out, rows, n, p, scale_p);
  }

  // The transform of `rows` rows, compiled twice: for the build's baseline and for AVX2 (the same
  // operations in the same order, so both give the same bits; -ffp-contract=off keeps FMA out of both).
#if defined(__x86_64__) || defined(__i386__)
  __attribute__((target("avx2")))
#endif
  void transform_avx2(const float* src, float* work, float* t, float* out, int64_t rows, int64_t n, int64_t p,
                      float scale_p) const {
    transform(src, work, t, out, rows, n, p, scale_p);
  }

  void transform_baseline(const float* src, float* work, float* t, float* out, int64_t rows, int64_t n, int64_t p,
                          float scale_p) const {
    transform(src, work, t, out, rows, n, p, scale_p);
  }

  // The length-p blocks of the rows are `count` vectors; butterflies run on kLanes of them at a time,
  // transposed (in t) so that every add and subtract is one SIMD operation over the lanes. With m > 1 the
  // blocks go to `work` and the m part mixes them into `out`; otherwise work is out.
  ROTGRAPH_INLINE void transform(const float* src, float* work, float* t, float* out, int64_t rows, int64_t n,
                                 int64_t p, float scale_p) const {
    const int64_t count = rows * m;
    if (p == 8 || p == 16 || p == 32) {  // short blocks: a dense multiply beats transposing for butterflies
      const v8* b = sylvester_rows(p);
      for (int64_t v = 0; v < count; ++v) small_block(b, src + v * p, work + v * p, p);
    } else {
      for (int64_t v0 = 0; v0 < count; v0 += kLanes) {
        const int64_t lanes = std::min<int64_t>(kLanes, count - v0);
        for (int64_t l = 0; l < lanes; ++l)
          for (int64_t k = 0; k < p; ++k) t[k * kLanes + l] = src[(v0 + l) * p + k] * scale_p;
        butterflies(t, p);
        for (int64_t l = 0; l < lanes; ++l)
          for (int64_t k = 0; k < p; ++k) work[(v0 + l) * p + k] = t[k * kLanes + l];
      }
    }
    if (m > 1)
      for (int64_t r = 0; r < rows; ++r) mix(work + r * n, out + r * n, p);
  }

  static constexpr int64_t kLanes = 16;

  // dst = src @ B / sqrt(p) for p in {8, 16, 32}, B the Sylvester matrix (entries (-1)^popcount(j & k)).
  static ROTGRAPH_INLINE void small_block(const v8* rows, const float* src, float* dst, int64_t p) {
    const int nv = static_cast<int>(p / 8);
    v8 acc[4] = {};
    for (int64_t j = 0; j < p; ++j) {
      const float x = src[j];
      for (int q = 0; q < nv; ++q) acc[q] += x * rows[j * nv + q];
    }
    for (int q = 0; q < nv; ++q) store8(dst + 8 * q, acc[q]);
  }

  // B / sqrt(p) row-major as SIMD values, built once per size (thread-safe static initialization).
  static const v8* sylvester_rows(int64_t p) {
    auto build = [](int64_t size) {
      std::vector<float> b(static_cast<size_t>(size * size));
      const float s = static_cast<float>(1.0 / std::sqrt(static_cast<double>(size)));
      for (int64_t j = 0; j < size; ++j)
        for (int64_t k = 0; k < size; ++k) b[j * size + k] = (__builtin_popcountll(j & k) & 1) ? -s : s;
      std::vector<v8> rows(static_cast<size_t>(size * size / 8));
      for (size_t i = 0; i < rows.size(); ++i) rows[i] = load8(b.data() + 8 * i);
      return rows;
    };
    static const std::vector<v8> b8 = build(8), b16 = build(16), b32 = build(32);
    return p == 8 ? b8.data() : p == 16 ? b16.data() : b32.data();
  }

  // In-place Walsh-Hadamard transform (Sylvester order) of kLanes interleaved vectors of length p.
  static ROTGRAPH_INLINE void butterflies(float* t, int64_t p) {
    for (int64_t h = 1; h < p; h <<= 1)
      for (int64_t i = 0; i < p; i += 2 * h)
        for (int64_t k = i; k < i + h; ++k) {
          float* a = t + k * kLanes;
          float* b = t + (k + h) * kLanes;
          for (int64_t l = 0; l < kLanes; l += 8) {
            const v8 u = load8(a + l), w = load8(b + l);
            store8(a + l, u + w);
            store8(b + l, u - w);
          }
        }
  }
};

// The dynamic quantizer shared by FakeQuant and the KV-cache kernels. Its grid and arithmetic are stated
// once in rotgraph/grid.py (and written as ONNX ops by rotgraph/fakequant.py and rotgraph/kvcache.py);
// this restates them in float32 and tests/test_grid.py checks the two bit for bit on edge values:
//   grid        symmetric [-2^(b-1), 2^(b-1) - 1], asymmetric [0, 2^b - 1]
//   symmetric   scale = max(max|x| * float(clip / qmax), 1e-8), code = clip(round(x / scale), qmin, qmax)
//   asymmetric  hi = max(max x, 0) * clip, lo = min(min x, 0) * clip, scale = max((hi - lo) / qmax, 1e-8),
//               zero = round(-lo / scale), code = clip(round(x / scale) + zero, 0, qmax)
// with round half to even (nearbyint in the default rounding mode). A group holding a NaN or an infinity
// has scale NaN (the bodies add sum(0 * x) to it), so every output of the group is NaN.
struct Quantizer {
  static constexpr int64_t kMinBits = 2, kMaxBits = 16;  // the float grid bounds stay exact and qmax > 0
  static constexpr float kEps = 1e-8f;                   // grid.EPS

  int64_t bits = 8;
  bool symmetric = true;
  float clip = 1.0f;

  float qmax() const { return symmetric ? float((1 << (bits - 1)) - 1) : float((1 << bits) - 1); }
  float qmin() const { return symmetric ? -float(1 << (bits - 1)) : 0.0f; }

  void validate(Checked& checked, const char* op) const {
    checked.check(bits >= kMinBits && bits <= kMaxBits, std::string(op) + ": bits " + std::to_string(bits) +
                                                            " outside [2, 16]");
    checked.check(std::isfinite(clip) && clip > 0.0f, std::string(op) + ": clip must be a positive finite number");
  }

  // scale and zero point of one group
  void params(const float* v, int64_t g, float& scale, float& zero) const {
    bool finite = true;
    for (int64_t i = 0; i < g; ++i) finite &= std::isfinite(v[i]);
    if (!finite) {
      scale = zero = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    if (symmetric) {
      float amax = 0.0f;
      int64_t i = 0;
#if defined(__SSE4_1__)
      // the same maximum four lanes at a time (a maximum of finite values is exact in any order)
      const __m128 magnitude = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
      __m128 lanes = _mm_setzero_ps();
      for (; i + 4 <= g; i += 4) lanes = _mm_max_ps(lanes, _mm_and_ps(_mm_loadu_ps(v + i), magnitude));
      float lane[4];
      _mm_storeu_ps(lane, lanes);
      amax = std::max(std::max(lane[0], lane[1]), std::max(lane[2], lane[3]));
#endif
      for (; i < g; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float ratio = static_cast<float>(static_cast<double>(clip) / qmax());
      scale = std::max(amax * ratio, kEps);
      zero = 0.0f;
    } else {
      float hi = v[0], lo = v[0];
      for (int64_t i = 1; i < g; ++i) {
        hi = std::max(hi, v[i]);
        lo = std::min(lo, v[i]);
      }
      hi = std::max(hi, 0.0f) * clip;
      lo = std::min(lo, 0.0f) * clip;
      scale = std::max((hi - lo) / qmax(), kEps);
      zero = std::nearbyint(-lo / scale);
    }
  }

  // o = (code(v) - zero) * scale for a group of g values with these parameters: code() four lanes at a time
  // where SSE4.1 is there (division, round half to even, clamp: the same IEEE operations, so the same bits;
  // a NaN group, whose every output is NaN, takes the scalar code).
  void fake_quant(const float* v, float* o, int64_t g, float scale, float zero) const {
    int64_t i = 0;
#if defined(__SSE4_1__)
    if (!std::isnan(scale)) {
      const __m128 s = _mm_set1_ps(scale), z = _mm_set1_ps(zero), lo = _mm_set1_ps(qmin()), hi = _mm_set1_ps(qmax());
      for (; i + 4 <= g; i += 4) {
        __m128 c = _mm_round_ps(_mm_div_ps(_mm_loadu_ps(v + i), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (!symmetric) c = _mm_add_ps(c, z);
        c = _mm_min_ps(hi, _mm_max_ps(lo, c));  // operand order as std::min/max: a -0 code stays -0
        _mm_storeu_ps(o + i, _mm_mul_ps(_mm_sub_ps(c, z), s));
      }
    }
#endif
    for (; i < g; ++i) o[i] = (code(v[i], scale, zero) - zero) * scale;
  }

  // The code of v as a float of the grid (NaN stays NaN, as Clip leaves it).
  float code(float v, float scale, float zero) const {
    float q = std::nearbyint(v / scale);
    if (!symmetric) q += zero;  // symmetric: no `+ 0`, which would turn a -0 into +0
    if (std::isnan(q)) return q;
    return std::min(std::max(q, qmin()), qmax());
  }
};

// A code or zero point as a stored byte. The cast of NaN (a NaN group) is undefined in C++; onnxruntime's
// Cast gives 0 on x86-64, and so does this.
inline uint8_t to_byte(float v) { return std::isnan(v) ? uint8_t{0} : static_cast<uint8_t>(v); }

struct FakeQuantKernel : Checked {
  Quantizer q;
  int64_t group = 0;

  FakeQuantKernel(const OrtApi*, const OrtKernelInfo* info) {
    q.bits = attr_required(info, "bits", *this);
    q.symmetric = attr_int(info, "symmetric", 1) != 0;
    q.clip = attr_float(info, "clip", 1.0f);
    group = attr_int(info, "group", 0);
    q.validate(*this, "FakeQuant");
    check(group >= 0, "FakeQuant: group " + std::to_string(group) + " is negative");
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<float>& x, Tensor<float>& y) {
    return guarded(*this, [&] { run(context, x, y); });
  }

  void run(OrtKernelContext* context, const Tensor<float>& x, Tensor<float>& y) {
    const std::vector<int64_t> shape = x.Shape();
    const int64_t total = x.NumberOfElement();
    const int64_t width = shape.empty() ? 1 : shape.back();
    const int64_t g = group ? group : width;
    if (total > 0 && width % g != 0)
      throw std::runtime_error("FakeQuant: group " + std::to_string(g) + " does not divide the last axis " +
                               std::to_string(width));
    float* out = y.Allocate(shape);
    if (total == 0) return;
    const float* in = x.Data();
    for_rows(context, total / g, g * 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* v = in + r * g;
        float* o = out + r * g;
        float scale, zero;
        q.params(v, g, scale, zero);
        q.fake_quant(v, o, g, scale, zero);
      }
    });
  }
};

struct CacheKernelBase : Checked {
  Quantizer q;
  int64_t head_dim = 0, group = 0;

  explicit CacheKernelBase(const OrtKernelInfo* info) {
    q.bits = attr_required(info, "bits", *this);
    q.symmetric = false;
    q.clip = attr_float(info, "clip", 1.0f);
    head_dim = attr_required(info, "head_dim", *this);
    group = attr_int(info, "group", 0);
    if (group == 0) group = head_dim;
    q.validate(*this, "KV cache kernels");
    check(q.bits == 4 || q.bits == 8, "KV cache kernels: bits must be 4 or 8, not " + std::to_string(q.bits));
    check(head_dim > 0, "KV cache kernels: head_dim must be positive");
    check(group > 0 && head_dim > 0 && head_dim % group == 0,
          "KV cache kernels: group " + std::to_string(group) + " does not divide head_dim " + std::to_string(head_dim));
    check(q.bits != 4 || head_dim % 2 == 0, "KV cache kernels: 4-bit codes pack pairs, head_dim is odd");
  }
  int64_t groups() const { return head_dim / group; }
  int64_t code_width() const { return q.bits == 4 ? head_dim / 2 : head_dim; }
};

struct KVQuantizeKernel : CacheKernelBase {
  KVQuantizeKernel(const OrtApi*, const OrtKernelInfo* info) : CacheKernelBase(info) {}

  Ort::Status Compute(OrtKernelContext* context, const Tensor<float>& x, Tensor<uint8_t>& codes, Tensor<float>& scale,
                      Tensor<uint8_t>& zero) {
    return guarded(*this, [&] { run(context, x, codes, scale, zero); });
  }

  void run(OrtKernelContext* context, const Tensor<float>& x, Tensor<uint8_t>& codes, Tensor<float>& scale,
           Tensor<uint8_t>& zero) {
    std::vector<int64_t> shape = x.Shape();
    if (shape.empty() || shape.back() != head_dim) throw std::runtime_error("KVQuantize: last axis is not head_dim");
    const int64_t rows = rows_of(shape);
    shape.back() = code_width();
    uint8_t* c = codes.Allocate(shape);
    shape.back() = groups();
    float* s = scale.Allocate(shape);
    uint8_t* z = zero.Allocate(shape);
    if (rows == 0) return;
    const float* in = x.Data();
    const int64_t half = head_dim / 2;
    for_rows(context, rows, head_dim * 4, [&](int64_t begin, int64_t end) {
      uint8_t* row = scratch<uint8_t>(0, static_cast<size_t>(head_dim));
      for (int64_t r = begin; r < end; ++r) {
        const float* v = in + r * head_dim;
        for (int64_t k = 0; k < groups(); ++k) {
          float sc, zp;
          q.params(v + k * group, group, sc, zp);
          s[r * groups() + k] = sc;
          z[r * groups() + k] = to_byte(zp);
          for (int64_t i = 0; i < group; ++i) row[k * group + i] = to_byte(q.code(v[k * group + i], sc, zp));
        }
        uint8_t* dst = c + r * code_width();
        if (q.bits == 8) {
          for (int64_t i = 0; i < head_dim; ++i) dst[i] = row[i];
        } else {
          for (int64_t i = 0; i < half; ++i) dst[i] = static_cast<uint8_t>(row[i] | (row[i + half] << 4));
        }
      }
    });
  }
};

struct KVDequantizeKernel : CacheKernelBase {
  KVDequantizeKernel(const OrtApi*, const OrtKernelInfo* info) : CacheKernelBase(info) {}

  Ort::Status Compute(OrtKernelContext* context, const Tensor<uint8_t>& codes, const Tensor<float>& scale,
                      const Tensor<uint8_t>& zero, Tensor<float>& y) {
    return guarded(*this, [&] { run(context, codes, scale, zero, y); });
  }

  void run(OrtKernelContext* context, const Tensor<uint8_t>& codes, const Tensor<float>& scale,
           const Tensor<uint8_t>& zero, Tensor<float>& y) {
    std::vector<int64_t> shape = codes.Shape();
    if (shape.empty() || shape.back() != code_width())
      throw std::runtime_error("KVDequantize: codes' last axis does not match head_dim and bits");
    const int64_t rows = rows_of(shape);
    if (scale.NumberOfElement() != rows * groups() || zero.NumberOfElement() != rows * groups())
      throw std::runtime_error("KVDequantize: scale / zero do not match the codes");
    shape.back() = head_dim;
    float* out = y.Allocate(shape);
    if (rows == 0) return;
    const uint8_t* c = codes.Data();
    const float* s = scale.Data();
    const uint8_t* z = zero.Data();
    const int64_t half = head_dim / 2;
    for_rows(context, rows, head_dim * 2, [&](int64_t begin, int64_t end) {
      float* row = scratch<float>(0, static_cast<size_t>(head_dim));
      for (int64_t r = begin; r < end; ++r) {
        const uint8_t* src = c + r * code_width();
        if (q.bits == 8) {
          for (int64_t i = 0; i < head_dim; ++i) row[i] = float(src[i]);
        } else {
          for (int64_t i = 0; i < half; ++i) {
            row[i] = float(src[i] & 15);
            row[i + half] = float(src[i] >> 4);
          }
        }
        float* o = out + r * head_dim;
        for (int64_t k = 0; k < groups(); ++k) {
          const float sc = s[r * groups() + k], zp = float(z[r * groups() + k]);
          for (int64_t i = k * group; i < (k + 1) * group; ++i) o[i] = (row[i] - zp) * sc;
        }
      }
    });
  }
};

// RoPE (onnxruntime's RotaryEmbedding, halves not interleaved) and then the Hadamard transform of every
// head, on a [batch, seq, heads * head_dim] projection output: the R3 rotation of Q or K after RoPE in one
// pass over the data. Inputs X, position_ids [batch, seq] (int64), cos_cache and sin_cache [max_position,
// head_dim / 2]; attributes head_dim, for head_dim = m * 2^k with m > 1 the Hadamard's `a`, and
// rotated_heads (0: all): only each token's first rotated_heads heads are transformed, the others copied
// (packed QKV: Q and K heads rotated, V passed through).
//   y1 = x1 * cos - x2 * sin, y2 = x2 * cos + x1 * sin (x1, x2 the halves of a head), then Hadamard(y1, y2)
struct RotaryHadamardKernel : Checked {
  HadamardKernel hadamard;
  int64_t head_dim = 0, rotated_heads = 0;

  RotaryHadamardKernel(const OrtApi* api, const OrtKernelInfo* info) : hadamard(api, info) {
    head_dim = attr_required(info, "head_dim", *this);
    rotated_heads = attr_int(info, "rotated_heads", 0);
    check(rotated_heads >= 0, "RotaryHadamard: rotated_heads is negative");
    check(hadamard.error.empty(), hadamard.error);
    check(head_dim > 0 && head_dim % 2 == 0, "RotaryHadamard: head_dim must be positive and even");
    const int64_t p = head_dim > 0 ? head_dim / hadamard.m : 0;
    check(head_dim % hadamard.m == 0 && p > 0 && (p & (p - 1)) == 0,
          "RotaryHadamard: head_dim " + std::to_string(head_dim) + " is not m x a power of two (m = " +
              std::to_string(hadamard.m) + ")");
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<float>& x, const Tensor<int64_t>& positions,
                      const Tensor<float>& cos_cache, const Tensor<float>& sin_cache, Tensor<float>& y) {
    return guarded(*this, [&] { run(context, x, positions, cos_cache, sin_cache, y); });
  }

  void run(OrtKernelContext* context, const Tensor<float>& x, const Tensor<int64_t>& positions,
           const Tensor<float>& cos_cache, const Tensor<float>& sin_cache, Tensor<float>& y) {
    const std::vector<int64_t> shape = x.Shape();
    if (shape.size() != 3 || shape[2] % head_dim != 0)
      throw std::runtime_error("RotaryHadamard: X is not [batch, seq, heads * head_dim]");
    const int64_t tokens = shape[0] * shape[1], heads = shape[2] / head_dim, half = head_dim / 2;
    const std::vector<int64_t> table = cos_cache.Shape();
    if (positions.NumberOfElement() != tokens)
      throw std::runtime_error("RotaryHadamard: position_ids is not [batch, seq]");
    if (table.size() != 2 || table[1] != half || sin_cache.Shape() != table)
      throw std::runtime_error("RotaryHadamard: cos_cache and sin_cache are not [max_position, head_dim / 2]");
    float* out = y.Allocate(shape);
    if (tokens == 0 || heads == 0) return;
    const float *in = x.Data(), *cos_data = cos_cache.Data(), *sin_data = sin_cache.Data();
    const int64_t* position = positions.Data();
    for (int64_t t = 0; t < tokens; ++t)
      if (position[t] < 0 || position[t] >= table[0])
        throw std::runtime_error("RotaryHadamard: position " + std::to_string(position[t]) + " outside the caches' " +
                                 std::to_string(table[0]));
    const int64_t rotated = rotated_heads ? rotated_heads : heads;
    if (rotated > heads)
      throw std::runtime_error("RotaryHadamard: rotated_heads " + std::to_string(rotated) + " > the " +
                               std::to_string(heads) + " heads of X");
    const int64_t rows = tokens * heads, p = head_dim / hadamard.m;
    for_rows(context, rows, head_dim * (HadamardKernel::log2(p) + hadamard.m + 2), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end;) {
        const int64_t head = r % heads;
        if (head >= rotated) {  // a head that passes through (V in packed QKV)
          std::memcpy(out + r * head_dim, in + r * head_dim, static_cast<size_t>(head_dim) * sizeof(float));
          ++r;
          continue;
        }
        const int64_t stop = std::min(end, r + rotated - head);  // this token's rotated heads in [r, end)
        for (int64_t q = r; q < stop; ++q) {
          const float* c = cos_data + position[q / heads] * half;
          const float* s = sin_data + position[q / heads] * half;
          const float* v = in + q * head_dim;
          float* o = out + q * head_dim;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = v[i], x2 = v[i + half];
            o[i] = x1 * c[i] - x2 * s[i];
            o[i + half] = x2 * c[i] + x1 * s[i];
          }
        }
        hadamard.transform_rows(out + r * head_dim, out + r * head_dim, stop - r, head_dim);
        r = stop;
      }
    });
  }
};

struct Registry {
  Ort::CustomOpDomain domain{"rotgraph"};
  std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;

  Registry() {
    const char* ep = "CPUExecutionProvider";
    ops.emplace_back(Ort::Custom::CreateLiteCustomOp<HadamardKernel>("Hadamard", ep));
    ops.emplace_back(Ort::Custom::CreateLiteCustomOp<FakeQuantKernel>("FakeQuant", ep));
    ops.emplace_back(Ort::Custom::CreateLiteCustomOp<KVQuantizeKernel>("KVQuantize", ep));
    ops.emplace_back(Ort::Custom::CreateLiteCustomOp<KVDequantizeKernel>("KVDequantize", ep));
    ops.emplace_back(Ort::Custom::CreateLiteCustomOp<RotaryHadamardKernel>("RotaryHadamard", ep));
    for (auto& op : ops) domain.Add(op.get());
  }
};

// ---- rotgraph_rotate_f64: float64 weight rotation (see the top of this file) ----

// In-place Walsh-Hadamard transform (Sylvester order: x -> x @ S_p, S_p[j][k] = (-1)^popcount(j & k)) of
// one contiguous vector of length p, a power of two: the first two stages as one radix-4 step, then one
// stage per bit, each a loop over contiguous halves (vectorized).
ROTGRAPH_INLINE void sylvester_row_f64(double* x, int64_t p) {
  int64_t h = 1;
  if (p >= 4) {
    for (int64_t i = 0; i < p; i += 4) {
      const double a = x[i] + x[i + 1], b = x[i] - x[i + 1], e = x[i + 2] + x[i + 3], f = x[i + 2] - x[i + 3];
      x[i] = a + e;
      x[i + 1] = b + f;
      x[i + 2] = a - e;
      x[i + 3] = b - f;
    }
    h = 4;
  }
  for (; h < p; h <<= 1)
    for (int64_t i = 0; i < p; i += 2 * h) {
      double* __restrict u = x + i;
      double* __restrict w = x + i + h;
      for (int64_t k = 0; k < h; ++k) {
        const double a = u[k], b = w[k];
        u[k] = a + b;
        w[k] = a - b;
      }
    }
}

// The same transform of W interleaved vectors: element k of vector c at x[k * stride + c] (a tile of W
// columns of an [p, stride] slab), each stage a loop over W contiguous values per pair of rows.
template <int64_t W>
ROTGRAPH_INLINE void sylvester_columns_f64(double* x, int64_t p, int64_t stride, int64_t width) {
  const int64_t count = W > 0 ? W : width;
  for (int64_t h = 1; h < p; h <<= 1)
    for (int64_t i = 0; i < p; i += 2 * h)
      for (int64_t k = i; k < i + h; ++k) {
        double* __restrict u = x + k * stride;
        double* __restrict w = x + (k + h) * stride;
        for (int64_t c = 0; c < count; ++c) {
          const double a = u[c], b = w[c];
          u[c] = a + b;
          w[c] = a - b;
        }
      }
}

// Doubles between blocks of a work buffer, so that blocks a power of two apart do not share cache sets.
constexpr int64_t kPad = 8;

// Four doubles as one SIMD value (one AVX register, two SSE ones).
typedef double v4d __attribute__((vector_size(32)));

ROTGRAPH_INLINE v4d load4d(const double* p) {
  v4d v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

ROTGRAPH_INLINE void store4d(double* p, v4d v) { std::memcpy(p, &v, sizeof v); }

// The m part on kMixSpan positions: out_i[c] = sum_j a[j][i] * in_j[c] for c < kMixSpan, in_j = in + j *
// in_stride, out_i = out + i * out_stride (a is +-1, so each product is exact; the sum runs over j in
// order from 0). Two outputs at a time in registers, so each input span is loaded once per pair.
constexpr int64_t kMixSpan = 16;

ROTGRAPH_INLINE void mix_span_f64(const double* in, int64_t in_stride, double* out, int64_t out_stride, int64_t m,
                                  const double* a) {
  constexpr int kV = kMixSpan / 4;
  int64_t i = 0;
  for (; i + 2 <= m; i += 2) {
    v4d acc0[kV] = {}, acc1[kV] = {};
    for (int64_t j = 0; j < m; ++j) {
      const double* v = in + j * in_stride;
      const double s0 = a[j * m + i], s1 = a[j * m + i + 1];
      for (int q = 0; q < kV; ++q) {
        const v4d x = load4d(v + 4 * q);
        acc0[q] += s0 * x;
        acc1[q] += s1 * x;
      }
    }
    for (int q = 0; q < kV; ++q) {
      store4d(out + i * out_stride + 4 * q, acc0[q]);
      store4d(out + (i + 1) * out_stride + 4 * q, acc1[q]);
    }
  }
  for (; i < m; ++i) {
    v4d acc[kV] = {};
    for (int64_t j = 0; j < m; ++j)
      for (int q = 0; q < kV; ++q) acc[q] += a[j * m + i] * load4d(in + j * in_stride + 4 * q);
    for (int q = 0; q < kV; ++q) store4d(out + i * out_stride + 4 * q, acc[q]);
  }
}

// The same for a span of `span` < kMixSpan positions (short blocks), one value at a time.
ROTGRAPH_INLINE void mix_short_f64(const double* in, int64_t in_stride, double* out, int64_t out_stride, int64_t m,
                                   const double* a, int64_t span) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < span; ++c) {
      double acc = 0.0;
      for (int64_t j = 0; j < m; ++j) acc += a[j * m + i] * in[j * in_stride + c];
      out[i * out_stride + c] = acc;
    }
}

// out block i = sum_j a[j][i] * in block j for m blocks of `length` contiguous doubles, the blocks of
// `in` `in_stride` apart, of `out` `out_stride` apart: kMixSpan positions at a time, so the m input
// spans stay in the first-level cache for all m outputs.
ROTGRAPH_INLINE void mix_f64(const double* in, double* out, int64_t m, int64_t length, int64_t in_stride,
                             int64_t out_stride, const double* a) {
  int64_t k0 = 0;
  for (; k0 + kMixSpan <= length; k0 += kMixSpan) mix_span_f64(in + k0, in_stride, out + k0, out_stride, m, a);
  if (k0 < length) mix_short_f64(in + k0, in_stride, out + k0, out_stride, m, a, length - k0);
}

// One row of length n = m * p: the butterflies on each of its m blocks, then the m part (through `work`,
// m * (p + kPad) doubles), then the scale.
ROTGRAPH_INLINE void rotate_row_f64(double* x, int64_t m, int64_t p, const double* a, const double* scale,
                                    double* work) {
  for (int64_t j = 0; j < m; ++j) sylvester_row_f64(x + j * p, p);
  if (m > 1) {
    for (int64_t j = 0; j < m; ++j) std::memcpy(work + j * (p + kPad), x + j * p, sizeof(double) * p);
    mix_f64(work, x, m, p, p + kPad, p, a);
  }
  if (scale != nullptr)
    for (int64_t k = 0; k < m * p; ++k) x[k] *= scale[k];
}

// A tile of `width` (<= kRotateTile) columns of an [n, stride] slab: copied to `work` (m blocks of p *
// width doubles, kPad apart: rows of a power-of-two stride would all fall in the same cache sets), the butterflies on
// each block of p rows there, then the m part and the scale written back into the slab.
constexpr int64_t kRotateTile = kMixSpan;  // n x 16 doubles per tile: the butterflies' passes stay in cache

template <int64_t W>
ROTGRAPH_INLINE void rotate_tile_f64(double* x, int64_t m, int64_t p, int64_t stride, int64_t width, const double* a,
                                     const double* scale, double* work) {
  const int64_t count = W > 0 ? W : width, block = p * count + kPad;
  for (int64_t j = 0; j < m; ++j)
    for (int64_t k = 0; k < p; ++k)
      std::memcpy(work + j * block + k * count, x + (j * p + k) * stride, sizeof(double) * count);
  for (int64_t j = 0; j < m; ++j) sylvester_columns_f64<W>(work + j * block, p, count, count);
  for (int64_t k = 0; k < p; ++k) {  // the m input rows of position k stay in cache for the m outputs
    double* o = x + k * stride;
    if (m == 1)
      std::memcpy(o, work + k * count, sizeof(double) * count);
    else if (count == kMixSpan)
      mix_span_f64(work + k * count, block, o, p * stride, m, a);
    else
      mix_short_f64(work + k * count, block, o, p * stride, m, a, count);
    if (scale != nullptr)
      for (int64_t i = 0; i < m; ++i) {
        double* __restrict r = o + i * p * stride;
        const double factor = scale[i * p + k];
        for (int64_t c = 0; c < count; ++c) r[c] *= factor;
      }
  }
}

ROTGRAPH_INLINE void rotate_f64(double* x, int64_t pre, int64_t m, int64_t p, int64_t post, const double* a,
                                const double* scale, double* work) {
  const int64_t n = m * p;
  for (int64_t r = 0; r < pre; ++r) {
    double* slab = x + r * n * post;
    if (post == 1) {
      rotate_row_f64(slab, m, p, a, scale, work);
    } else {
      int64_t c = 0;
      for (; c + kRotateTile <= post; c += kRotateTile)
        rotate_tile_f64<kRotateTile>(slab + c, m, p, post, kRotateTile, a, scale, work);
      if (c < post) rotate_tile_f64<0>(slab + c, m, p, post, post - c, a, scale, work);
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2")))
#endif
void rotate_f64_avx2(double* x, int64_t pre, int64_t m, int64_t p, int64_t post, const double* a, const double* scale,
                     double* work) {
  rotate_f64(x, pre, m, p, post, a, scale, work);
}

void rotate_f64_baseline(double* x, int64_t pre, int64_t m, int64_t p, int64_t post, const double* a,
                         const double* scale, double* work) {
  rotate_f64(x, pre, m, p, post, a, scale, work);
}

// ---- float16 <-> float64 conversions for the weight rewrites (rotgraph.weights, through ctypes) ----

// Whether this CPU converts float16 in hardware (F16C) and runs AVX2: the conversions below need both.
bool has_f16c() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool value = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
    return (ecx & bit_F16C) != 0 && has_avx2();
  }();
  return value;
#else
  return false;
#endif
}

#if defined(__x86_64__) || defined(__i386__)
// rows x cols float16 values (rows `src_stride` apart) -> contiguous float64 (exact); returns how many
// were not finite (exponent all ones).
__attribute__((target("avx2,f16c"))) int64_t half_to_double(const uint16_t* src, int64_t src_stride, double* dst,
                                                            int64_t rows, int64_t cols) {
  int64_t nonfinite = 0;
  const __m128i exponent = _mm_set1_epi16(0x7C00);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* s = src + r * src_stride;
    double* d = dst + r * cols;
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + c));
      const __m128i special = _mm_cmpeq_epi16(_mm_and_si128(h, exponent), exponent);
      nonfinite += __builtin_popcount(static_cast<unsigned>(_mm_movemask_epi8(special))) / 2;
      const __m256 f = _mm256_cvtph_ps(h);
      _mm256_storeu_pd(d + c, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
      _mm256_storeu_pd(d + c + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
    }
    for (; c < cols; ++c) {
      nonfinite += (s[c] & 0x7C00) == 0x7C00;
      d[c] = static_cast<double>(_cvtsh_ss(s[c]));
    }
  }
  return nonfinite;
}

// float64 -> float16 rounded to nearest, ties to even, as numpy rounds: first to float32 rounded to odd
// (truncated, the last bit set when inexact), which float32's 24 bits make exact for the second rounding,
// float32 -> float16 to nearest even in hardware.
ROTGRAPH_INLINE float round_to_odd_float(double d) {
  float f = static_cast<float>(d);
  const double back = f;
  if (back != d && d == d) {  // inexact and not NaN
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if (std::fabs(back) > std::fabs(d)) bits -= 1;  // one step toward zero (sign and magnitude)
    bits |= 1;
    std::memcpy(&f, &bits, sizeof f);
  }
  return f;
}

__attribute__((target("avx2,f16c"))) void double_to_half(const double* src, int64_t src_stride, uint16_t* dst,
                                                        int64_t dst_stride, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const double* s = src + r * src_stride;
    uint16_t* d = dst + r * dst_stride;
    int64_t c = 0;
    alignas(32) float f[8];
    for (; c + 8 <= cols; c += 8) {
      for (int k = 0; k < 8; ++k) f[k] = round_to_odd_float(s[c + k]);
      const __m128i h = _mm256_cvtps_ph(_mm256_load_ps(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + c), h);
    }
    for (; c < cols; ++c) d[c] = _cvtss_sh(round_to_odd_float(s[c]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}
#endif

}  // namespace

// x (contiguous float64, viewed as [pre, m * p, post], p a power of two) in place: every vector v along
// the middle axis becomes (v @ kron(A, S_p)) * scale, A the m x m matrix `a` (row-major, entries +-1;
// m = 1 for none), scale a vector of length m * p or null (1). Adds and subtractions in float64 (the
// AVX2 and the baseline builds do the same operations in the same order). Returns 0, or -1 on bad sizes.
// Safe to call from several threads at once on different arrays; takes no lock, allocates only its work
// buffer.
extern "C" __attribute__((visibility("default"))) int rotgraph_rotate_f64(double* x, int64_t pre, int64_t m,
                                                                         int64_t p, int64_t post, const double* a,
                                                                         const double* scale) {
  if (pre < 0 || m < 1 || p < 1 || (p & (p - 1)) != 0 || post < 1 || (m > 1 && a == nullptr)) return -1;
  try {
    std::vector<double> work(post > 1 || m > 1 ? static_cast<size_t>(m * (p * std::min(kRotateTile, post) + kPad)) : 0);
    if (has_avx2())
      rotate_f64_avx2(x, pre, m, p, post, a, scale, work.data());
    else
      rotate_f64_baseline(x, pre, m, p, post, a, scale, work.data());
  } catch (const std::exception&) {
    return -1;
  }
  return 0;
}

// rows x cols float16 values (rows src_stride elements apart) -> contiguous float64, exactly. Returns how
// many were not finite, or -1 where this CPU has no F16C and AVX2 (rotgraph then converts in numpy).
extern "C" __attribute__((visibility("default"))) int64_t rotgraph_half_to_double(const uint16_t* src,
                                                                                 int64_t src_stride, double* dst,
                                                                                 int64_t rows, int64_t cols) {
#if defined(__x86_64__) || defined(__i386__)
  if (has_f16c() && rows >= 0 && cols >= 0) return half_to_double(src, src_stride, dst, rows, cols);
#endif
  return -1;
}

// rows x cols float64 values -> float16 (each side's rows `stride` elements apart), rounded to nearest
// with ties to even (numpy's astype). Returns 0, or -1 where this CPU has no F16C and AVX2.
extern "C" __attribute__((visibility("default"))) int rotgraph_double_to_half(const double* src, int64_t src_stride,
                                                                             uint16_t* dst, int64_t dst_stride,
                                                                             int64_t rows, int64_t cols) {
#if defined(__x86_64__) || defined(__i386__)
  if (has_f16c() && rows >= 0 && cols >= 0) {
    double_to_half(src, src_stride, dst, dst_stride, rows, cols);
    return 0;
  }
#endif
  return -1;
}

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base == nullptr ? nullptr : api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An onnxruntime older than these headers: report it through the oldest API, which every release has.
    const OrtApi* oldest = api_base == nullptr ? nullptr : api_base->GetApi(1);
    if (oldest == nullptr) return nullptr;  // nothing to report with: register nothing (the bodies run)
    const std::string message = "librotgraph_ops needs onnxruntime's C API version " +
                                std::to_string(ORT_API_VERSION) + " (onnxruntime 1." +
                                std::to_string(ORT_API_VERSION) + ") or newer; this onnxruntime is " +
                                api_base->GetVersionString();
    return oldest->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  static std::mutex mutex;
  static std::unique_ptr<Registry> registry;
  try {
    std::lock_guard<std::mutex> lock(mutex);
    if (!registry) registry = std::make_unique<Registry>();
    Ort::UnownedSessionOptions(options).Add(registry->domain);
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
