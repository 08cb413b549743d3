// Runs the CUDA kernels of csrc/cuda on the CPU (cuda_host.h) on inputs in raw files, with the
// launch plan of the real launchers, and writes the outputs as raw files. Driven by
// tests/test_cuda_emulation.py, which compares the outputs with the CPU op.
//
//   run_kernels op=forward|backward dtype=f64|f32|f16|bf16 n=N m=M q=Q lo=.. hi=..
//               scores=FILE [relevance=FILE | labels=FILE ref_labels=FILE] [ignore=FILE]
//               exclude_self=0|1 self_offset=K [chunk=C] [max_blocks=B] out=PREFIX
//               (backward: table=FILE, the N x 2 x (Q - 1) slope table)
//
// Outputs: forward PREFIX.n, PREFIX.p (histogram dtype), PREFIX.positives (int64);
// backward PREFIX.grad (dtype of the scores). Every output starts as garbage (all bits set).
#include "cuda_host.h"
#include "wmma_host.h"
#include "wgmma_host.h"

#include <fstream>
#include <map>
#include <stdexcept>
#include <string>

#include "../../csrc/cuda/embedding_kernels.cuh"
#include "../../csrc/cuda/soft_histogram_kernels.cuh"

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

template <typename T>
std::vector<T> read(const std::string& key, int64_t count) {
  std::vector<T> data(static_cast<size_t>(count));
  std::ifstream file(option(key), std::ios::binary);
  file.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(count * sizeof(T)));
  if (!file || file.peek() != EOF) throw std::runtime_error("wrong size of " + key);
  return data;
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

template <typename scalar_t, typename acc_t>
int run() {
  const int64_t n = integer("n"), m = integer("m"), q = integer("q");
  const double lo = std::stod(option("lo")), hi = std::stod(option("hi"));
  const std::vector<scalar_t> scores = read<scalar_t>("scores", n * m);
  std::vector<uint8_t> relevance, ignore;
  std::vector<int64_t> labels, ref_labels;
  fastap::RelevanceArgs args{};
  if (options.count("relevance")) {
    relevance = read<uint8_t>("relevance", n * m);
    args.dense_relevance = relevance.data();
  } else {
    labels = read<int64_t>("labels", n);
    ref_labels = read<int64_t>("ref_labels", m);
    args.labels = labels.data();
    args.ref_labels = ref_labels.data();
  }
  if (options.count("ignore")) {
    ignore = read<uint8_t>("ignore", n * m);
    args.ignore = ignore.data();
  }
  args.exclude_self = integer("exclude_self", 0) != 0;
  args.self_offset = integer("self_offset", 0);
  const fastap::BinGrid<acc_t> grid(lo, hi, q);
  const int64_t max_blocks = integer("max_blocks", int64_t{1} << 30);

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
    const int64_t blocks = plan.blocks < max_blocks ? plan.blocks : max_blocks;
    const bool fast = fastap::fast_path_applies(args, scores.data(), m, plan.chunk);
    emu::launch(fastap::forward_kernel<scalar_t, acc_t>(fast, args), dim3(static_cast<unsigned>(blocks)),
                dim3(plan.warps_per_block * fastap::kWarpSize), plan.shared_bytes, scores.data(),
                args, grid, n, m, plan.chunk, plan.chunks_per_row, n_out.data(), p_out.data(),
                positives.data(), partial ? partial_hist.data() : nullptr,
                partial ? partial_positives.data() : nullptr);
    if (partial) {
      const int64_t total = n * q;
      int64_t finalize_blocks =
          (total + fastap::kFinalizeThreads - 1) / fastap::kFinalizeThreads;
      if (finalize_blocks > max_blocks) finalize_blocks = max_blocks;
      emu::launch(fastap::soft_histogram_finalize_kernel<acc_t>,
                  dim3(static_cast<unsigned>(finalize_blocks)), dim3(fastap::kFinalizeThreads), 0,
                  static_cast<const acc_t*>(partial_hist.data()),
                  static_cast<const int64_t*>(partial_positives.data()), n, q,
                  plan.chunks_per_row, n_out.data(), p_out.data(), positives.data());
    }
    write(".n", n_out);
    write(".p", p_out);
    write(".positives", positives);
    std::printf("fast=%d chunks_per_row=%lld warps_per_block=%d blocks=%lld\n", fast ? 1 : 0,
                static_cast<long long>(plan.chunks_per_row), plan.warps_per_block,
                static_cast<long long>(blocks));
  } else {
    const std::vector<acc_t> table = read<acc_t>("table", n * 2 * (q - 1));
    std::vector<scalar_t> grad = garbage<scalar_t>(n * m);
    const bool fast = fastap::fast_path_applies(args, scores.data(), m, 0);
    const fastap::BackwardPlan plan =
        fastap::plan_backward(n, m, fastap::backward_columns<scalar_t>(fast));
    const int64_t blocks_y = plan.blocks_y < max_blocks ? plan.blocks_y : max_blocks;
    if (n * m > 0) {  // as the launcher: no launch (an empty grid) for an empty score matrix
      emu::launch(fastap::backward_kernel<scalar_t, acc_t>(fast, args),
                  dim3(static_cast<unsigned>(plan.blocks_x), static_cast<unsigned>(blocks_y)),
                  dim3(fastap::kBackwardThreads), 0, scores.data(), args, grid, n, m,
                  table.data(), grad.data());
    }
    write(".grad", grad);
    std::printf("fast=%d\n", fast ? 1 : 0);
  }
  return 0;
}

template <typename T>
int run_embedding() {
  namespace emb = fastap::embedding;
  using Layout = emb::SharedLayout<T>;
  if (option("op") == "embedding_layout") {  // shared memory per block, for fastap.ops
    std::printf("%zu %zu\n", Layout(integer("d"), false).forward_bytes(integer("q")),
                Layout(integer("d"), true).backward_bytes());
    return 0;
  }
  const int64_t n = integer("n"), m = integer("m"), d = integer("d"), q = integer("q");
  const double lo = std::stod(option("lo")), hi = std::stod(option("hi"));
  const std::vector<T> queries = read<T>("queries", n * d);
  const std::vector<T> database = read<T>("database", m * d);
  const std::vector<int64_t> labels = read<int64_t>("labels", n);
  const std::vector<int64_t> ref_labels = read<int64_t>("ref_labels", m);
  const bool exclude_self = integer("exclude_self", 0) != 0;
  const int64_t self_offset = integer("self_offset", 0);
  const int64_t min_split = integer("min_split", fastap::kMinSplitLength);
  const fastap::BinGrid<float> grid(lo, hi, q);
  // wgmma=1: the products on wgmma (bf16/fp16, D <= kAccumulatorWidth), as the launchers pick
  // them on a GPU built for sm_90a.
  const bool wgmma = integer("wgmma", 0) != 0;
  if (wgmma && (std::is_same_v<T, float> || d > fastap::kAccumulatorWidth)) {
    throw std::runtime_error("the wgmma path takes bf16 or fp16 with D <= 256");
  }

  if (option("op") == "embedding_forward") {
    const fastap::EmbeddingPlan plan = fastap::plan_embedding(n, m, d, false, min_split);
    const size_t shared = Layout(d, false).forward_bytes(q);
    if (shared > kMaxShared) {
      std::fprintf(stderr, "num_bins too large (%zu bytes of shared memory)\n", shared);
      return 2;
    }
    std::vector<float> n_out = garbage<float>(n * q), p_out = garbage<float>(n * q);
    std::vector<int64_t> positives = garbage<int64_t>(n);
    const bool partial = plan.splits > 1;
    std::vector<float> partial_hist = garbage<float>(partial ? n * plan.splits * 2 * q : 0);
    std::vector<int64_t> partial_positives = garbage<int64_t>(partial ? n * plan.splits : 0);
    auto kernel = emb::embedding_histogram_kernel<T>;
    if constexpr (!std::is_same_v<T, float>) {
      if (wgmma) kernel = emb::embedding_histogram_kernel<T, true>;
    }
    emu::launch(kernel,
                dim3(static_cast<unsigned>(plan.own_blocks), static_cast<unsigned>(plan.splits)),
                dim3(fastap::kEmbeddingThreads), shared, queries.data(), database.data(),
                labels.data(), ref_labels.data(), n, m, d, exclude_self, self_offset, grid,
                plan.split_length, n_out.data(), p_out.data(), positives.data(),
                partial ? partial_hist.data() : nullptr,
                partial ? partial_positives.data() : nullptr);
    if (partial) {
      const int64_t blocks = (n * q + fastap::kFinalizeThreads - 1) / fastap::kFinalizeThreads;
      emu::launch(fastap::soft_histogram_finalize_kernel<float>,
                  dim3(static_cast<unsigned>(blocks)), dim3(fastap::kFinalizeThreads), 0,
                  static_cast<const float*>(partial_hist.data()),
                  static_cast<const int64_t*>(partial_positives.data()), n, q, plan.splits,
                  n_out.data(), p_out.data(), positives.data());
    }
    write(".n", n_out);
    write(".p", p_out);
    write(".positives", positives);
    std::printf("splits=%lld split_length=%lld\n", static_cast<long long>(plan.splits),
                static_cast<long long>(plan.split_length));
    return 0;
  }

  const std::vector<float> table = read<float>("table", n * 2 * (q - 1));
  // The two launches of embedding_histogram_backward_cuda: own = queries, then own = database.
  auto gradient = [&](auto own_is_query, const std::vector<T>& own, const std::vector<T>& stream,
                      const std::vector<int64_t>& own_labels,
                      const std::vector<int64_t>& stream_labels, int64_t own_count,
                      int64_t stream_count) {
    constexpr bool kOwnIsQuery = decltype(own_is_query)::value;
    std::vector<T> grad = garbage<T>(own_count * d);
    if (own_count == 0 || d == 0) return grad;
    const fastap::EmbeddingPlan plan =
        fastap::plan_embedding(own_count, stream_count, d, true, min_split);
    const bool partial = plan.splits > 1;
    std::vector<float> partial_grad = garbage<float>(partial ? plan.splits * own_count * d : 0);
    auto kernel = emb::embedding_histogram_backward_kernel<T, kOwnIsQuery>;
    if (wgmma) {  // both products on wgmma, as the launcher picks them on sm_90a
      if constexpr (!std::is_same_v<T, float>) {
        kernel = emb::embedding_histogram_backward_kernel<T, kOwnIsQuery, true>;
      }
    }
    emu::launch(kernel,
                dim3(static_cast<unsigned>(plan.own_blocks), static_cast<unsigned>(plan.splits),
                     static_cast<unsigned>(plan.depth_blocks)),
                dim3(fastap::kEmbeddingThreads), Layout(d, true).backward_bytes(), own.data(),
                own_count,
                stream.data(), stream_count, d, own_labels.data(), stream_labels.data(),
                exclude_self, self_offset, grid, table.data(), plan.split_length, grad.data(),
                partial ? partial_grad.data() : nullptr);
    if (partial) {
      const int64_t count = own_count * d;
      emu::launch(emb::sum_partials_kernel<T>, dim3(static_cast<unsigned>((count + 255) / 256)),
                  dim3(256), 0, static_cast<const float*>(partial_grad.data()), plan.splits,
                  count, grad.data());
    }
    return grad;
  };
  if (n > 0 && m > 0) {
    write(".grad_queries",
          gradient(std::true_type{}, queries, database, labels, ref_labels, n, m));
    write(".grad_database",
          gradient(std::false_type{}, database, queries, ref_labels, labels, m, n));
  } else {
    write(".grad_queries", std::vector<T>(n * d, T(0.0f)));
    write(".grad_database", std::vector<T>(m * d, T(0.0f)));
  }
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
