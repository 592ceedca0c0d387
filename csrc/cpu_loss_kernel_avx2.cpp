// The CPU kernels built for AVX2 + FMA (x86-64 with GCC); chosen at run time
// when torch reports at least AVX2 (ATEN_CPU_CAPABILITY=default forces the
// baseline build).
//
// Shared headers are included BEFORE the target pragma, so that the inline
// functions they define are compiled for the baseline and the copy the linker
// keeps runs on any x86-64. Only ATen's Vectorized<> (namespace at::vec::AVX2)
// and this file's kernels (koemorph_fused::cpu::AVX2) are built for AVX2.
// Nothing that handles vectors may come before the pragma: a template over
// Vectorized<> defined there would be compiled without AVX and pass __m256
// values with the wrong calling convention (loss_math.h comes after it).
#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu_loss_kernel_args.h"

#if KF_HAVE_AVX2_KERNELS
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wpsabi"  // lambdas in ATen's vec headers return __m256
// GCC's C++ front end does not define the ISA macros for a target pragma;
// sleef.h (reached through Vectorized<float>) declares its 256-bit functions
// only when they are defined.
#ifndef __AVX2__
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu_loss_kernel.h"
#endif
