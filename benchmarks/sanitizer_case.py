"""Small CUDA forward+backward passes for compute-sanitizer: the score-matrix kernels over every
relevance form, in float32, bfloat16 and float64 (float16 has bfloat16's loads and layout, with
another conversion) (rows of one chunk and of several; the general kernels, and the fast ones
for labels without an ignore mask on rows of whole 16-byte vectors), and the fused
from-embeddings kernels (one split and several, D above one accumulator block), also on wgmma
where the build has it.

--wgmma without leaves the wgmma passes out and --wgmma only runs them alone, so that
benchmarks/gpu_check.sh can try the wgmma path (the one part never run on a GPU before) in a step
of its own, and keep a fault or a hang there from costing the other steps."""

import argparse
import faulthandler
import os
import signal

import torch

import fastap
from fastap.ops import HAS_FUSED_EMBEDDING_KERNELS
from fastap.testing import RELEVANCE_FORMS, random_problem

GENERAL = (((37, 37), 2), ((37, 37), 20), ((37, 37), 100), ((5, 9001), 20))
FAST = (((40, 40), 20), ((5, 9000), 20), ((3, 8), 2))  # whole 16-byte vectors per row


def score_matrix_cases():
    cases = [(form, True, GENERAL) for form in RELEVANCE_FORMS] + [("labels", False, FAST)]
    for form, with_ignore, shapes in cases:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for shape, num_bins in shapes:
                problem = random_problem(
                    *shape,
                    num_bins=num_bins,
                    relevance_form=form,
                    with_ignore=with_ignore,
                    exclude_self=shape[0] == shape[1],
                    dtype=dtype,
                    seed=num_bins,
                ).to("cuda")
                scores = problem.scores.detach().requires_grad_()
                fastap.ap_loss(scores, problem.relevance, **problem.kwargs()).backward()


def fused_cases(dtypes, shapes):
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for n, m, d in shapes:
            queries = torch.randn(n, d, generator=g).to("cuda", dtype).requires_grad_()
            database = torch.randn(m, d, generator=g).to("cuda", dtype).requires_grad_()
            labels = torch.randint(0, 3, (n,), generator=g).cuda()
            ref_labels = torch.randint(0, 3, (m,), generator=g).cuda()
            fastap.ap_loss_from_embeddings(
                queries, database, labels=labels, ref_labels=ref_labels, backend="fused"
            ).backward()


WGMMA_ABSENT = 3  # the exit status of --wgmma only where there is no wgmma path


def wgmma_cases(only: bool = False) -> None:
    """The fused kernels on wgmma, where this build and GPU have them (FASTAP_CUDA_ARCH=9.0a);
    with `only` (nothing else runs), their absence ends the program with WGMMA_ABSENT."""
    os.environ["FASTAP_WGMMA"] = "1"
    try:
        probe = torch.zeros(1, 256, device="cuda", dtype=torch.bfloat16)
        if not (HAS_FUSED_EMBEDDING_KERNELS and fastap.embeddings.fused_uses_wgmma(probe)):
            print("fused kernels on wgmma: not in this build or on this GPU")
            if only:
                # (gpu_check.sh's smoke_wgmma: the path is absent, not passed: WGMMA=off)
                raise SystemExit(WGMMA_ABSENT)
            return
        fused_cases((torch.bfloat16, torch.float16), ((70, 133, 40), (70, 5000, 256)))
        torch.cuda.synchronize()
        print("fused kernels on wgmma: run")
    finally:
        del os.environ["FASTAP_WGMMA"]


def main() -> None:
    parser = argparse.ArgumentParser(description="Small CUDA passes of every kernel.")
    parser.add_argument(
        "--wgmma", choices=("with", "without", "only"), default="with",
        help="run the fused kernels' wgmma passes too (default), leave them out, or run only them",
    )  # fmt: skip
    args = parser.parse_args()
    # Stopped by a time limit (a kernel that never returns): the stack of every thread first, so
    # that the log says which pass it was in.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    if args.wgmma != "only":
        print("score-matrix kernels", flush=True)
        score_matrix_cases()
        torch.cuda.synchronize()
        if HAS_FUSED_EMBEDDING_KERNELS:
            print("fused kernels", flush=True)
            fused_cases((torch.float32, torch.bfloat16, torch.float16),
                        ((70, 133, 40), (70, 5000, 13), (65, 300, 300)))  # fmt: skip
            torch.cuda.synchronize()
    if args.wgmma != "without":
        print("fused kernels on wgmma", flush=True)
        wgmma_cases(only=args.wgmma == "only")
    torch.cuda.synchronize()
    print("sanitizer case done")


if __name__ == "__main__":
    main()
