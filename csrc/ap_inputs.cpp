#include "ap_inputs.h"

#include "histogram_inputs.h"  // check_same_device

namespace fastap {

ApVariant parse_ap_variant(const std::string& variant) {
  if (variant == "ap_q") return ApVariant::kQuantized;
  if (variant == "tie_aware") return ApVariant::kTieAware;
  if (variant == "tie_aware_simplified") return ApVariant::kTieAwareSimplified;
  TORCH_CHECK_VALUE(false, "fastap: variant must be one of ('ap_q', 'tie_aware', "
                    "'tie_aware_simplified'), got '", variant, "'");
  return ApVariant::kQuantized;  // not reached
}

namespace {

// grad_ap undefined for the forward.
ApInputs check_inputs(const at::Tensor& n, const at::Tensor& p, const at::Tensor& positives,
                      const std::string& variant, const at::Tensor& grad_ap) {
  check_defined(n, "n");
  check_defined(p, "p");
  check_defined(positives, "positives");
  TORCH_CHECK_VALUE(n.dim() == 2, "fastap: n must be 2-D (queries x bins), got shape ", n.sizes());
  TORCH_CHECK_TYPE(n.scalar_type() == at::kFloat || n.scalar_type() == at::kDouble,
                   "fastap: n must be float32 or float64, got ", n.scalar_type());
  TORCH_CHECK_VALUE(p.sizes() == n.sizes(), "fastap: p must have the shape of n ", n.sizes(),
                    ", got ", p.sizes());
  TORCH_CHECK_TYPE(p.scalar_type() == n.scalar_type(), "fastap: p must have the dtype of n (",
                   n.scalar_type(), "), got ", p.scalar_type());
  const int64_t rows = n.size(0);
  TORCH_CHECK_VALUE(positives.dim() == 1 && positives.size(0) == rows,
                    "fastap: positives must be 1-D with one count per query (", rows,
                    "), got shape ", positives.sizes());
  TORCH_CHECK_TYPE(!positives.is_complex() && positives.scalar_type() != at::kBool,
                   "fastap: positives must be an integer or floating count, got ",
                   positives.scalar_type());
  check_same_device(p, "p", n, "n");
  check_same_device(positives, "positives", n, "n");
  if (grad_ap.defined()) check_same_device(grad_ap, "grad_ap", n, "n");
  ApInputs in;
  in.variant = parse_ap_variant(variant);
  in.n = n.contiguous();
  in.p = p.contiguous();
  // Counts: floating ones are rounded to the nearest integer and clamped to [0, 2^53] (beyond,
  // a float no longer holds every integer; a NaN count is 0), so that none wraps around in the
  // conversion; integer input is taken as it is. (In double, which holds every count of every
  // floating dtype: float16's clamp to 2^53 would be out of its range.)
  in.positives = (positives.is_floating_point()
                      ? positives.to(at::kDouble)
                            .round()
                            .nan_to_num(0.0)
                            .clamp(0.0, 9007199254740992.0)
                      : positives)
                     .to(at::kLong)
                     .contiguous();
  if (grad_ap.defined()) {
    TORCH_CHECK_VALUE(grad_ap.dim() == 1 && grad_ap.size(0) == rows,
                      "fastap: grad_ap must have shape [", rows, "], got ", grad_ap.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(grad_ap.scalar_type()),
                     "fastap: grad_ap must be a floating-point tensor, got ", grad_ap.scalar_type());
    in.grad_ap = grad_ap.to(n.scalar_type()).contiguous();
  }
  return in;
}

}  // namespace

ApInputs check_ap_inputs(const at::Tensor& n, const at::Tensor& p, const at::Tensor& positives,
                         const std::string& variant) {
  return check_inputs(n, p, positives, variant, at::Tensor());
}

ApInputs check_ap_backward_inputs(const at::Tensor& grad_ap, const at::Tensor& n,
                                  const at::Tensor& p, const at::Tensor& positives,
                                  const std::string& variant) {
  check_defined(grad_ap, "grad_ap");
  return check_inputs(n, p, positives, variant, grad_ap);
}

}  // namespace fastap
