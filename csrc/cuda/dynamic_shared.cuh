// The kernels' dynamic shared memory, declared as an `unsigned char*` named `name`, 128-byte
// aligned: the kernels lay their regions out at multiples of 128 bytes from it (the fused kernels'
// WMMA operands need 32-byte alignment, cp.async and the 16-byte vector loads 16), and no kernel
// has static shared memory before it (.ci/ptxas_report.py fails one that does). The CPU emulation
// (tests/emulation/cuda_host.h) defines its own before including the kernels.
#pragma once

#ifndef FASTAP_DYNAMIC_SHARED
#define FASTAP_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif
