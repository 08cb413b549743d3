// Large CPU outputs on transparent huge pages, on request (FASTAP_CPU_HUGE_PAGES=1).
//
// The CPU backward writes each entry of its fresh N x M gradient once. Memory that large is
// usually new to the process, and Linux faults it in on the first write 4 KB at a time: at
// N = M = 4096 (64 MB) 16384 faults, about 14 to 16 ms of a 36 ms backward on two cores
// (docs/design.md, section 5). In a range advised MADV_HUGEPAGE, where the kernel's transparent
// huge pages are "madvise" (Debian's and Ubuntu's default), it faults in 2 MB at a time instead.
// Where rows have few candidates (M near Q) the N x Q histograms of the forward and their
// gradients from the AP formula's backward are as large, four such tensors: at 2^20 x 16, Q = 20,
// their faults were half of a loss call (benchmarks/RESULTS.md).
//
// So with FASTAP_CPU_HUGE_PAGES=1 in the environment (read at each call), where that mode is on,
// each of those outputs (the score gradient, n and p, grad_n and grad_p) of at least 32 MiB (16
// huge pages, where those are larger than 2 MB: min_huge_page_output_bytes) gets a mapping of its
// own: anonymous, aligned to a huge page, its length rounded up to whole huge pages, advised
// MADV_HUGEPAGE, and unmapped when the tensor's storage is freed, so that the advice never lands
// on memory an allocator hands out again. (torch does the like for all its large CPU tensors, on
// request: THP_MEM_ALLOC_ENABLE=1.)
// Otherwise, and with "always" (the kernel already backs large mappings with huge pages), "never"
// or no transparent huge pages (other systems, gVisor), the tensor comes from at::empty.
// The values computed are the same either way. Such a tensor's storage cannot grow (resize_ to
// more elements raises), as for any tensor made from_blob, and the CPU memory profiler does not
// see it.
//
// On request only: on the project's virtual machine (which hands free memory back to its host)
// a process's first few calls writing new huge pages took ~100 ms instead of ~20 at 64 MB, and a
// call every couple of seconds after took 80 to 300 ms; in a loop of 200 calls the backward still
// took about three quarters as long in all (median 21 ms against 35; docs/design.md, section 5).
// A loop with seconds between its losses could lose on such a machine; on bare metal it should not.
// 32 MiB: smaller tensors mostly come from heap memory that glibc recycles (below its largest
// mmap threshold, 32 MiB on 64-bit systems), already faulted in; a mapping of their own would add
// the faults back.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>

#include "../environment.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastap {

constexpr std::size_t kMinHugePageBytes = std::size_t(32) << 20;

// The size of a transparent huge page (read once per process): 2 MB on x86-64 and on aarch64 with
// 4 KB pages, but 32 MB with 16 KB pages and 512 MB with 64 KB pages (aarch64 kernels built for
// them, common on ARM servers). 2 MB where the kernel does not say.
inline std::size_t huge_page_bytes() {
  static const std::size_t bytes = [] {
    std::ifstream setting("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size");
    unsigned long long size = 0;
    setting >> size;
    // (a power of two, or the default)
    return size > 0 && (size & (size - 1)) == 0 ? static_cast<std::size_t>(size)
                                                 : std::size_t(2) << 20;
  }();
  return bytes;
}

// The smallest output that gets a mapping of its own: 32 MiB, or 16 huge pages where those are
// larger than 2 MB, so that rounding up to whole pages adds at most a sixteenth.
inline std::size_t min_huge_page_output_bytes() {
  return std::max(kMinHugePageBytes, 16 * huge_page_bytes());
}

// Whether the kernel's transparent huge pages are in "madvise" mode (read once per process).
inline bool huge_pages_on_advice() {
  static const bool on_advice = [] {
    std::ifstream setting("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string modes;
    std::getline(setting, modes);
    return modes.find("[madvise]") != std::string::npos;
  }();
  return on_advice;
}

inline bool huge_pages_requested() { return environment_switch("FASTAP_CPU_HUGE_PAGES"); }

// An uninitialised contiguous tensor: on huge pages of its own mapping where that helps (above),
// else from at::empty. (The signature of HistogramInputs::empty_histograms's `empty`.)
inline at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, at::TensorOptions options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const std::size_t bytes = static_cast<std::size_t>(c10::multiply_integers(sizes)) *
                            options.dtype().itemsize();
  if (huge_pages_requested() && huge_pages_on_advice() && bytes >= min_huge_page_output_bytes()) {
    const std::size_t page = huge_page_bytes();
    const std::size_t length = (bytes + page - 1) & ~(page - 1);
    // Map one huge page more than needed, keep the aligned `length` bytes inside, unmap the rest.
    void* mapped =
        mmap(nullptr, length + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped != MAP_FAILED) {
      const std::uintptr_t start = reinterpret_cast<std::uintptr_t>(mapped);
      const std::uintptr_t aligned = (start + page - 1) & ~(page - 1);
      if (aligned > start) munmap(mapped, aligned - start);
      const std::uintptr_t tail = start + length + page - (aligned + length);
      if (tail > 0) munmap(reinterpret_cast<void*>(aligned + length), tail);
      void* data = reinterpret_cast<void*>(aligned);
      madvise(data, length, MADV_HUGEPAGE);  // best effort: a refusal leaves 4 KB pages
      return at::from_blob(
          data, sizes, [length](void* p) { munmap(p, length); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace fastap
