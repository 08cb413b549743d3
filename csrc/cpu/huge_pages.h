// Large CPU outputs on transparent huge pages.
//
// The CPU backward writes each entry of its fresh N x M gradient once. Memory that large is new
// to the process (glibc maps every allocation above 32 MB anew), and Linux faults it in on the
// first write 4 KB at a time: at N = M = 4096 (64 MB) 16384 faults, about 16 of the backward's
// 36 ms on two cores (docs/design.md, section 5). Where a range is advised MADV_HUGEPAGE and the
// kernel's transparent huge pages are "madvise" (the usual default) or "always", it is faulted in
// 2 MB at a time instead. torch does the same for all its large CPU tensors, but only on request
// (THP_MEM_ALLOC_ENABLE=1); this advises the one buffer fastap fills whole, at once.
//
// Only buffers of at least kMinHugePageAdviceBytes are advised: 32 MiB, glibc's largest mmap
// threshold on 64-bit systems, from which on every allocation is a mapping of its own, faulted in
// anew and unmapped whole when freed. Smaller buffers come, after the first few, from memory the
// heap recycles, already faulted in; advised, they were slower (N = M = 2048, 16 MB: 10 to 14 ms
// for the loss against 8.5 in one session; most likely the kernel splits the huge pages of the
// heap's memory when glibc trims it, and faults them in again). Of an advised buffer only the
// whole 2 MB pages are advised; nothing else about the memory changes (its contents, its owner,
// when it is freed), and the values computed are the same either way. On the project's virtual
// machine the first few advised buffers of a process sometimes took longer than 4 KB pages would
// (up to ~100 ms at 64 MB), the later ones about half as long (docs/design.md, section 5).
// FASTAP_CPU_HUGE_PAGES=0 in the environment turns the advice off (read at each call); elsewhere
// than Linux there is none.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastap {

constexpr std::size_t kHugePageBytes = std::size_t(2) << 20;
constexpr std::size_t kMinHugePageAdviceBytes = std::size_t(32) << 20;

inline bool huge_page_advice_enabled() {
  const char* setting = std::getenv("FASTAP_CPU_HUGE_PAGES");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

// Advises the whole huge pages inside [data, data + bytes) before they are first written. Best
// effort: a refusal (a kernel without transparent huge pages, say) leaves the memory as it was.
inline void advise_huge_pages(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kMinHugePageAdviceBytes || !huge_page_advice_enabled()) return;
  const std::uintptr_t start = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t first = (start + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const std::uintptr_t last = (start + bytes) & ~(kHugePageBytes - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace fastap
