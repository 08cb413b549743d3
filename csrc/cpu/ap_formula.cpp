// CPU kernels of fastap::ap_from_histograms and fastap::ap_from_histograms_backward: the row
// formula of ../ap_formula.h over the query rows. float32 rows go several at a time through the
// lanes of cpu/float_lanes.h (one row a lane, the same bits as one at a time): 16 with AVX-512,
// 8 with AVX2, else 4; float64 rows, and float32 rows longer than kMaxLaneBins, one at a time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../ap_formula.h"
#include "../ap_inputs.h"
#include "float_lanes.h"
#include "huge_pages.h"

namespace fastap {
namespace {

// Rows per parallel task: a few thousand bins' work.
int64_t rows_grain(int64_t num_bins) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, num_bins));
}

// One call's data: the histograms and counts it reads, what it writes (the AP for the forward,
// the two gradients for the backward), and grad_ap (backward only).
template <typename T>
struct Rows {
  const T* n;
  const T* p;
  const int64_t* positives;
  const T* grad_ap;
  int64_t q;
  ApVariant variant;
  T* ap;
  T* grad_n;
  T* grad_p;
};

template <bool backward, typename T>
void rows_one_at_a_time(const Rows<T>& rows, int64_t begin, int64_t end) {
  const int64_t q = rows.q;
  for (int64_t i = begin; i < end; ++i) {
    const T positives = static_cast<T>(rows.positives[i]);
    if (backward) {
      ap_row_backward(rows.grad_ap[i], rows.n + i * q, rows.p + i * q, q, positives, rows.variant,
                      rows.grad_n + i * q, rows.grad_p + i * q);
    } else {
      rows.ap[i] = ap_row(rows.n + i * q, rows.p + i * q, q, positives, rows.variant);
    }
  }
}

#if FASTAP_FLOAT_LANES
constexpr int64_t kFloatsPerLine = 16;  // of a 64-byte cache line

// Longer rows go one at a time: the lanes' scratch, 4 q FloatLanes (up to 256 q bytes) a task,
// stays small.
constexpr int64_t kMaxLaneBins = 1024;

// Rows [begin, end) W at a time: each block's histograms are copied into lanes (bin k of its rows
// in lanes[k]), the formula runs once for the block, and its results are copied out. A block
// short of W rows fills its other lanes with its first row, counted as a row without positives,
// and drops what they give. `scratch`: room for 4 q FloatLanes<W>, aligned for them.
template <bool backward, int W>
inline void rows_in_lanes(const Rows<float>& rows, int64_t begin, int64_t end, void* scratch) {
  using Lanes = FloatLanes<W>;
  constexpr int kWidth = W;
  const int64_t q = rows.q;
  Lanes* n = static_cast<Lanes*>(scratch);
  Lanes* p = n + q;
  Lanes* grad_n = n + 2 * q;
  Lanes* grad_p = n + 3 * q;
  for (int64_t first = begin; first < end; first += kWidth) {
    const int count = static_cast<int>(std::min<int64_t>(kWidth, end - first));
    int64_t offsets[kWidth];  // of each lane's row in n and p
    Lanes positives(0.0f), grad_ap(0.0f);
    for (int lane = 0; lane < kWidth; ++lane) {
      const int64_t row = first + (lane < count ? lane : 0);
      offsets[lane] = row * q;
      if (lane < count) {
        positives.set(lane, static_cast<float>(rows.positives[row]));
        if (backward) grad_ap.set(lane, rows.grad_ap[row]);
      }
    }
    // The block after next on its way into the cache meanwhile (without it, 16 lanes over rows
    // in memory took twice as long as in the cache).
    const int64_t ahead_end = std::min(first + 3 * kWidth, end) * q;
    for (int64_t i = (first + 2 * kWidth) * q; i < ahead_end; i += kFloatsPerLine) {
      __builtin_prefetch(rows.n + i);
      __builtin_prefetch(rows.p + i);
    }
    // (Each built in registers and stored once: lane by lane into memory, its load back would
    // wait for W stores.)
    for (int64_t k = 0; k < q; ++k) {
      n[k] = Lanes::gather(rows.n + k, offsets);
      p[k] = Lanes::gather(rows.p + k, offsets);
    }
    if (backward) {
      ap_row_backward(grad_ap, n, p, q, positives, rows.variant, grad_n, grad_p);
      for (int lane = 0; lane < count; ++lane) {
        float* grad_n_row = rows.grad_n + offsets[lane];
        float* grad_p_row = rows.grad_p + offsets[lane];
        for (int64_t k = 0; k < q; ++k) {
          grad_n_row[k] = grad_n[k][lane];
          grad_p_row[k] = grad_p[k][lane];
        }
      }
    } else {
      const Lanes ap = ap_row(n, p, q, positives, rows.variant);
      for (int lane = 0; lane < count; ++lane) rows.ap[first + lane] = ap[lane];
    }
  }
}

// rows_in_lanes compiled once for each instruction set, with everything it calls inlined into it
// (flatten): 4 lanes for the baseline of the build (SSE2 on x86-64, NEON on ARM), and on x86-64
// 8 for AVX2 and 16 for AVX-512, chosen at run time.
template <bool backward>
__attribute__((flatten)) void rows_in_lanes_baseline(const Rows<float>& rows, int64_t begin,
                                                      int64_t end, void* scratch) {
  rows_in_lanes<backward, 4>(rows, begin, end, scratch);
}

#if defined(__x86_64__)
template <bool backward>
__attribute__((target("avx2"), flatten)) void rows_in_lanes_avx2(const Rows<float>& rows,
                                                                  int64_t begin, int64_t end,
                                                                  void* scratch) {
  rows_in_lanes<backward, 8>(rows, begin, end, scratch);
}

template <bool backward>
__attribute__((target("avx512f"), flatten)) void rows_in_lanes_avx512(const Rows<float>& rows,
                                                                      int64_t begin, int64_t end,
                                                                      void* scratch) {
  rows_in_lanes<backward, 16>(rows, begin, end, scratch);
}
#endif

// The instruction sets, lowest first.
enum class Capability { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest the processor has, capped by FASTAP_CPU_CAPABILITY ("default", "avx2" or "avx512",
// the names of torch's ATEN_CPU_CAPABILITY), read at each call as fastap's other switches are:
// all give the same bits, and the tests compare them.
Capability cpu_capability() {
#if defined(__x86_64__)
  static const Capability supported = __builtin_cpu_supports("avx512f") ? Capability::kAvx512
                                      : __builtin_cpu_supports("avx2")  ? Capability::kAvx2
                                                                        : Capability::kDefault;
#else
  const Capability supported = Capability::kDefault;
#endif
  const char* setting = std::getenv("FASTAP_CPU_CAPABILITY");
  if (setting == nullptr || *setting == '\0') return supported;
  Capability cap = Capability::kDefault;
  if (std::strcmp(setting, "avx2") == 0) {
    cap = Capability::kAvx2;
  } else if (std::strcmp(setting, "avx512") == 0) {
    cap = Capability::kAvx512;
  } else {
    TORCH_CHECK_VALUE(std::strcmp(setting, "default") == 0,
                      "fastap: FASTAP_CPU_CAPABILITY must be 'default', 'avx2' or 'avx512' (or "
                      "unset), got '", setting, "'");
  }
  return std::min(cap, supported);
}
#endif  // FASTAP_FLOAT_LANES

template <bool backward, typename T>
void run_rows(const Rows<T>& rows, int64_t num_rows) {
#if FASTAP_FLOAT_LANES
  [[maybe_unused]] const Capability capability = cpu_capability();  // (checked for float64 too)
  if constexpr (std::is_same_v<T, float>) {
    if (rows.q <= kMaxLaneBins) {
      at::parallel_for(0, num_rows, rows_grain(rows.q), [&](int64_t begin, int64_t end) {
        std::vector<FloatLanes<16>> scratch(4 * static_cast<size_t>(rows.q));
#if defined(__x86_64__)
        if (capability == Capability::kAvx512) {
          return rows_in_lanes_avx512<backward>(rows, begin, end, scratch.data());
        }
        if (capability == Capability::kAvx2) {
          return rows_in_lanes_avx2<backward>(rows, begin, end, scratch.data());
        }
#endif
        rows_in_lanes_baseline<backward>(rows, begin, end, scratch.data());
      });
      return;
    }
  }
#endif
  at::parallel_for(0, num_rows, rows_grain(rows.q), [&](int64_t begin, int64_t end) {
    rows_one_at_a_time<backward>(rows, begin, end);
  });
}

at::Tensor ap_from_histograms_cpu(const at::Tensor& n, const at::Tensor& p,
                                  const at::Tensor& positives, std::string variant) {
  const ApInputs in = check_ap_inputs(n, p, positives, variant);
  at::Tensor ap = at::empty({in.num_queries()}, in.n.options());
  AT_DISPATCH_FLOATING_TYPES(in.n.scalar_type(), "fastap_ap_from_histograms_cpu", [&] {
    const Rows<scalar_t> rows{in.n.const_data_ptr<scalar_t>(),
                              in.p.const_data_ptr<scalar_t>(),
                              in.positives.const_data_ptr<int64_t>(),
                              nullptr,
                              in.num_bins(),
                              in.variant,
                              ap.data_ptr<scalar_t>(),
                              nullptr,
                              nullptr};
    run_rows</*backward=*/false>(rows, in.num_queries());
  });
  return ap;
}

std::tuple<at::Tensor, at::Tensor> ap_from_histograms_backward_cpu(
    const at::Tensor& grad_ap, const at::Tensor& n, const at::Tensor& p,
    const at::Tensor& positives, std::string variant) {
  const ApInputs in = check_ap_backward_inputs(grad_ap, n, p, positives, variant);
  at::Tensor grad_n = empty_on_huge_pages(in.n.sizes(), in.n.options());
  at::Tensor grad_p = empty_on_huge_pages(in.p.sizes(), in.p.options());
  AT_DISPATCH_FLOATING_TYPES(in.n.scalar_type(), "fastap_ap_from_histograms_backward_cpu", [&] {
    const Rows<scalar_t> rows{in.n.const_data_ptr<scalar_t>(),
                              in.p.const_data_ptr<scalar_t>(),
                              in.positives.const_data_ptr<int64_t>(),
                              in.grad_ap.const_data_ptr<scalar_t>(),
                              in.num_bins(),
                              in.variant,
                              nullptr,
                              grad_n.data_ptr<scalar_t>(),
                              grad_p.data_ptr<scalar_t>()};
    run_rows</*backward=*/true>(rows, in.num_queries());
  });
  return {grad_n, grad_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CPU, m) {
  m.impl("ap_from_histograms", &ap_from_histograms_cpu);
  m.impl("ap_from_histograms_backward", &ap_from_histograms_backward_cpu);
}

}  // namespace fastap
