// The CPU instruction sets the sorting kernels are compiled for, chosen at run time.
//
// cpu/radix_sort.h and cpu/pdl_rows.h are compiled twice: for the baseline of the build (by
// pdl.cpp) and, on x86-64 with GCC, for AVX2 (by pdl_avx2.cpp, under a
// `#pragma GCC target`). Their code lives in `inline namespace FASTLOSS_CPU_ISA`, named per
// translation unit, so that no function compiled for AVX2 can stand in for a baseline one at
// link time. Every standard header they use is included here, before any target pragma: the
// standard templates are then compiled for the baseline wherever they are instantiated, and
// only inlined into the AVX2 code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

#ifndef FASTLOSS_CPU_ISA
#define FASTLOSS_CPU_ISA baseline
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // GCC: `#pragma GCC target`
#define FASTLOSS_HAVE_AVX2_BUILD 1
#include <immintrin.h>
#else
#define FASTLOSS_HAVE_AVX2_BUILD 0
#endif
