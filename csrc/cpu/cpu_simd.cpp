// Which hand-written CPU kernels run (cpu/small_kernels.h): the CPU's features, checked once, capped by
// METALEARN_FAST_CPU_SIMD and by set_cpu_simd.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cpu/small_kernels.h"

namespace metalearn_fast {
namespace {

CpuSimd detect() {
#ifdef METALEARN_FAST_SMALL_KERNELS
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return CpuSimd::kNone;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return CpuSimd::kAvx512;
  return CpuSimd::kAvx2;
#else
  return CpuSimd::kNone;
#endif
}

CpuSimd from_environment(CpuSimd available) {
  const char* value = std::getenv("METALEARN_FAST_CPU_SIMD");
  CpuSimd level = available;
  // metalearn_fast/_ext.py refuses other values before the extension loads
  if (value == nullptr || !cpu_simd_from_name(value, &level)) return available;
  return level < available ? level : available;
}

std::atomic<int>& current() {
  static std::atomic<int> level{static_cast<int>(from_environment(cpu_simd_available()))};
  return level;
}

}  // namespace

CpuSimd cpu_simd_available() {
  static const CpuSimd available = detect();
  return available;
}

CpuSimd cpu_simd() { return static_cast<CpuSimd>(current().load(std::memory_order_relaxed)); }

CpuSimd set_cpu_simd(CpuSimd level) {
  const CpuSimd capped = level < cpu_simd_available() ? level : cpu_simd_available();
  return static_cast<CpuSimd>(current().exchange(static_cast<int>(capped)));
}

bool cpu_simd_from_name(const char* name, CpuSimd* level) {
  for (CpuSimd candidate : {CpuSimd::kNone, CpuSimd::kAvx2, CpuSimd::kAvx512}) {
    if (std::strcmp(name, cpu_simd_name(candidate)) == 0) {
      *level = candidate;
      return true;
    }
  }
  return false;
}

const char* cpu_simd_name(CpuSimd level) {
  switch (level) {
    case CpuSimd::kAvx512:
      return "avx512";
    case CpuSimd::kAvx2:
      return "avx2";
    default:
      return "none";
  }
}

}  // namespace metalearn_fast
