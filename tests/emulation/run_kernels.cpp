// Runs the CUDA launchers and kernels of csrc/cuda on the CPU (cuda_host.h) on inputs in raw
// files, with the launch plans of the torch side (cuda_ops.cpp), and writes the outputs as raw
// files. Driven by tests/test_cuda_emulation.py, which compares the outputs with the CPU op.
//
//   run_kernels op=forward|backward dtype=f64|f32|f16|bf16 n=N m=M q=Q lo=.. hi=..
//               scores=FILE [relevance=FILE | labels=FILE ref_labels=FILE] [ignore=FILE]
//               exclude_self=0|1 self_offset=K [chunk=C] [max_blocks=B] out=PREFIX
//               [scores_offset=K] [ref_labels_offset=K] [grad_offset=K]
//               (backward: table=FILE, the N x 2 x (Q - 1) slope table)
//
// Outputs: forward PREFIX.n, PREFIX.p (histogram dtype), PREFIX.positives (int64);
// backward PREFIX.grad (dtype of the scores). Every output starts as garbage (all bits set).
//
// The fused kernels from embeddings (embedding_histogram.cu):
//
//   run_kernels op=embedding_forward|embedding_backward dtype=f32|f16|bf16 n=N m=M d=D q=Q
//               lo=.. hi=.. queries=FILE database=FILE labels=FILE ref_labels=FILE
//               exclude_self=0|1 self_offset=K [min_split=L] [wgmma=0|1] out=PREFIX
//               [queries_offset=K] [database_offset=K]
//               (backward: table=FILE, the N x 2 x (Q - 1) slope table)
//   run_kernels op=embedding_layout dtype=.. d=D q=Q    (shared bytes: forward, backward)
//   run_kernels op=embedding_limits dtype=..           (widest D, its grid.z, D + 1's)
//
// Outputs: forward PREFIX.n, PREFIX.p (float32), PREFIX.positives (int64); backward
// PREFIX.grad_queries and PREFIX.grad_database (dtype of the embeddings).
//
// The AP formula: op=ap_rows|ap_rows_backward (see run_ap_rows below).
#include "cuda_host.h"
#include "wmma_host.h"
#include "wgmma_host.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>

// The launchers themselves (they launch through launch_kernel, which cuda_host.h runs here), the
// wgmma kernels included as in a build for 9.0a.
#define FASTAP_BUILD_WGMMA 1
#include "../../csrc/cuda/ap_formula.cu"
#include "../../csrc/cuda/embedding_histogram.cu"
#include "../../csrc/cuda/soft_histogram.cu"

namespace {

std::map<std::string, std::string> options;

const std::string& option(const std::string& key) {
  const auto it = options.find(key);
  if (it == options.end()) throw std::runtime_error("missing option " + key);
  return it->second;
}
int64_t integer(const std::string& key, int64_t fallback = -1) {
  return options.count(key) ? std::stoll(option(key)) : fallback;
}
// A real number, as Python's repr wrote it. (Not std::stod: it refuses a subnormal, such as a
// score range's end of 2.2e-311, for the ERANGE that strtod sets.)
double real(const std::string& key) {
  const std::string& text = option(key);
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0') throw std::runtime_error("not a number: " + key);
  return value;
}

template <typename T>
std::vector<T> read(const std::string& key, int64_t count) {
  std::vector<T> data(static_cast<size_t>(count));
  std::ifstream file(option(key), std::ios::binary);
  file.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(count * sizeof(T)));
  if (!file || file.peek() != EOF) throw std::runtime_error("wrong size of " + key);
  return data;
}

// read<T>(key, count), placed `offset` elements into its buffer (garbage before it): the data
// pointer is then off the 16-byte alignment of the allocation, as a tensor view with a storage
// offset is (KEY_offset=K options; 0 by default).
template <typename T>
std::vector<T> read_at(const std::string& key, int64_t count, int64_t offset) {
  const std::vector<T> data = read<T>(key, count);
  std::vector<T> buffer(static_cast<size_t>(offset + count));
  if (offset > 0) std::memset(buffer.data(), 0xFF, static_cast<size_t>(offset) * sizeof(T));
  std::copy(data.begin(), data.end(), buffer.begin() + offset);
  return buffer;
}

template <typename T>
std::vector<T> garbage(int64_t count) {
  std::vector<T> data(static_cast<size_t>(count));
  if (!data.empty()) std::memset(data.data(), 0xFF, data.size() * sizeof(T));
  return data;
}

template <typename T>
void write(const std::string& suffix, const std::vector<T>& data) {
  std::ofstream file(option("out") + suffix, std::ios::binary);
  file.write(reinterpret_cast<const char*>(data.data()),
             static_cast<std::streamsize>(data.size() * sizeof(T)));
}

constexpr size_t kMaxShared = 227 * 1024;  // H100 / H200 opt-in shared memory per block

// Whether the first launch of the op was of `kernel`.
template <typename Kernel>
bool launched_first(Kernel kernel) {
  return !emu::launched.empty() &&
         emu::launched.front().kernel == reinterpret_cast<const void*>(kernel);
}

template <typename scalar_t, typename acc_t>
int run() {
  const int64_t n = integer("n"), m = integer("m"), q = integer("q");
  const double lo = real("lo"), hi = real("hi");
  const int64_t scores_offset = integer("scores_offset", 0);
  const std::vector<scalar_t> score_buffer = read_at<scalar_t>("scores", n * m, scores_offset);
  const scalar_t* const scores = score_buffer.data() + scores_offset;
  std::vector<uint8_t> relevance, ignore;
  std::vector<int64_t> labels, ref_labels;
  fastap::RelevanceArgs args{};
  if (options.count("relevance")) {
    relevance = read<uint8_t>("relevance", n * m);
    args.dense_relevance = relevance.data();
  } else {
    labels = read<int64_t>("labels", n);
    const int64_t ref_labels_offset = integer("ref_labels_offset", 0);
    ref_labels = read_at<int64_t>("ref_labels", m, ref_labels_offset);
    args.labels = labels.data();
    args.ref_labels = ref_labels.data() + ref_labels_offset;
  }
  if (options.count("ignore")) {
    ignore = read<uint8_t>("ignore", n * m);
    args.ignore = ignore.data();
  }
  args.exclude_self = integer("exclude_self", 0) != 0;
  args.self_offset = integer("self_offset", 0);
  const fastap::BinGrid<acc_t> grid(lo, hi, q);
  const int64_t max_blocks = integer("max_blocks", fastap::kMaxBlocks);

  if (option("op") == "forward") {
    const fastap::ForwardPlan plan = fastap::plan_forward(
        n, m, q, sizeof(acc_t), kMaxShared, integer("chunk", fastap::kForwardChunk));
    if (!plan.fits) {
      std::fprintf(stderr, "num_bins too large (at most %lld)\n",
                   static_cast<long long>(plan.max_bins));
      return 2;
    }
    std::vector<acc_t> n_out = garbage<acc_t>(n * q), p_out = garbage<acc_t>(n * q);
    std::vector<int64_t> positives = garbage<int64_t>(n);
    const bool partial = plan.chunks_per_row > 1;
    std::vector<acc_t> partial_hist = garbage<acc_t>(partial ? plan.items * 2 * q : 0);
    std::vector<int64_t> partial_positives = garbage<int64_t>(partial ? plan.items : 0);
    fastap::launch_soft_histogram(scores, args, grid, n, m, plan, n_out.data(),
                                  p_out.data(), positives.data(),
                                  partial ? partial_hist.data() : nullptr,
                                  partial ? partial_positives.data() : nullptr, nullptr,
                                  max_blocks);
    write(".n", n_out);
    write(".p", p_out);
    write(".positives", positives);
    // What the launcher launched first: the fast kernel or a general one, and on how many blocks.
    const bool fast = launched_first(fastap::soft_histogram_kernel<scalar_t, acc_t, true, false>);
    std::printf("fast=%d chunks_per_row=%lld warps_per_block=%d blocks=%u\n", fast ? 1 : 0,
                static_cast<long long>(plan.chunks_per_row), plan.warps_per_block,
                emu::launched.empty() ? 0u : emu::launched.front().grid.x);
  } else {
    const std::vector<acc_t> table = read<acc_t>("table", n * 2 * (q - 1));
    // (grad_offset: the gradient written that many elements into its buffer, off the 16-byte
    // alignment that the fast kernel's vector stores need)
    const int64_t grad_offset = integer("grad_offset", 0);
    std::vector<scalar_t> buffer = garbage<scalar_t>(grad_offset + n * m);
    fastap::launch_soft_histogram_backward(scores, args, grid, n, m, table.data(),
                                           buffer.data() + grad_offset, nullptr, max_blocks);
    const bool fast =
        launched_first(fastap::soft_histogram_backward_kernel<scalar_t, acc_t, true, false>);
    write(".grad", std::vector<scalar_t>(buffer.begin() + grad_offset, buffer.end()));
    std::printf("fast=%d\n", fast ? 1 : 0);
  }
  return 0;
}

