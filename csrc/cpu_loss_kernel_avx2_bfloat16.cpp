// The bfloat16 CPU kernels, built for AVX2 + FMA (x86-64 with GCC); chosen at
// run time when torch reports at least AVX2 (ATEN_CPU_CAPABILITY=default
// forces the baseline build). One file per dtype and instruction set, so that
// they compile side by side (cpu_loss_kernel_args.h).
#include "cpu_kernel_baseline_includes.h"
#include "cpu_avx2_target.h"  // last: everything after it is built for AVX2

#if KF_HAVE_AVX2_KERNELS
#include "cpu_loss_kernel.h"

KF_DEFINE_CPU_KERNELS(c10::BFloat16, BFloat16)
#endif
