"""Every public entry point, with one argument at a time replaced by each value of a pool of wrong
or awkward ones: the call either works (where the value is valid there), and a loss it returns is
finite, or it raises a TypeError or ValueError that starts with "fastap" and names the argument.
Never another exception (numpy's "truth value of an array is ambiguous", a torch error from
inside, an AttributeError), a silent NaN loss, a crash or a hang."""

from __future__ import annotations

import decimal
import fractions
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import fastap
from fastap import metrics
from fastap.memory import CrossBatchMemory
from fastap.train import multistage_backward

N, M, D = 5, 7, 4


def pool() -> list:
    """The wrong and awkward values: other types, shapes, dtypes, devices and layouts, numbers at
    and beyond the limits, and values valid for some arguments only."""
    t = torch
    tensors = [
        t.tensor(1.0), t.tensor([1.0, 2.0]), t.zeros((), dtype=t.int64), t.tensor([0, 2**40]),
        t.zeros(N, M, dtype=t.int64), t.ones(N, M, dtype=t.bool), t.zeros(N, M, dtype=t.uint8),
        t.zeros(N, M, dtype=t.int8), t.zeros(N, M, dtype=t.complex64), t.zeros(M, N),
        t.zeros(N, M, dtype=t.float16), t.zeros(N, M, dtype=t.float8_e4m3fn),
        t.zeros(N, M, dtype=t.float64),
        t.zeros(N), t.zeros(0, M), t.zeros(N, 0), t.zeros(N, M, 2), t.zeros(N, M, device="meta"),
        t.zeros(N, M).to_sparse(), t.full((N, M), math.nan), t.full((N, M), math.inf),
        t.randn(N, M).T.contiguous().T, t.zeros(N, 2 * M)[:, ::2], t.zeros(1, M).expand(N, M),
        t.zeros(N, M, requires_grad=True), t.zeros(N, D), t.zeros(N, D, dtype=t.float64),
        t.zeros(N, D, dtype=t.bfloat16), t.zeros(N, D, dtype=t.int32), t.zeros(M, D),
        t.zeros(0, D), t.arange(N), t.arange(M), t.arange(N) - 3, t.ones(N, dtype=t.bool),
        t.ones(M, dtype=t.bool), t.full((N,), -1.0), t.full((N,), math.inf), t.ones(N) * 1e38,
        t.zeros(N, dtype=t.uint64), t.full((N,), 2**63, dtype=t.uint64),
    ]  # fmt: skip
    numbers = [
        0, 1, 3, -1, 2**20 + 1, 2**70, -(2**70), 2.5, 1.0, -0.0, 1e-300, 1e300, math.nan, math.inf,
        True, False, 1 + 2j, np.float32(0.5), np.bool_(True), np.uint64(2**64 - 1), np.int8(-3),
        np.float16(0.5), fractions.Fraction(1, 3), decimal.Decimal("0.5"),
    ]  # fmt: skip
    sequences = [
        [1, 2], (0.0,), (1.0, 0.0), (0.0, math.nan), (0, 1, 2), (math.inf, 1.0), (-1.0, -1.0),
        (np.float64(0), 1), [0.0, 1.0], (1, 1), (0, 4), (-4.0, 0.0), (1e-300, 2e-300),
        (1e308, 1.7e308), [[0, 1]] * N, [1] * N, [1.0] * N, range(3), torch.Size([2]), {"a": 1},
        {1, 2}, np.zeros((N, M)), np.zeros((N, M), dtype=np.float32), np.ones(N, dtype=np.int64),
        np.array(["a", "b"]), np.array("AP"), np.array(3), np.array([1, 2]),
    ]  # fmt: skip
    others = [
        None, "x", "ap_q", "tie_aware", "AP", "map", b"AP", torch.float16, torch.bfloat16,
        torch.float32, torch.int64, object(), print, float, torch.nn.Linear(2, 2),
    ]  # fmt: skip
    return tensors + numbers + sequences + others


