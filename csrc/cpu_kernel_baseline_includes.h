// The headers a CPU kernel translation unit includes BEFORE it chooses an
// instruction set (cpu_avx2_target.h). The inline functions they define (c10's
// error types, shared_ptr internals, ...) are then compiled for the baseline,
// so the copy the linker keeps, whichever object it comes from, runs on any
// x86-64. Only ATen's Vectorized<> and the kernels themselves come after the
// target pragma: a template over Vectorized<> defined before it would be
// compiled without AVX and pass __m256 values with the wrong calling
// convention.
#pragma once

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

#include "cpu_loss_kernel_args.h"