template <typename T>
int run_embedding() {
  if (option("op") == "embedding_layout") {  // shared memory per block, for fastap.ops
    std::printf("%zu %zu\n", fastap::embedding_shared_bytes<T>(integer("d"), false, integer("q")),
                fastap::embedding_shared_bytes<T>(integer("d"), true, 0));
    return 0;
  }
  if (option("op") == "embedding_limits") {  // the widest D, its backward grid.z and D + 1's
    const int64_t widest = fastap::kMaxEmbeddingDepth;
    std::printf("%lld %lld %lld\n", static_cast<long long>(widest),
                static_cast<long long>(fastap::plan_embedding(1, 1, widest, true).depth_blocks),
                static_cast<long long>(
                    fastap::plan_embedding(1, 1, widest + 1, true).depth_blocks));
    return 0;
  }
  const int64_t n = integer("n"), m = integer("m"), d = integer("d"), q = integer("q");
  const double lo = real("lo"), hi = real("hi");
  const int64_t queries_offset = integer("queries_offset", 0);
  const int64_t database_offset = integer("database_offset", 0);
  const std::vector<T> query_buffer = read_at<T>("queries", n * d, queries_offset);
  const std::vector<T> database_buffer = read_at<T>("database", m * d, database_offset);
  const T* const queries = query_buffer.data() + queries_offset;
  const T* const database = database_buffer.data() + database_offset;
  const std::vector<int64_t> labels = read<int64_t>("labels", n);
  const std::vector<int64_t> ref_labels = read<int64_t>("ref_labels", m);
  const bool exclude_self = integer("exclude_self", 0) != 0;
  const int64_t self_offset = integer("self_offset", 0);
  const int64_t min_split = integer("min_split", fastap::kMinSplitLength);
  const fastap::BinGrid<float> grid(lo, hi, q);
  // wgmma=1: the products on wgmma (bf16/fp16, D <= kAccumulatorWidth), as the launchers pick
  // them on a GPU built for sm_90a.
  const bool wgmma = integer("wgmma", 0) != 0;
  if (wgmma && !fastap::wgmma_can_serve(!std::is_same_v<T, float>, d)) {
    throw std::runtime_error("the wgmma path takes bf16 or fp16 with D <= 256");
  }

  if (option("op") == "embedding_forward") {
    const fastap::EmbeddingPlan plan = fastap::plan_embedding(n, m, d, false, min_split);
    const size_t shared = fastap::embedding_shared_bytes<T>(d, false, q);
    if (shared > kMaxShared) {
      std::fprintf(stderr, "num_bins too large (%zu bytes of shared memory)\n", shared);
      return 2;
    }
    std::vector<float> n_out = garbage<float>(n * q), p_out = garbage<float>(n * q);
    std::vector<int64_t> positives = garbage<int64_t>(n);
    const bool partial = plan.splits > 1;
    std::vector<float> partial_hist = garbage<float>(partial ? n * plan.splits * 2 * q : 0);
    std::vector<int64_t> partial_positives = garbage<int64_t>(partial ? n * plan.splits : 0);
    fastap::launch_embedding_histogram(
        queries, database, labels.data(), ref_labels.data(), n, m, d, exclude_self,
        self_offset, grid, plan, wgmma, static_cast<int>(kMaxShared), n_out.data(), p_out.data(),
        positives.data(), partial ? partial_hist.data() : nullptr,
        partial ? partial_positives.data() : nullptr, nullptr);
    write(".n", n_out);
    write(".p", p_out);
    write(".positives", positives);
    std::printf("splits=%lld split_length=%lld\n", static_cast<long long>(plan.splits),
                static_cast<long long>(plan.split_length));
    return 0;
  }

  const std::vector<float> table = read<float>("table", n * 2 * (q - 1));
  // The two launches of the backward (cuda_ops.cpp): own = queries, then own = database.
  auto gradient = [&](bool own_is_query, const T* own, const T* other,
                      const std::vector<int64_t>& own_labels,
                      const std::vector<int64_t>& other_labels, int64_t own_count,
                      int64_t other_count) {
    std::vector<T> grad = garbage<T>(own_count * d);
    if (own_count == 0 || d == 0) return grad;
    const fastap::EmbeddingPlan plan =
        fastap::plan_embedding(own_count, other_count, d, true, min_split);
    const bool partial = plan.splits > 1;
    std::vector<float> partial_grad = garbage<float>(partial ? plan.splits * own_count * d : 0);
    fastap::launch_embedding_histogram_backward(
        own_is_query, own, own_count, other, other_count, d, own_labels.data(),
        other_labels.data(), exclude_self, self_offset, grid, table.data(), plan, wgmma,
        static_cast<int>(kMaxShared), grad.data(), partial ? partial_grad.data() : nullptr,
        nullptr);
    return grad;
  };
  if (n > 0 && m > 0) {
    write(".grad_queries", gradient(true, queries, database, labels, ref_labels, n, m));
    write(".grad_database", gradient(false, database, queries, ref_labels, labels, m, n));
  } else {
    write(".grad_queries", std::vector<T>(n * d, T(0.0f)));
    write(".grad_database", std::vector<T>(m * d, T(0.0f)));
  }
  return 0;
}