@dataclass
class EntryPoint:
    """A public call, its valid arguments, and how its messages name each argument."""

    call: Callable[..., object]
    arguments: Callable[[], dict]
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    returns_loss: bool = False


def scores() -> torch.Tensor:
    return torch.randn(N, M, generator=torch.Generator().manual_seed(0))


def relevance() -> torch.Tensor:
    return torch.rand(N, M, generator=torch.Generator().manual_seed(1)) < 0.4


def embeddings_of(rows: int = N) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(rows))


def labels_of(rows: int = N) -> torch.Tensor:
    return torch.randint(0, 3, (rows,), generator=torch.Generator().manual_seed(rows))


def miner_pairs() -> tuple:
    return (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([2, 3]), torch.tensor([3, 4]))


def bins_and_range() -> dict:
    return dict(num_bins=20, score_range=(-1.0, 1.0), variant="ap_q")


def compat_call(nq, min, max, simplified, x, label, qw, ret):
    return fastap.compat.TAPLoss(nq, min, max, simplified)(x, label, qw=qw, ret=ret)


def memory_call(loss, size, embeddings, labels, enqueue):
    memory = CrossBatchMemory(loss, size=size)
    memory(embeddings_of(2), labels_of(2))  # (entries to rank against)
    return memory(embeddings, labels, enqueue=enqueue)


def multistage_call(chunk_size, autocast_dtype, scaler, preserve_rng_state):
    # (model, inputs and loss_fn are the user's code, whose errors reach the caller as they are)
    model = torch.nn.Linear(D, 3)
    return multistage_backward(
        model, embeddings_of(), lambda d: fastap.APLoss()(d, labels_of()), chunk_size,
        autocast_dtype=autocast_dtype, scaler=scaler, preserve_rng_state=preserve_rng_state,
    )  # fmt: skip


