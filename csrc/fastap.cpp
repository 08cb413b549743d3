// The one schema block of the fastap operators. The CPU and CUDA kernels register themselves
// beside their code (csrc/cpu, csrc/cuda); Python adds the fake (shape) functions and autograd.
#include <Python.h>
#include <torch/library.h>

// Importing fastap._C loads this library, which registers the operators with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fastap, m) {
  // Per query row i, the soft-binned histograms of its candidates' scores over num_bins bins on
  // [lo, hi]: n[i, k] over all non-ignored candidates, p[i, k] over the positives among them.
  // Returns (n, p, positives): n and p N x num_bins, float64 for float64 scores and float32
  // otherwise; positives [N] int64, the exact number of non-ignored positives of each query.
  // exclude_self removes candidate i + self_offset from query i's row (the query itself).
  m.def(
      "soft_histogram(Tensor scores, Tensor? relevance, Tensor? labels, Tensor? ref_labels, "
      "Tensor? ignore, bool exclude_self, int num_bins, float lo, float hi, int self_offset=0) "
      "-> (Tensor, Tensor, Tensor)");
  // dL/dscores (N x M, the dtype of scores) from dL/dn and dL/dp (N x num_bins each).
  m.def(
      "soft_histogram_backward(Tensor grad_n, Tensor grad_p, Tensor scores, Tensor? relevance, "
      "Tensor? labels, Tensor? ref_labels, Tensor? ignore, bool exclude_self, int num_bins, "
      "float lo, float hi, int self_offset=0) -> Tensor");
  // Per query row, the AP of the variant ('ap_q', 'tie_aware', 'tie_aware_simplified') from its
  // histograms n, p [N, Q] (float32 or float64) and exact positive counts [N]: [N] in the dtype
  // of n, 0 for a query without positives. The formula is ap_formula.h.
  m.def("ap_from_histograms(Tensor n, Tensor p, Tensor positives, str variant) -> Tensor");
  // (dL/dn, dL/dp) from dL/dap [N].
  m.def(
      "ap_from_histograms_backward(Tensor grad_ap, Tensor n, Tensor p, Tensor positives, "
      "str variant) -> (Tensor, Tensor)");
  // The histograms of the cosine scores queries @ database^T (both already L2-normalised, N x D
  // and M x D, one floating dtype), with relevance from labels [N] / ref_labels [M] and
  // exclude_self as above, without the score matrix: the fused kernel of csrc/cuda
  // (embedding_histogram.cu; CUDA only, fp32 as TF32, bf16, fp16). Returns as soft_histogram.
  m.def(
      "embedding_histogram(Tensor queries, Tensor database, Tensor labels, Tensor ref_labels, "
      "bool exclude_self, int self_offset, int num_bins, float lo, float hi) "
      "-> (Tensor, Tensor, Tensor)");
  // (dL/dqueries, dL/ddatabase) from dL/dn and dL/dp, recomputing the scores tile by tile.
  m.def(
      "embedding_histogram_backward(Tensor grad_n, Tensor grad_p, Tensor queries, "
      "Tensor database, Tensor labels, Tensor ref_labels, bool exclude_self, int self_offset, "
      "int num_bins, float lo, float hi) -> (Tensor, Tensor)");
  // Whether embedding_histogram on these queries (CUDA) computes its scores with Hopper's wgmma
  // rather than WMMA: FASTAP_WGMMA=1, bf16/fp16, D <= 256, a build and GPU for sm_90a. A
  // diagnostic for the tests and benchmarks.
  m.def("embedding_histogram_uses_wgmma(Tensor queries) -> bool");
}
