// pdl_rows (cpu/pdl_rows.h) compiled for AVX2, for float32 and float64 rows. pdl.cpp calls it
// only on a CPU that has AVX2, BMI2 and POPCNT (see cpu/isa.h for why this file is safe to link
// with the baseline build).
#include "cpu/isa.h"  // every standard header, before the target pragma

#if FASTLOSS_HAVE_AVX2_BUILD
#pragma GCC target("avx2,bmi,bmi2,popcnt")
#undef FASTLOSS_CPU_ISA
#define FASTLOSS_CPU_ISA avx2
#define FASTLOSS_AVX2 1
#include "cpu/pdl_rows.h"

namespace fastloss {
void pdl_rows_avx2(const PdlRows<float, float>& a, int64_t begin, int64_t end) { avx2::pdl_rows(a, begin, end); }
void pdl_rows_avx2(const PdlRows<double, double>& a, int64_t begin, int64_t end) { avx2::pdl_rows(a, begin, end); }
}  // namespace fastloss
#endif
