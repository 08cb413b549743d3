"""Two processes on gloo: the shares of the distributed loss add up to the single-process loss
of the global batch, and gradients (of the embeddings, and of a DDP model) equal its gradients."""

import gc
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastap
from fastap.distributed import DistributedAPLoss, gather_embeddings
from fastap.train import multistage_backward

WORLD = 2
SIZES = [6, 9]  # uneven on purpose


UNEVEN_SIZES = [(0, 7), (5, 0), (1, 1), (0, 0), (1, 12)]


def global_batch(sizes=SIZES):
    g = torch.Generator().manual_seed(sum(sizes))
    embeddings = torch.randn(sum(sizes), 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (sum(sizes),), generator=g)
    return embeddings, labels


def model():
    torch.manual_seed(3)
    return torch.nn.Linear(5, 8).double()


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        run_and_save(rank, out_dir)  # returns with its DDP models released
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_and_save(rank, out_dir):
    embeddings, labels = global_batch()
    start = sum(SIZES[:rank])
    mine = slice(start, start + SIZES[rank])
    gathered, gathered_labels, offset = gather_embeddings(embeddings[mine], labels[mine])
    assert offset == start and torch.equal(gathered, embeddings)
    assert torch.equal(gathered_labels, labels)

    local = embeddings[mine].clone().requires_grad_()
    share = DistributedAPLoss(fastap.APLoss(num_bins=15, variant="tie_aware"))(local, labels[mine])
    share.backward()
    # Compiled, the collectives run eagerly (traced, the size exchange deadlocked).
    again = embeddings[mine].clone().requires_grad_()
    compiled_loss = torch.compile(
        DistributedAPLoss(fastap.APLoss(num_bins=15, variant="tie_aware")), backend="eager"
    )
    compiled_share = compiled_loss(again, labels[mine])
    compiled_share.backward()
    assert torch.equal(compiled_share, share) and torch.equal(again.grad, local.grad)
    # Under torch.func.grad, the same gradient; under vmap, refused on every process.
    share_loss = DistributedAPLoss(fastap.APLoss(num_bins=15, variant="tie_aware"))
    func_grad = torch.func.grad(lambda e: share_loss(e, labels[mine]))(embeddings[mine])
    assert torch.equal(func_grad, local.grad)
    try:
        torch.func.vmap(lambda e: share_loss(e, labels[mine]))(embeddings[mine][None])
        raise AssertionError("vmap was not refused")
    except ValueError as error:
        assert "embeddings batched by torch.func.vmap cannot be gathered" in str(error), error

    ddp = torch.nn.parallel.DistributedDataParallel(model())
    ddp_loss = DistributedAPLoss(fastap.FastAPLoss(num_bins=12))(
        ddp(embeddings[mine]), labels[mine]
    )
    (ddp_loss * dist.get_world_size()).backward()  # undo DDP's averaging over processes
    # Multi-stage under DDP with different numbers of chunks per process (2 and 3): one
    # gradient all-reduce per step, so nobody waits forever.
    staged = torch.nn.parallel.DistributedDataParallel(model())
    loss_fn = DistributedAPLoss(fastap.APLoss(num_bins=9))
    multistage_backward(
        staged,
        embeddings[mine],
        lambda d: loss_fn(d, labels[mine]) * dist.get_world_size(),
        chunk_size=4,
    )
    # Embeddings of another dimension, or dtype, on one process: every process raises the same
    # error (gloo aborted the process when the gathers met tensors of other shapes).
    refusals = []
    for other in ("dimension", "dtype"):
        dim = 4 if rank == 1 and other == "dimension" else 5
        dtype = torch.float32 if rank == 1 and other == "dtype" else torch.float64
        try:
            DistributedAPLoss()(torch.randn(3, dim, dtype=dtype), torch.arange(3))
        except ValueError as error:
            refusals.append(str(error))
    # A batch refused on one process (non-finite embeddings, labels of another length, no
    # tensor, meta embeddings) is refused on every process: that process raises its own error,
    # the other says whose batch it was (it waited in the next collective before).
    bad_batches = []
    nan_rows = torch.randn(3, 5)
    nan_rows[1, 2] = float("nan")
    for bad in (
        (nan_rows, torch.arange(3)),
        (torch.randn(3, 5), torch.arange(2)),
        ("embeddings", torch.arange(3)),
        (torch.randn(3, 5, device="meta"), torch.arange(3, device="meta")),
    ):
        batch = bad if rank == 1 else (torch.randn(3, 5), torch.arange(3))
        for call in (DistributedAPLoss(), gather_embeddings):
            try:
                call(*batch)
                bad_batches.append("no error")
            except (TypeError, ValueError) as error:
                bad_batches.append(str(error))
    # Uneven shares down to none (the last batch of a sampler, or a process without data).
    uneven = []
    for sizes in UNEVEN_SIZES:
        all_embeddings, all_labels = global_batch(sizes)
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        part = all_embeddings[rows].clone().requires_grad_()
        part_share = DistributedAPLoss(fastap.APLoss(num_bins=10))(part, all_labels[rows])
        part_share.backward()
        uneven.append((part_share.detach(), part.grad))
    torch.save(
        {
            "uneven": uneven,
            "bad_batches": bad_batches,
            "refusals": refusals,
            "staged_grads": [p.grad for p in staged.parameters()],
            "share": share.detach(),
            "grad": local.grad,
            "ddp_share": ddp_loss.detach(),
            "ddp_grads": [p.grad for p in ddp.parameters()],
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def test_two_processes_equal_the_global_batch(tmp_path):
    context = mp.spawn(
        worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False
    )
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes did not finish within 180 s (a collective hung)")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in results:
        assert r["refusals"] == [
            "fastap.distributed.DistributedAPLoss: the processes' embeddings differ in dimension "
            f"or dtype (rank 0: torch.float64 of dimension 5, rank 1: {second}); every process "
            "must give the same"
            for second in ("torch.float64 of dimension 4", "torch.float32 of dimension 5")
        ]

    # (rank 1's own errors, in the order of its bad batches, each from both entry points)
    own = [
        "embeddings contain NaN or infinity",
        "labels must be 1-D with one label per row of embeddings (3), got shape [2]",
        "embeddings must be a torch.Tensor, got str",
        "embeddings are on the meta device",
    ]
    owners = ["fastap.distributed.DistributedAPLoss", "fastap.distributed.gather_embeddings"]
    assert len(results[1]["bad_batches"]) == len(results[0]["bad_batches"]) == 2 * len(own)
    for i, (theirs, mine) in enumerate(zip(results[0]["bad_batches"], results[1]["bad_batches"])):
        owner = owners[i % 2]
        assert theirs == (
            f"{owner}: the batch of rank 1 was refused (that process raised why); every process "
            "raises with it"
        )
        assert mine.startswith(owner) and own[i // 2] in mine, mine

    embeddings, labels = global_batch()
    embeddings.requires_grad_()
    expected = fastap.APLoss(num_bins=15, variant="tie_aware")(embeddings, labels)
    expected.backward()
    total = sum(r["share"] for r in results)
    torch.testing.assert_close(total, expected.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.cat([r["grad"] for r in results]), embeddings.grad, rtol=0, atol=1e-12
    )

    net = model()
    expected = fastap.FastAPLoss(num_bins=12)(net(embeddings.detach()), labels)
    expected.backward()
    torch.testing.assert_close(
        sum(r["ddp_share"] for r in results), expected.detach(), rtol=0, atol=1e-12
    )
    for rank_result in results:  # DDP leaves the same averaged gradients on every process
        for ours, ref in zip(rank_result["ddp_grads"], [p.grad for p in net.parameters()]):
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)

    for i, sizes in enumerate(UNEVEN_SIZES):
        all_embeddings, all_labels = global_batch(sizes)
        all_embeddings.requires_grad_()
        expected = fastap.APLoss(num_bins=10)(all_embeddings, all_labels)
        expected.backward()
        total = sum(r["uneven"][i][0] for r in results)
        torch.testing.assert_close(total, expected.detach(), rtol=0, atol=1e-12)
        grads = torch.cat([r["uneven"][i][1] for r in results])
        torch.testing.assert_close(grads, all_embeddings.grad, rtol=0, atol=1e-12)

    net = model()
    fastap.APLoss(num_bins=9)(net(embeddings.detach()), labels).backward()
    for rank_result in results:
        for ours, ref in zip(rank_result["staged_grads"], [p.grad for p in net.parameters()]):
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


# One process of its own (its process group, and a hang, stay there).
COMPILED_ALONE = """
import os, sys, torch, torch.distributed as dist, fastap
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
loss = fastap.distributed.DistributedAPLoss(fastap.APLoss(num_bins=12))
embeddings, labels = torch.randn(10, 8, dtype=torch.float64), torch.arange(10) % 3
eager = loss(embeddings, labels)
compiled = torch.compile(loss, backend="eager")(embeddings, labels)
assert torch.equal(compiled, eager), (compiled, eager)
dist.destroy_process_group()
print("done")
"""


def test_compiled_in_one_process_runs_its_collectives_eagerly(tmp_path):
    """Traced by torch.compile, the size exchange deadlocked (gloo's thread waiting for the GIL
    that the tracing thread held while it waited for the collective): four runs of four."""
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_ALONE, str(tmp_path / "init")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "done" in done.stdout, done.stdout + done.stderr
