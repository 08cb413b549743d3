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
// Only the whole 2 MB pages inside the buffer are advised, and only for buffers of at least
// kMinBytes; nothing else about the memory changes (its contents, its owner, when it is freed).
// The values computed are the same either way. FASTAP_CPU_HUGE_PAGES=0 in the environment turns
// the advice off (read at each call); elsewhere than Linux there is none.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastap {

// Two huge pages: every buffer this large holds at least one whole, aligned one.
constexpr std::size_t kHugePageBytes = std::size_t(2) << 20;
constexpr std::size_t kMinHugePageAdviceBytes = 2 * kHugePageBytes;

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
