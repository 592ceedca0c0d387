// The CPU sequence kernel built for AVX2 + FMA, chosen at run time like the
// row kernels (cpu_loss_kernel_avx2.cpp explains the include order: shared
// headers before the target pragma, vector code after it).
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu_sequence_kernel_args.h"
#include "cpu_avx2_target.h"

#if KF_HAVE_AVX2_KERNELS
#include "cpu_sequence_kernel.h"
#endif
