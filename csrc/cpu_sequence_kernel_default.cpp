// The CPU sequence kernel built for the baseline instruction set of the target.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu_sequence_kernel.h"
