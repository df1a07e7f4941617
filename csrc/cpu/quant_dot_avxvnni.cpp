// Integer-dot kernels with AVX-VNNI (256-bit vpdpbusd without AVX-512), chosen at run time by
// CPUID (quant_dot.cpp); see quant_dot_256.h.
#define QD_TARGET __attribute__((target("avx2,fma,f16c,avxvnni")))
#define QD_VNNI 1
#define QD_NAME rows_avxvnni
#include "cpu/quant_dot_256.h"
