// The bfloat16 CPU kernels, built for the baseline instruction set of the
// target. One file per dtype and instruction set, so that they compile side
// by side (cpu_loss_kernel_args.h).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu_loss_kernel.h"

KF_DEFINE_CPU_KERNELS(c10::BFloat16, BFloat16)
