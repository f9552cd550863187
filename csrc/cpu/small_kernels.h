// Small dense kernels on raw pointers for the CPU's per-task and per-batch loops: register-blocked
// GEMMs (GCC/Clang vector extensions), the elementwise pieces of an MLP's forward and backward pass,
// and the losses with their gradients (small_kernels_impl.h). namespace small holds them compiled for
// AVX2 + FMA, which may run only where cpu_has_avx2_fma() says so; callers keep their own loops inside
// the same target region (METALEARN_FAST_BEGIN_AVX2 / METALEARN_FAST_END_AVX2) so that these calls
// inline. The MAML per-task kernel also compiles them for AVX-512 (cpu/maml_mlp_cpu.cpp), which runs
// where cpu_simd() is CpuSimd::kAvx512.
#pragma once
#include <ATen/ATen.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

#include "composite/maml_mlp.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define METALEARN_FAST_SMALL_KERNELS 1
#if defined(__clang__)
#define METALEARN_FAST_BEGIN_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define METALEARN_FAST_END_AVX2 _Pragma("clang attribute pop")
#else
#define METALEARN_FAST_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define METALEARN_FAST_END_AVX2 _Pragma("GCC pop_options")
#endif
// AVX-512 F and VL: 512-bit registers, and 32 vector registers at every width
#if defined(__clang__)
#define METALEARN_FAST_BEGIN_AVX512                                                                  \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,avx512f,avx512vl\"))), apply_to = function)")
#define METALEARN_FAST_END_AVX512 _Pragma("clang attribute pop")
#else
#define METALEARN_FAST_BEGIN_AVX512 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,avx512f,avx512vl\")")
#define METALEARN_FAST_END_AVX512 _Pragma("GCC pop_options")
#endif
#endif

namespace metalearn_fast {

// Which of the hand-written CPU kernels run: none (ATen's composites), the AVX2 + FMA ones, or those and the
// AVX-512 per-task MAML kernel. cpu_simd() is the best this CPU has (checked at run time), lowered by the
// environment variable METALEARN_FAST_CPU_SIMD ("none", "avx2", "avx512") or by set_cpu_simd (tests force
// each path on one machine this way). Never higher than the CPU has.
enum class CpuSimd { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

CpuSimd cpu_simd_available();
CpuSimd cpu_simd();
// Sets the level (capped at cpu_simd_available()) and returns the one before.
CpuSimd set_cpu_simd(CpuSimd level);
const char* cpu_simd_name(CpuSimd level);
// The level named `name` ("none", "avx2", "avx512") into *level; false for any other name.
bool cpu_simd_from_name(const char* name, CpuSimd* level);

// Whether the AVX2 + FMA kernels below run.
inline bool cpu_has_avx2_fma() { return cpu_simd() >= CpuSimd::kAvx2; }

// The per-task and per-batch CPU kernels take MLPs whose every weight has at most this many elements:
// a layer's weights and activations then stay in the core's L1/L2 caches.
constexpr int64_t kMaxSmallLayer = 128 * 128;

// Whether the per-task kernel multiplies by a layer's weight W [out, in] as it is (mm_nt: dot products along its
// rows), not by W^T: for long rows, where a transpose per task and step of W (and of the Hessian product's
// direction) costs more than the dot products' sums across lanes.
// (Omniglot-sized MLP, 784 inputs: 1.24x faster second order, 1.16x first; 256 inputs gained nothing more.)
inline bool reads_weight_rows(int64_t in) { return in >= 512; }

#ifdef METALEARN_FAST_SMALL_KERNELS
namespace small {
METALEARN_FAST_BEGIN_AVX2
constexpr int kVectorBytes = 32;
#include "cpu/small_kernels_impl.h"
METALEARN_FAST_END_AVX2
}  // namespace small
#endif  // METALEARN_FAST_SMALL_KERNELS

}  // namespace metalearn_fast
