// pin(pointer): keeps a pointer in registers once computed. On the GPU the optimiser may otherwise
// recompute it (and the tests that chose it) from the kernel's arguments before every load, so
// that a lookup costs a 64-bit address computation instead of one multiply-add on the pointer.
// Device code only; a no-op on the host (tests/emulation).
#pragma once

namespace fastap {

template <typename T>
__device__ __forceinline__ void pin(T*& pointer) {
#ifdef __CUDA_ARCH__
  asm("" : "+l"(pointer));
#else
  (void)pointer;
#endif
}

}  // namespace fastap
