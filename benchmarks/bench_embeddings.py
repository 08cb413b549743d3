"""The loss from embeddings, forward + backward: fastap.APLoss (forms the N x N score matrix with
torch's matmul, then the score-matrix op), ap_loss_from_embeddings blockwise (no score matrix;
torch's matmul tile by tile) and fused (the tensor-core CUDA kernel, no score anywhere), time and
peak extra memory, each from a fresh process (see bench_ap_loss.py for the method). On CUDA also
the floor: the four N x N x D matrix products of a forward+backward with torch's matmul alone,
and the fused kernels with their products on Hopper's wgmma (FASTAP_WGMMA=1; needs a build for
9.0a on an H100/H200, else "not run"). The peers, on request (--cases ... reference pml): the
reference (the authors' N x Q x N formulation, on the score matrix) and pytorch-metric-learning's
FastAPLoss, up to --peer-max. A case that runs out of memory is not run at larger N.

    python benchmarks/bench_embeddings.py --sizes 2048 4096 8192
    python benchmarks/bench_embeddings.py --device cuda --dtype bfloat16 --dim 256 \
        --sizes 16384 65536
"""

from __future__ import annotations

import argparse
import os

CASES = {
    "matrix": ("fastap_aploss_emb", "fastap.APLoss (score matrix)"),
    "blockwise": ("fastap_blocked_emb", "from embeddings, blockwise"),
    "fused": ("fastap_fused_emb", "from embeddings, fused kernel"),
    "fused_wgmma": ("fastap_fused_emb", "fused, on wgmma"),
    "floor": ("gemm_floor", "4 matmuls (floor)"),
    "reference": ("reference_emb", "reference (score matrix, N x Q x N)"),
    "pml": ("pml", "PML FastAPLoss"),
}
PEERS = ("reference", "pml")


def wgmma_available(device: str, dtype: str, dim: int) -> bool:
    """Whether the fused kernels would take the wgmma path with FASTAP_WGMMA=1."""
    import torch

    import fastap

    os.environ["FASTAP_WGMMA"] = "1"
    try:
        probe = torch.zeros(1, dim, device=device, dtype=getattr(torch, dtype))
        return fastap.embeddings.fused_uses_wgmma(probe)
    finally:
        os.environ.pop("FASTAP_WGMMA", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--num-bins", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--cases", nargs="+", choices=list(CASES), default=None,
        help="default: matrix blockwise (CPU); matrix blockwise fused fused_wgmma floor (CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--matrix-max", type=int, default=65536,
        help="skip the score-matrix case above this N (it needs N^2 scores and their gradient)",
    )  # fmt: skip
    parser.add_argument(
        "--peer-max", type=int, default=32768, help="skip the peers' cases above this N"
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", help="also write the results here (for plot_results.py)")
    args = parser.parse_args()
    os.environ["FASTAP_BENCH_DIM"] = str(args.dim)  # read by the child processes
    from bench_ap_loss import environment, fmt, have_pml, measure, write_json

    cuda = args.device.startswith("cuda")
    default = ["matrix", "blockwise", "fused", "fused_wgmma", "floor"]
    default = default if cuda else ["matrix", "blockwise"]
    cases = args.cases or default
    env = environment(args.device)
    print(
        f"# {env['date']}, {env['device']}, torch {env['torch']}, commit {env['commit']}, "
        f"{args.dtype}, Q = {args.num_bins}, D = {args.dim}, fwd+bwd, in-batch (N = M)"
    )
    print("| N = M | " + " | ".join(CASES[c][1] for c in cases) + " |")
    print("|---" * (len(cases) + 1) + "|")
    rows = []
    out_of_memory = {}  # case -> the smallest N at which it ran out of memory
    for n in args.sizes:
        common = (n, args.num_bins, args.dtype, args.device, args.repeats, args.timeout)
        cells = []
        rows.append({"n": n})
        for case in cases:
            if case in ("matrix", "floor") and n > args.matrix_max:
                cells.append(f"not run (N^2 = {n * n:.2e} scores)")
                continue
            if case in PEERS and (n > args.peer_max or (case == "pml" and not have_pml())):
                cells.append("not run (--peer-max)" if n > args.peer_max else "not installed")
                continue
            if case in out_of_memory:
                cells.append(f"not run (out of memory at N = {out_of_memory[case]})")
                continue
            if case == "fused_wgmma":
                if not wgmma_available(args.device, args.dtype, args.dim):
                    cells.append("not run (no wgmma path: FASTAP_CUDA_ARCH=9.0a, sm_90)")
                    continue
                os.environ["FASTAP_WGMMA"] = "1"  # read by the child process
            result = measure(CASES[case][0], *common)
            os.environ.pop("FASTAP_WGMMA", None)
            rows[-1][case] = result
            if "out of memory" in result.get("error", ""):
                out_of_memory[case] = n
            if case == "floor" and "error" not in result:
                cells.append(f"{result['ms']:.3g} ms")  # its memory is the N x N buffer
            else:
                cells.append(fmt(result))
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
        if args.json:  # after every row, so that a later row's hang or fault loses only itself
            data = {"kind": "embeddings", "env": env, "args": vars(args), "rows": rows}
            write_json(args.json, data)


if __name__ == "__main__":
    main()
