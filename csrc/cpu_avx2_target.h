// Switches the rest of a translation unit to AVX2 + FMA (x86-64 with GCC):
// include it LAST among the shared headers, right before a kernel header
// (see cpu_loss_kernel_avx2.cpp for why everything that handles vectors must
// come after the pragma, and everything shared before it).
#pragma once

#include "cpu_loss_kernel_args.h"  // KF_HAVE_AVX2_KERNELS

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
#endif