// ap_rows / ap_rows_backward: fastap::ap_from_histograms and its backward (variant = 0, 1, 2 as
// ApVariant) on n, p (N x Q) and positives (N, int64); the backward also takes grad_ap (N).
// Outputs: PREFIX.ap, or PREFIX.grad_n and PREFIX.grad_p.
template <typename T>
int run_ap_rows() {
  const int64_t n = integer("n"), q = integer("q");
  const auto variant = static_cast<fastap::ApVariant>(integer("variant"));
  const std::vector<T> n_hist = read<T>("n_hist", n * q), p_hist = read<T>("p_hist", n * q);
  const std::vector<int64_t> positives = read<int64_t>("positives", n);
  if (option("op") == "ap_rows") {
    std::vector<T> ap = garbage<T>(n);
    fastap::launch_ap_rows(n_hist.data(), p_hist.data(), positives.data(), n, q, variant,
                           ap.data(), nullptr);
    write(".ap", ap);
  } else {
    const std::vector<T> grad_ap = read<T>("grad_ap", n);
    std::vector<T> grad_n = garbage<T>(n * q), grad_p = garbage<T>(n * q);
    fastap::launch_ap_rows_backward(grad_ap.data(), n_hist.data(), p_hist.data(),
                                    positives.data(), n, q, variant, grad_n.data(),
                                    grad_p.data(), nullptr);
    write(".grad_n", grad_n);
    write(".grad_p", grad_p);
  }
  std::printf("launches=%zu\n", emu::launched.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    for (int a = 1; a < argc; ++a) {
      const std::string arg = argv[a];
      const size_t eq = arg.find('=');
      if (eq == std::string::npos) throw std::runtime_error("expected key=value, got " + arg);
      options[arg.substr(0, eq)] = arg.substr(eq + 1);
    }
    const std::string& dtype = option("dtype");
    if (option("op").rfind("ap_rows", 0) == 0) {
      if (dtype == "f64") return run_ap_rows<double>();
      if (dtype == "f32") return run_ap_rows<float>();
      throw std::runtime_error("the AP formula takes f32 or f64 histograms");
    }
    if (option("op").rfind("embedding_", 0) == 0) {
      if (dtype == "f32") return run_embedding<float>();
      if (dtype == "f16") return run_embedding<__half>();
      if (dtype == "bf16") return run_embedding<__nv_bfloat16>();
      throw std::runtime_error("the fused embedding kernels take f32, f16 or bf16");
    }
    if (dtype == "f64") return run<double, double>();
    if (dtype == "f32") return run<float, float>();
    if (dtype == "f16") return run<c10::Half, float>();
    if (dtype == "bf16") return run<c10::BFloat16, float>();
    throw std::runtime_error("unknown dtype " + dtype);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "run_kernels: %s\n", e.what());
    return 1;
  }
}
