// Integer-dot kernels, plain AVX2 (every machine the extension runs on); see quant_dot_256.h.
#define QD_TARGET __attribute__((target("avx2,fma,f16c")))
#define QD_VNNI 0
#define QD_NAME rows_avx2
#include "cpu/quant_dot_256.h"
