"""Input factories shared by the tests and the benchmarks (no test logic here)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

RELEVANCE_FORMS = ("dense", "labels", "ref_labels")


@dataclass
class Problem:
    """One AP problem: scores and relevance in one of the accepted forms, plus the options."""

    scores: torch.Tensor
    relevance: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    ref_labels: torch.Tensor | None = None
    ignore: torch.Tensor | None = None
    exclude_self: bool = False
    num_bins: int = 20
    score_range: tuple[float, float] = (-1.0, 1.0)
    extra: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        """Keyword arguments of fastap.average_precision / ap_loss (and of the reference)."""
        return dict(
            labels=self.labels,
            ref_labels=self.ref_labels,
            num_bins=self.num_bins,
            score_range=self.score_range,
            ignore=self.ignore,
            exclude_self=self.exclude_self,
        )

    def args(self) -> tuple:
        return (self.scores, self.relevance)

    def with_scores(self, scores: torch.Tensor) -> Problem:
        return Problem(
            scores,
            self.relevance,
            self.labels,
            self.ref_labels,
            self.ignore,
            self.exclude_self,
            self.num_bins,
            self.score_range,
            dict(self.extra),
        )

    def to(self, device) -> Problem:
        def move(t):
            return None if t is None else t.to(device)

        return Problem(
            move(self.scores),
            move(self.relevance),
            move(self.labels),
            move(self.ref_labels),
            move(self.ignore),
            self.exclude_self,
            self.num_bins,
            self.score_range,
            dict(self.extra),
        )


def kink_free_scores(
    num_queries: int,
    num_candidates: int,
    num_bins: int,
    score_range: tuple[float, float],
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    outside_fraction: float = 0.1,
    margin: float = 0.05,
) -> torch.Tensor:
    """Scores at least `margin` bin widths away from every bin centre (where AP_Q has kinks),
    with a fraction outside the range (well clear of lo and hi) where the gradient is zero."""
    lo, hi = score_range
    delta = (hi - lo) / (num_bins - 1)
    shape = (num_queries, num_candidates)
    bins = torch.randint(0, num_bins - 1, shape, generator=generator).to(torch.float64)
    within = margin + (1 - 2 * margin) * torch.rand(shape, generator=generator, dtype=torch.float64)
    scores = hi - delta * (bins + within)
    outside = torch.rand(shape, generator=generator) < outside_fraction
    above = torch.rand(shape, generator=generator) < 0.5
    spill = delta * (0.5 + torch.rand(shape, generator=generator, dtype=torch.float64))
    scores = torch.where(outside & above, hi + spill, scores)
    scores = torch.where(outside & ~above, lo - spill, scores)
    return scores.to(dtype)


def random_problem(
    num_queries: int,
    num_candidates: int,
    *,
    num_bins: int = 20,
    score_range: tuple[float, float] = (-1.0, 1.0),
    relevance_form: str = "labels",
    num_classes: int = 4,
    with_ignore: bool = False,
    exclude_self: bool = False,
    ties: bool = False,
    kink_free: bool = False,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Problem:
    """A random problem. Scores spread a little beyond `score_range`; with `ties` they take only a
    few distinct values (not bin centres); with `kink_free` they avoid bin centres and the range
    ends (for finite-difference gradient checks)."""
    if relevance_form not in RELEVANCE_FORMS:
        raise ValueError(f"relevance_form must be one of {RELEVANCE_FORMS}")
    g = torch.Generator().manual_seed(seed)
    lo, hi = score_range
    shape = (num_queries, num_candidates)
    if kink_free:
        scores = kink_free_scores(num_queries, num_candidates, num_bins, score_range, g)
    else:
        width = hi - lo
        scores = (
            lo - 0.1 * width + 1.2 * width * torch.rand(shape, generator=g, dtype=torch.float64)
        )
    if ties:
        delta = (hi - lo) / (num_bins - 1)
        values = hi - delta * (torch.randint(0, num_bins - 1, (5,), generator=g) + 0.37)
        scores = values[torch.randint(0, 5, shape, generator=g)]
    problem = Problem(scores.to(dtype), num_bins=num_bins, score_range=score_range)
    query_labels = torch.randint(0, num_classes, (num_queries,), generator=g)
    if relevance_form == "dense":
        problem.relevance = torch.rand(shape, generator=g) < 1.0 / num_classes
    elif relevance_form == "labels" and num_queries == num_candidates:
        problem.labels = query_labels
    else:
        problem.labels = query_labels
        problem.ref_labels = torch.randint(0, num_classes, (num_candidates,), generator=g)
    if with_ignore:
        problem.ignore = torch.rand(shape, generator=g) < 0.15
    problem.exclude_self = exclude_self and num_queries == num_candidates
    return problem


def exact_embeddings(
    rows: int, dim: int, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """Embeddings whose entries are k / 8 with |k| <= 2: exact in bf16, fp16 and TF32, and every
    inner product (and partial sum) is exact in fp32, so tensor-core scores equal fp64 scores
    exactly and a fused kernel can be compared with the score-matrix op without tolerance for the
    scores."""
    values = torch.randint(-2, 3, (rows, dim), generator=generator).to(torch.float64) / 8
    return values.to(dtype)


def round_like_matrix_unit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp64) as the fused kernels feed it to the tensor cores, back in fp64: bf16 or fp16, or
    TF32 for fp32 (10 mantissa bits, to nearest with ties away from zero, as cvt.rna.tf32.f32)."""
    if dtype != torch.float32:
        return x.to(dtype).double()
    bits = x.float().view(torch.int32)
    rounded = torch.bitwise_and(bits + 0x1000, -0x2000)  # 0xffffe000 as int32
    return rounded.view(torch.float32).double()