def module_call(module_class):
    def call(num_bins, embeddings, labels, indices_tuple, ref_emb, ref_labels, **options):
        module = module_class(num_bins, **options)
        return module(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    return call


def queries_and_database() -> dict:
    return dict(
        queries=embeddings_of(),
        database=embeddings_of(M),
        labels=labels_of(),
        ref_labels=labels_of(M),
    )


def module_batch() -> dict:
    """The call arguments of the modules: a batch, a miner's pairs and a reference set."""
    return dict(
        embeddings=embeddings_of(),
        labels=labels_of(),
        indices_tuple=miner_pairs(),
        ref_emb=embeddings_of(M),
        ref_labels=labels_of(M),
    )


#: (An embeddings tensor of another size is named by what it no longer matches.)
MODULE_NAMES = {"embeddings": ("embeddings", "ref_emb", "indices_tuple")}


def in_batch_labels() -> dict:
    return dict(labels=labels_of(), ref_labels=labels_of(M), exclude_self=True, self_offset=2)


ENTRY_POINTS = {
    "average_precision": EntryPoint(
        fastap.average_precision,
        lambda: dict(scores=scores(), relevance=relevance(), ignore=None, **bins_and_range()),
    ),
    "average_precision_labels": EntryPoint(
        fastap.average_precision,
        lambda: dict(scores=scores(), **in_batch_labels(), **bins_and_range()),
        names={"labels": ("labels", "query"), "scores": ("scores", "labels")},
    ),
    "ap_loss": EntryPoint(
        fastap.ap_loss,
        lambda: dict(
            scores=scores(),
            relevance=relevance(),
            query_weights=torch.ones(N),
            ignore=None,
            **bins_and_range(),
        ),
        returns_loss=True,
    ),
    "ap_loss_from_embeddings": EntryPoint(
        fastap.ap_loss_from_embeddings,
        lambda: dict(
            **queries_and_database(),
            query_weights=None,
            block_size=3,
            **bins_and_range(),
        ),
        names={"queries": ("queries", "query"), "database": ("database", "ref_labels")},
        returns_loss=True,
    ),
    "APLoss": EntryPoint(
        module_call(fastap.APLoss),
        lambda: dict(
            num_bins=20,
            score_range=(-1.0, 1.0),
            variant="ap_q",
            score_matrix_limit=2**30,
            **module_batch(),
        ),
        names=MODULE_NAMES,
        returns_loss=True,
    ),
    "FastAPLoss": EntryPoint(
        module_call(fastap.FastAPLoss),
        lambda: dict(num_bins=10, **module_batch()),
        names=MODULE_NAMES,
        returns_loss=True,
    ),
    "compat": EntryPoint(
        compat_call,
        lambda: dict(
            nq=25,
            min=0,
            max=1,
            simplified=False,
            x=scores(),
            label=relevance().float(),
            qw=torch.ones(N),
            ret="1-mAP",
        ),
        names={"min": ("min",), "max": ("max",)},
        returns_loss=True,
    ),
    "metrics.average_precision": EntryPoint(
        metrics.average_precision,
        lambda: dict(
            scores=scores(),
            relevance=relevance(),
            ignore=None,
            ties="average",
            return_valid=False,
            chunk_size=2,
        ),
    ),
    "retrieval_metrics": EntryPoint(
        metrics.retrieval_metrics,
        lambda: dict(
            **queries_and_database(),
            ks=(1, 2),
            metrics=("map", "recall", "map_at_r"),
            chunk_size=2,
            exclude_self=False,
            ties="average",
        ),
        names={"queries": ("queries", "labels"), "database": ("database", "ref_labels")},
    ),
    "revisited_map": EntryPoint(
        metrics.revisited_map,
        lambda: dict(
            scores=scores(),
            ground_truth=[{"easy": [0, 1], "hard": [2], "junk": [3]}] * N,
            kappas=(1, 5),
            is_ranking=False,
            chunk_size=2,
        ),
        names={"is_ranking": ("is_ranking", "scores")},
    ),
    "CrossBatchMemory": EntryPoint(
        memory_call,
        lambda: dict(
            loss=fastap.APLoss(),
            size=8,
            embeddings=embeddings_of(),
            labels=labels_of(),
            enqueue=True,
        ),
        names={"embeddings": ("embeddings", "dimension")},
        returns_loss=True,
    ),
    "multistage_backward": EntryPoint(
        multistage_call,
        lambda: dict(chunk_size=2, autocast_dtype=None, scaler=None, preserve_rng_state=True),
        returns_loss=True,
    ),
    "unit_rows": EntryPoint(fastap.cosine.unit_rows, lambda: dict(x=embeddings_of())),
    "freeze_batchnorm": EntryPoint(
        fastap.train.freeze_batchnorm, lambda: dict(model=torch.nn.BatchNorm1d(3))
    ),
    "cosine_scores": EntryPoint(
        fastap.cosine.cosine_scores,
        lambda: dict(queries=embeddings_of(), database=embeddings_of(M)),
    ),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_one_wrong_argument_at_a_time(entry):
    point = ENTRY_POINTS[entry]
    problems = []
    for argument in point.arguments():
        names = point.names.get(argument, (argument,))
        for value in pool():
            arguments = point.arguments()
            arguments[argument] = value
            try:
                result = point.call(**arguments)
            except (TypeError, ValueError) as error:
                message = str(error)
                if not message.startswith("fastap") or not any(n in message for n in names):
                    problems.append(
                        f"{argument}={value!r:.60}: {type(error).__name__}: {message:.300}"
                    )
                continue
            except Exception as error:  # (what this test looks for)
                problems.append(f"{argument}={value!r:.60}: {type(error).__name__}: {error!s:.300}")
                continue
            if point.returns_loss and isinstance(result, torch.Tensor):
                if result.device.type != "meta" and not bool(torch.isfinite(result).all()):
                    problems.append(f"{argument}={value!r:.60}: a loss of {result}")
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} in all)"
