"""Bad input raises a ValueError/TypeError that names the argument, before any kernel runs."""

import re
import sys

import numpy as np
import pytest
import torch

import fastap

S = torch.rand(4, 5)
L4 = torch.arange(4)
L5 = torch.arange(5)
# Fixed, not drawn: every query has a positive and a negative, so a test that spoils one query's
# scores sees a defined AP change rather than the no-positive answer (AP 0, loss term left out).
R = torch.tensor(
    [
        [1, 0, 0, 1, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [1, 0, 0, 0, 1],
    ],
    dtype=torch.bool,
)


HUGE_INDEX_GROUND_TRUTH = [{"easy": [2**70], "hard": [], "junk": []}] * 4


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: fastap.ap_loss(torch.rand(4), labels=L4), ValueError, "scores must be 2-D"),
        (lambda: fastap.ap_loss(torch.rand(2, 2, 2), R), ValueError, r"shape \[2, 2, 2\]"),
        (lambda: fastap.ap_loss(S.long(), R), TypeError, "scores must be float"),
        (lambda: fastap.ap_loss(S.to(torch.complex64), R), TypeError, "scores must be float"),
        (lambda: fastap.ap_loss(S.numpy(), R), TypeError, "scores must be a torch.Tensor"),
        (lambda: fastap.ap_loss(S.to_sparse(), R), TypeError, "scores must be a dense .*sparse"),
        (lambda: fastap.ap_loss(S, R.to_sparse()), TypeError, "relevance must be a dense"),
        (
            lambda: fastap.APLoss()(S.to_sparse(), L4),
            TypeError,
            "fastap.APLoss: embeddings must be a dense",
        ),
        (
            lambda: fastap.metrics.average_precision(S.to_sparse(), R),
            TypeError,
            "scores must be a dense",
        ),
        (
            lambda: fastap.metrics.revisited_map(S, HUGE_INDEX_GROUND_TRUTH),
            ValueError,
            r"ground_truth\[0\]\['easy'\] holds an index beyond int64",
        ),
        (lambda: fastap.ap_loss(S), ValueError, "exactly one of relevance"),
        (lambda: fastap.ap_loss(S, R, labels=L4), ValueError, "got both"),
        (lambda: fastap.ap_loss(S, torch.rand(5, 4) < 0.5), ValueError, "relevance must have"),
        (lambda: fastap.ap_loss(S, R.float() * 2), ValueError, "relevance must hold only 0 and 1"),
        (lambda: fastap.ap_loss(S, R.to(torch.complex64)), TypeError, "relevance"),
        (lambda: fastap.ap_loss(S, labels=L5, ref_labels=L5), ValueError, "labels must be 1-D"),
        (lambda: fastap.ap_loss(S, labels=L4.float(), ref_labels=L5), TypeError, "labels must be"),
        (lambda: fastap.ap_loss(S, labels=L4, ref_labels=L4), ValueError, "ref_labels must be 1-D"),
        (lambda: fastap.ap_loss(S, labels=L4), ValueError, "pass ref_labels"),
        (lambda: fastap.ap_loss(S, R, ref_labels=L5), ValueError, "ref_labels goes with labels"),
        (lambda: fastap.ap_loss(S, R, ignore=R[:, :4]), ValueError, "ignore must have"),
        (lambda: fastap.ap_loss(S, R, ignore=R.float() - 1), ValueError, "ignore must hold"),
        (lambda: fastap.ap_loss(S, R, num_bins=1), ValueError, "num_bins must be at least 2"),
        (lambda: fastap.ap_loss(S, R, num_bins=2.5), TypeError, "num_bins must be an int"),
        (lambda: fastap.ap_loss(S, R, score_range=(1, 1)), ValueError, "lo < hi"),
        (lambda: fastap.ap_loss(S, R, score_range=(1, -1)), ValueError, "lo < hi"),
        (lambda: fastap.ap_loss(S, R, score_range=(0, float("inf"))), ValueError, "finite"),
        # (an int beyond float64's range is infinite there, not an OverflowError)
        (lambda: fastap.ap_loss(S, R, score_range=(0, 10**400)), ValueError, "finite"),
        (lambda: fastap.ap_loss(S, R, score_range=(-(10**400), 1)), ValueError, "finite"),
        (lambda: fastap.APLoss(score_range=(0, 10**400)), ValueError, "score_range must be fin"),
        (lambda: fastap.compat.APLoss(min=0, max=10**400), ValueError, "min and max must be fin"),
        (
            lambda: fastap.ap_loss(S, R, score_range=(torch.tensor(0.0, device="meta"), 1)),
            TypeError,
            "score_range must be a pair of numbers",
        ),
        (lambda: fastap.ap_loss(S, R, score_range=1.0), TypeError, "score_range must be a pair"),
        (lambda: fastap.ap_loss(S, R, score_range={0: 1}), TypeError, "score_range must be a pair"),
        (lambda: fastap.ap_loss(S, R, score_range={0, 1}), TypeError, "score_range must be a pair"),
        (lambda: fastap.ap_loss(S, R, score_range=("0", "1")), TypeError, "pair of numbers"),
        (lambda: fastap.ap_loss(S, R, score_range=(False, True)), TypeError, "pair of numbers"),
        (
            lambda: fastap.ap_loss(S, R, score_range=(torch.tensor([0.0]), 1)),
            TypeError,
            "pair of numbers",
        ),
        (lambda: fastap.ap_loss(S, R, variant=None), TypeError, "variant must be a str"),
        (lambda: fastap.ap_loss(S, R, variant=1), TypeError, "variant must be a str"),
        (lambda: fastap.ap_loss(S, R, variant="ap"), ValueError, "variant must be one of"),
        (lambda: fastap.compat.APLoss(min="0", max="1"), TypeError, "min and max must be numbers"),
        (lambda: fastap.compat.TAPLoss(simplified="no"), TypeError, "simplified must be a bool"),
        (
            lambda: fastap.ap_loss(S, R, exclude_self=np.bool_(True)),
            TypeError,
            "exclude_self must be a bool, got numpy.bool",
        ),
        (
            lambda: fastap.ap_loss(S, R, exclude_self=True),
            ValueError,
            "exclude_self needs a square",
        ),
        (lambda: fastap.ap_loss(S, R, exclude_self=1), TypeError, "exclude_self must be a bool"),
        (lambda: fastap.ap_loss(S, R, self_offset=1), ValueError, "only applies with exclude_self"),
        (
            lambda: fastap.ap_loss(S, R, exclude_self=True, self_offset=2),
            ValueError,
            "needs candidate i \\+ self_offset",
        ),
        (
            lambda: fastap.ap_loss(S, R, exclude_self=True, self_offset=-1),
            ValueError,
            "self_offset",
        ),
        (lambda: fastap.ap_loss(S, R, query_weights=torch.ones(5)), ValueError, "query_weights"),
        (lambda: fastap.ap_loss(S, R, query_weights=-torch.ones(4)), ValueError, "non-negative"),
        (lambda: fastap.ap_loss(S, R, query_weights=torch.ones(4).long()), TypeError, "floating"),
        (
            lambda: fastap.ap_loss(S, R, query_weights=torch.tensor([1.0, float("nan"), 1, 1])),
            ValueError,
            "finite",
        ),
        (lambda: fastap.ap_loss(S, R.to("meta")), ValueError, "relevance is on meta"),
        (lambda: fastap.ap_loss(S, labels=L4, ref_labels=L5.to("meta")), ValueError, "ref_labels"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores(device, bad):
    scores = torch.rand(4, 5, device=device)
    scores[2, 3] = bad
    with pytest.raises(ValueError, match=r"NaN or infinity .*query row 2"):
        fastap.ap_loss(scores, R.to(device))
    # A non-finite score that is ignored counts nowhere and is accepted.
    ignore = torch.zeros(4, 5, dtype=torch.bool, device=device)
    ignore[2, 3] = True
    scores.requires_grad_()
    loss = fastap.ap_loss(scores, R.to(device), ignore=ignore)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all() and scores.grad[2, 3] == 0


@pytest.mark.parametrize("limit", [2**30, 0])  # the score-matrix path; block by block
def test_non_finite_embeddings(device, limit):
    """Embeddings with a NaN or an infinity are refused by row (with value checks on), whether
    or not a counted score would have carried it into the loss."""
    embeddings = torch.randn(6, 4, device=device)
    embeddings[3, 1] = float("inf")
    labels = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    row_3 = r"contain NaN or infinity \(first in row 3\); fix them upstream"
    memory = fastap.memory.CrossBatchMemory(fastap.APLoss(score_matrix_limit=limit), size=8)
    for owner, name, call in (
        ("fastap.APLoss", "embeddings", lambda: fastap.APLoss(score_matrix_limit=limit)(
            embeddings, labels)),
        ("fastap.FastAPLoss", "ref_emb", lambda: fastap.FastAPLoss(score_matrix_limit=limit)(
            embeddings[:2], labels[:2], ref_emb=embeddings, ref_labels=labels)),
        ("fastap", "queries", lambda: fastap.ap_loss_from_embeddings(embeddings, labels=labels)),
        ("fastap", "database", lambda: fastap.ap_loss_from_embeddings(
            embeddings[:2], embeddings, labels=labels[:2], ref_labels=labels)),
        ("fastap.memory.CrossBatchMemory", "embeddings", lambda: memory(embeddings, labels)),
        ("fastap.memory.CrossBatchMemory.enqueue", "embeddings", lambda: memory.enqueue(
            embeddings, labels)),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=f"^{owner}: {name} {row_3}"):
            call()
    assert memory.filled == 0  # (nothing non-finite was stored)
    # A query whose own scores all go uncounted (its self-match) is refused as well.
    lone = torch.full((1, 4), float("nan"), device=device)
    with pytest.raises(ValueError, match=r"embeddings contain NaN or infinity \(first in row 0"):
        fastap.APLoss(score_matrix_limit=limit)(lone, labels[:1])
    # A direct per_query_loss (which the checked entry points serve): from the score matrix, the
    # first query row whose scores hold a non-finite one; block by block, the queries' check.
    poisoned = r"embeddings contain NaN or infinity .*query row 0" if limit else f"queries {row_3}"
    with pytest.raises(ValueError, match=poisoned):
        fastap.APLoss(score_matrix_limit=limit).per_query_loss(embeddings, embeddings, labels, None)
    # Without value checks, the compiled answer: a NaN loss.
    with fastap.set_value_checks(False):
        assert fastap.APLoss(score_matrix_limit=limit)(embeddings, labels).isnan()


def test_value_checks_off_give_the_compiled_answers(device):
    # set_value_checks(False) skips the checks that read values (a host sync on CUDA); then a
    # query with a non-finite score has AP NaN and the others are untouched, relevance entries
    # other than 0/1 are positives and query weights are used as given.
    scores = torch.rand(4, 5, device=device)
    clean = fastap.average_precision(scores, R.to(device))
    scores[2, 3] = float("nan")
    with fastap.set_value_checks(False) as mode:
        assert isinstance(mode, fastap.set_value_checks)
        ap = fastap.average_precision(scores, R.to(device))
        assert torch.isnan(ap[2])
        torch.testing.assert_close(ap[[0, 1, 3]], clean[[0, 1, 3]], rtol=0, atol=0)
        twos = fastap.average_precision(S.to(device), R.to(device).float() * 2)
        torch.testing.assert_close(twos, fastap.average_precision(S.to(device), R.to(device)))
        weights = torch.tensor([1.0, -1.0, 1.0, 1.0], device=device)
        assert torch.isfinite(fastap.ap_loss(S.to(device), R.to(device), query_weights=weights))
    with pytest.raises(ValueError, match=r"NaN or infinity .*query row 2"):  # restored
        fastap.average_precision(scores, R.to(device))
    fastap.set_value_checks(False)  # on its own: sets the mode until set back
    try:
        assert torch.isnan(fastap.ap_loss(scores, R.to(device)))
    finally:
        fastap.set_value_checks(True)
    with pytest.raises(ValueError, match="NaN or infinity"):
        fastap.ap_loss(scores, R.to(device))

    # As a decorator: the mode holds during each call, and decorating changes nothing.
    @fastap.set_value_checks(False)
    def unchecked():
        return fastap.ap_loss(scores, R.to(device))

    with pytest.raises(ValueError, match="NaN or infinity"):
        fastap.ap_loss(scores, R.to(device))
    assert torch.isnan(unchecked())
    with pytest.raises(ValueError, match="NaN or infinity"):
        fastap.ap_loss(scores, R.to(device))
    with fastap.set_value_checks(False):
        checked = fastap.set_value_checks(True)(lambda: fastap.ap_loss(scores, R.to(device)))
        with pytest.raises(ValueError, match="NaN or infinity"):
            checked()
        assert torch.isnan(fastap.ap_loss(scores, R.to(device)))  # (its mode restored)


def test_value_checks_mode_is_per_thread_and_a_bool():
    import threading

    scores = S.clone()
    scores[0, 0] = float("inf")
    errors = []

    def other_thread():
        try:
            fastap.ap_loss(scores, R)
        except ValueError as e:
            errors.append(e)

    with fastap.set_value_checks(False):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1  # the other thread still checks
    with pytest.raises(TypeError, match="mode must be a bool"):
        fastap.set_value_checks(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("score_range", [(-3e38, 3e38), (0.0, 1e-38), (-1e39, 0.0), (0.0, 4e38)])
def test_score_range_must_fit_float32_below_float64(dtype, score_range):
    # Scores other than float64 are binned in float32: a range whose ends, width or bin scale
    # overflow it would bin against infinities (float64 scores take it and match the reference).
    scores = S.to(dtype)
    with pytest.raises(ValueError, match="does not fit float32"):
        fastap.average_precision(scores, R, score_range=score_range)
    with pytest.raises(ValueError, match="does not fit float32"):
        torch.ops.fastap.soft_histogram(scores, R, None, None, None, False, 20, *score_range)
    embeddings = torch.randn(4, 3).to(dtype)
    with pytest.raises(ValueError, match="does not fit float32"):
        fastap.ap_loss_from_embeddings(embeddings, labels=L4 % 2, score_range=score_range)
    wide = S.double() * score_range[1] + score_range[0] * (1 - S.double())
    ours = fastap.average_precision(wide, R, score_range=score_range)
    theirs = fastap.reference.average_precision(wide, R, score_range=score_range)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.skipif(sys.platform != "linux", reason="huge pages are a Linux feature")
def test_environment_switches_take_0_or_1(monkeypatch):
    """FASTAP_CPU_HUGE_PAGES (read at each call, also by the forward, whose histograms may be
    large): 1 on, 0 or empty off; another value raises, naming it, where it was silently off."""
    expected = fastap.ap_loss(S, R)
    for off in ("0", ""):
        monkeypatch.setenv("FASTAP_CPU_HUGE_PAGES", off)
        assert torch.equal(fastap.ap_loss(S, R), expected)
    for word in ("yes", "true", "2"):
        monkeypatch.setenv("FASTAP_CPU_HUGE_PAGES", word)
        with pytest.raises(ValueError, match=f"FASTAP_CPU_HUGE_PAGES must be 1 .* got '{word}'"):
            fastap.ap_loss(S, R)


def test_direct_op_calls_are_checked():
    with pytest.raises(ValueError, match="exactly one of relevance"):
        torch.ops.fastap.soft_histogram(S, None, None, None, None, False, 20, -1.0, 1.0)
    with pytest.raises(TypeError, match="labels must be int64"):
        torch.ops.fastap.soft_histogram(S, None, L4.int(), L5, None, False, 20, -1.0, 1.0)
    with pytest.raises(ValueError, match="num_bins must be at least 2"):
        torch.ops.fastap.soft_histogram(S, R, None, None, None, False, 1, -1.0, 1.0)
    with pytest.raises(ValueError, match="grad_n must have shape"):
        torch.ops.fastap.soft_histogram_backward(
            torch.zeros(4, 3), torch.zeros(4, 20), S, R, None, None, None, False, 20, -1.0, 1.0
        )
    # Incoming gradients are converted to the histogram dtype: an integer, bool or complex one
    # would lose its fractions or its imaginary part, so it is refused (float16 is taken).
    args = (S, R, None, None, None, False, 20, -1.0, 1.0)
    good = torch.randn(4, 20, generator=torch.Generator().manual_seed(0)).half().float()
    for dtype, name in ((torch.int64, "Long"), (torch.bool, "Bool"), (torch.complex64, "Complex")):
        bad = torch.zeros(4, 20, dtype=dtype)
        with pytest.raises(TypeError, match=f"grad_n must be a floating-point tensor, got {name}"):
            torch.ops.fastap.soft_histogram_backward(bad, good, *args)
        with pytest.raises(TypeError, match="grad_p must be a floating-point tensor"):
            torch.ops.fastap.soft_histogram_backward(good, bad, *args)
    half = torch.ops.fastap.soft_histogram_backward(good.half(), good, *args)
    assert torch.equal(half, torch.ops.fastap.soft_histogram_backward(good, good, *args))
    # A self_offset so large that N + self_offset overflows int64 is refused, not taken as a
    # column far outside the row.
    for offset in (2, 2**62, 2**63 - 1):
        with pytest.raises(ValueError, match="needs candidate i \\+ self_offset"):
            torch.ops.fastap.soft_histogram(S, R, None, None, None, True, 20, -1.0, 1.0, offset)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(num_bins=True), TypeError, "num_bins must be an int, got bool"),
        (dict(num_bins=torch.tensor(5)), TypeError, "num_bins must be an int, got torch.Tensor"),
        (dict(num_bins=2.5), TypeError, "num_bins must be an int, got float"),
        (dict(exclude_self=1), TypeError, "exclude_self must be a bool, got int"),
        (dict(self_offset=1.0), TypeError, "self_offset must be an int"),
        (dict(self_offset=2**63), ValueError, r"self_offset must be at most 2\*\*63 - 1"),
        (dict(exclude_self=False, self_offset=1), ValueError, "only applies with exclude_self"),
        (dict(lo=1.0, hi=0.0), ValueError, r"lo < hi, got \(1.0, 0.0\)"),
        (dict(scores=[[0.5]]), TypeError, "scores must be a torch.Tensor, got list"),
        # (the masks meet the op's own schema check, as they did before the wrapper made
        # tensors contiguous)
        (
            dict(relevance=[[True] * 5] * 4, labels=None, ref_labels=None),
            RuntimeError,
            r"Expected a value of type 'Optional\[Tensor\]' for argument 'relevance'",
        ),
        (
            dict(ignore=[[False] * 5] * 4),
            RuntimeError,
            r"Expected a value of type 'Optional\[Tensor\]' for argument 'ignore'",
        ),
    ],
)
def test_python_op_wrappers_check_their_arguments_as_the_front_ends_do(change, error, match):
    arguments = dict(
        scores=S, relevance=None, labels=L4, ref_labels=L5, ignore=None, exclude_self=True,
        num_bins=20, lo=-1.0, hi=1.0, self_offset=0,
    )  # fmt: skip
    arguments.update(change)
    with pytest.raises(error, match=match):
        fastap.ops.soft_histogram(**arguments)
    n = torch.rand(4, 5)
    with pytest.raises(TypeError, match="variant must be a str"):
        fastap.ops.ap_from_histograms(n, n, L4, 3)
    with pytest.raises(ValueError, match="variant must be one of"):
        fastap.ops.ap_from_histograms(n, n, L4, "AP_Q")


def test_direct_op_calls_with_a_meta_tensor_beside_cpu_ones_are_refused():
    """One meta argument sends a call to the fake (shape) function rather than the kernel: it
    checks the devices as the kernels do, instead of returning uninitialised CPU memory."""
    meta = L4.to("meta")
    ops = torch.ops.fastap
    with pytest.raises(ValueError, match="labels is on meta but scores is on cpu"):
        ops.soft_histogram(S, None, meta, L5, None, False, 5, -1.0, 1.0)
    with pytest.raises(ValueError, match="ignore is on meta but scores is on cpu"):
        ops.soft_histogram(S, R, None, None, R.to("meta"), False, 5, -1.0, 1.0)
    with pytest.raises(ValueError, match="grad_n is on meta but scores is on cpu"):
        ops.soft_histogram_backward(
            torch.rand(4, 5, device="meta"), torch.rand(4, 5), S, R, None, None, None, False,
            5, -1.0, 1.0,
        )  # fmt: skip
    n = torch.rand(3, 4)
    with pytest.raises(ValueError, match="positives is on meta but n is on cpu"):
        ops.ap_from_histograms(n, n, torch.ones(3, device="meta"), "ap_q")
    with pytest.raises(ValueError, match="grad_ap is on meta but n is on cpu"):
        ops.ap_from_histograms_backward(torch.ones(3, device="meta"), n, n, L4[:3], "ap_q")
    q = torch.rand(4, 3)
    with pytest.raises(ValueError, match="ref_labels is on meta but queries is on cpu"):
        ops.embedding_histogram(q, q, L4, meta, False, 0, 5, -1.0, 1.0)


def direct_op_calls(device: str) -> dict:
    """Each op's valid arguments on `device` (for the ops with a kernel there), by op name."""
    s, r, n = S.to(device), R.to(device), torch.rand(4, 5, device=device)
    counts, q, labels = L4.to(device), torch.rand(4, 3, device=device), L4.to(device)
    calls = {
        "soft_histogram": (s, r, None, None, None, False, 5, -1.0, 1.0),
        "soft_histogram_backward": (n, n, s, r, None, None, None, False, 5, -1.0, 1.0),
        "ap_from_histograms": (n, n, counts, "ap_q"),
        "ap_from_histograms_backward": (counts.double(), n, n, counts, "ap_q"),
    }
    if device != "cpu":  # (CUDA kernels only, and their fake functions)
        calls["embedding_histogram"] = (q, q, labels, labels, False, 0, 5, -1.0, 1.0)
        calls["embedding_histogram_backward"] = (n, n, q, q, labels, labels, False, 0, 5, -1.0, 1.0)
    return calls


@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_direct_op_calls_with_none_for_a_required_tensor_are_refused(device):
    """A None given for a required tensor argument reaches the kernels as an undefined tensor
    and the fake functions as None: each says which argument it is, rather than failing inside
    (torch's "tensor does not have a device", an AttributeError in a fake function)."""
    for op_name, arguments in direct_op_calls(device).items():
        op = getattr(torch.ops.fastap, op_name)
        names = [a.name for a in op.default._schema.arguments]
        for i, value in enumerate(arguments):
            argument_type = str(op.default._schema.arguments[i].type)
            if not isinstance(value, torch.Tensor) or argument_type != "Tensor":
                continue  # (optional tensors, numbers and flags)
            wrong = list(arguments)
            wrong[i] = None
            with pytest.raises(TypeError, match=f"fastap: {names[i]} must be a tensor, got None"):
                op(*wrong)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_the_ops_messages_keep_their_numbers(device):
    """The C++ checks' messages with numbers in them, raised by the ops on each device. An
    extension linked with a copy of the C++ library of its own (a compiler whose libstdc++.so is a
    dangling link: setup.py's loaded_libstdcxx) lost the numbers here and crashed on the GPU
    machine instead of raising."""
    scores = torch.rand(3, 4, device=device)
    relevance = scores > 0.5
    histogram = torch.ops.fastap.soft_histogram
    with pytest.raises(ValueError, match=r"num_bins must be at least 2, got 1$"):
        histogram(scores, relevance, None, None, None, False, 1, -1.0, 1.0)
    with pytest.raises(ValueError, match=r"self_offset must be >= 0, got -7$"):
        histogram(scores, relevance, None, None, None, True, 5, -1.0, 1.0, -7)
    with pytest.raises(ValueError, match=r"shape of scores \[3, 4\], got \[4, 3\]"):
        histogram(scores, relevance.T, None, None, None, False, 5, -1.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_score_ranges_that_the_grid_cannot_hold(dtype):
    """A range too wide for the float64 grid (hi - lo overflows: every score would fall in bin
    0), or whose ends round to one float32 (the float32 grid), is refused by the front end and
    by the op alike."""
    scores = torch.tensor([[1.0, 2.0, 0.5]], dtype=dtype)
    relevance = torch.tensor([[False, False, True]])
    cases = [(3, (1.0, 1.0 + 1e-10), "round to the same float32")]
    if dtype == torch.float64:
        # (num_bins - 1) / (hi - lo) overflows with a normal width, not a subnormal one, which
        # a flush-to-zero mode left on by an earlier compiled kernel would read as 0.
        cases = [(3, (-1e308, 1e308), "does not fit float64"), (2**20, (0.0, 1e-303), "float64")]
    for num_bins, (lo, hi), match in cases:
        with pytest.raises(ValueError, match=match):
            fastap.ap_loss(scores, relevance, num_bins=num_bins, score_range=(lo, hi))
        with pytest.raises(ValueError, match=match):
            torch.ops.fastap.soft_histogram(
                scores, relevance, None, None, None, False, num_bins, lo, hi
            )
    if dtype != torch.float64:  # the front end's own check (it names the dtype), not the op's
        with pytest.raises(ValueError, match=f"in which {dtype} scores are binned"):
            fastap.ap_loss(scores, relevance, num_bins=3, score_range=(1.0, 1.0 + 1e-10))
    # Ranges beside those are taken: float64 scores over (1, 1 + 1e-10) bin correctly.
    if dtype == torch.float64:
        n = torch.ops.fastap.soft_histogram(
            scores, relevance, None, None, None, False, 3, 1.0, 1.0 + 1e-10
        )[0]
        assert n.tolist() == [[1.0, 0.0, 2.0]]


def test_ap_loss_module_errors():
    loss = fastap.APLoss()
    e = torch.randn(6, 3)
    labels = torch.arange(6) % 2
    with pytest.raises(ValueError, match="indices_tuple must be"):
        loss(e, labels, indices_tuple=(L4, L4))
    with pytest.raises(TypeError, match="1-D integer tensors"):
        loss(e, labels, indices_tuple=(L4.float(), L4, L4))
    with pytest.raises(ValueError, match="outside"):
        loss(e, labels, indices_tuple=(L4 + 5, L4, L4))
    with pytest.raises(ValueError, match="variant must be one of"):
        fastap.APLoss(variant="fast")
    with pytest.raises(ValueError, match="num_bins must be at least 2"):
        fastap.APLoss(num_bins=1)
    with pytest.raises(TypeError, match="score_range must be a pair"):
        fastap.APLoss(score_range=(0.0, 0.5, 1.0))
    with pytest.raises(ValueError, match="lo < hi"):
        fastap.APLoss(score_range=(1, 0))
    with pytest.raises(ValueError, match="FastAPLoss: num_bins must be at least 1, got 0"):
        fastap.FastAPLoss(num_bins=0)
    with pytest.raises(ValueError, match="ret must be"):
        fastap.compat.APLoss()(torch.rand(3, 4), torch.rand(3, 4) > 0.5, ret="mAP")
    for ret in (np.array(["AP", "AP"]), np.array("AP")):  # (numpy's str_ is a str: taken)
        with pytest.raises(TypeError, match="ret must be the str '1-mAP' or 'AP', got numpy"):
            fastap.compat.APLoss()(torch.rand(3, 4), torch.rand(3, 4) > 0.5, ret=ret)
    with pytest.raises(ValueError, match="ref_emb needs ref_labels"):
        loss(e, labels, ref_emb=torch.randn(3, 3))
    with pytest.raises(ValueError, match="same dimension"):
        loss(e, labels, ref_emb=torch.randn(3, 4), ref_labels=torch.arange(3))
    with pytest.raises(ValueError, match="ref_labels was given without ref_emb"):
        loss(e, labels, ref_labels=labels)
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        loss(torch.randn(6), labels)
    with pytest.raises(ValueError, match=r"embeddings must have at least one column, got \[6, 0\]"):
        loss(torch.randn(6, 0), labels)
    with pytest.raises(ValueError, match="ref_emb must have at least one column"):
        loss(e, labels, ref_emb=torch.randn(3, 0), ref_labels=torch.arange(3))
    with pytest.raises(TypeError, match="1-D integer tensors"):
        loss(e, labels, indices_tuple=(L4 > 0, L4 > 0, L4 > 0))
    with pytest.raises(TypeError, match="score_range must be a pair"):
        fastap.APLoss(score_range="01")
    with pytest.raises(TypeError, match="FastAPLoss: num_bins must be an int"):
        fastap.FastAPLoss(num_bins=1.5)
    for make in (fastap.APLoss, fastap.FastAPLoss):
        for value in (1.5, None, torch.tensor(5)):
            with pytest.raises(
                TypeError,
                match=r"\.(Fast)?APLoss: score_matrix_limit must be an int \(bytes\) or 'auto'",
            ):
                make(score_matrix_limit=value)
        with pytest.raises(
            ValueError, match=r"score_matrix_limit must be 'auto' or an int \(bytes\), got '1GB'"
        ):
            make(score_matrix_limit="1GB")
        with pytest.raises(
            ValueError, match=r"score_matrix_limit must be at least 0 \(bytes\), got -1"
        ):
            make(score_matrix_limit=-1)


def test_bin_counts_above_the_kernels_bound_fail_at_construction():
    """The kernels take at most 2^20 bins: every entry point says so before any call."""
    with pytest.raises(ValueError, match=r"num_bins must be at most 2\^20 = 1048576, got 1048577"):
        fastap.ap_loss(S, R, num_bins=2**20 + 1)
    with pytest.raises(ValueError, match=r"num_bins must be at most 2\^20"):
        fastap.APLoss(num_bins=2**21)
    with pytest.raises(ValueError, match=r"FastAPLoss: num_bins must be below 2\^20"):
        fastap.FastAPLoss(num_bins=2**20)  # 2^20 + 1 bins
    with pytest.raises(ValueError, match=r"nq .* at most 2\^20"):
        fastap.compat.TAPLoss(nq=2**20 + 1)
    with pytest.raises(ValueError, match=r"num_bins must be at most 2\^20"):
        fastap.ap_loss_from_embeddings(torch.randn(4, 3), labels=L4, num_bins=2**20 + 1)
    # The bound itself is taken.
    assert fastap.FastAPLoss(num_bins=2**20 - 1).num_edges == 2**20
    assert fastap.ap_loss(S, R, num_bins=2**20).isfinite()


def test_embedding_loss_arguments():
    q, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    ref_labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="ref_labels was given without a database"):
        fastap.ap_loss_from_embeddings(q, labels=labels, ref_labels=ref_labels)
    for exclude_self in ("False", 1, 0.0):
        with pytest.raises(TypeError, match="exclude_self must be a bool or None, got"):
            fastap.ap_loss_from_embeddings(q, labels=labels, exclude_self=exclude_self)
        with pytest.raises(TypeError, match="exclude_self must be a bool or None, got"):
            fastap.ap_loss_from_embeddings(
                q, q, labels=labels, ref_labels=ref_labels, exclude_self=exclude_self
            )
    with pytest.raises(ValueError, match="self_offset only applies with exclude_self=True"):
        fastap.ap_loss_from_embeddings(q, q, labels=labels, ref_labels=ref_labels, self_offset=3)
    with pytest.raises(TypeError, match="block_size must be an int, got float"):
        fastap.ap_loss_from_embeddings(q, labels=labels, block_size=2.0)
    with pytest.raises(ValueError, match="queries must have at least one column"):
        fastap.ap_loss_from_embeddings(q[:, :0], labels=labels)
    with pytest.raises(ValueError, match="database must have at least one column"):
        fastap.ap_loss_from_embeddings(q, q[:, :0], labels=labels, ref_labels=ref_labels)


def test_helpers_check_their_batches():
    e, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    memory = fastap.memory.CrossBatchMemory(size=10)
    distributed = fastap.distributed.DistributedAPLoss()  # checks before any collective
    for owner, call in (
        ("memory.CrossBatchMemory", memory),
        ("memory.CrossBatchMemory.enqueue", memory.enqueue),
        ("distributed.DistributedAPLoss", distributed),
        ("distributed.gather_embeddings", fastap.distributed.gather_embeddings),
    ):
        with pytest.raises(TypeError, match=f"^fastap.{owner}: embeddings must be floating"):
            call(e.long(), labels)
        with pytest.raises(ValueError, match=f"fastap.{owner}: embeddings must be 2-D"):
            call(e[0], labels[:1])
        with pytest.raises(ValueError, match=f"fastap.{owner}: embeddings must be 2-D"):
            call(e[None], labels)
        with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor, got list"):
            call(e, labels.tolist())
        with pytest.raises(ValueError, match="labels must be 1-D with one label per row"):
            call(e, labels[:3])
        with pytest.raises(
            TypeError, match=r"labels must be an integer or bool tensor.*labels\.long"
        ):
            call(e, labels.float())
    assert memory.filled == 0
    # The distributed helpers exchange batch sizes, which meta tensors do not hold.
    for owner, call in (
        ("distributed.DistributedAPLoss", distributed),
        ("distributed.gather_embeddings", fastap.distributed.gather_embeddings),
    ):
        with pytest.raises(ValueError, match=f"^fastap.{owner}: embeddings are on the meta dev"):
            call(e.to("meta"), labels.to("meta"))
    for group in (3, "default"):
        with pytest.raises(TypeError, match=r"DistributedAPLoss: group must be a torch\.distrib"):
            fastap.distributed.DistributedAPLoss(group=group)
        with pytest.raises(TypeError, match=r"gather_embeddings: group must be a torch\.distrib"):
            fastap.distributed.gather_embeddings(e, labels, group)


def test_public_helpers_name_their_bad_arguments():
    e = torch.randn(6, 4)
    reason = fastap.embeddings.fused_unavailable_reason
    for call, error, match in [
        (lambda: reason(None, None, 20), TypeError, "queries must be a torch.Tensor, got None"),
        (lambda: reason(e.long(), None, 20), TypeError, "queries must be floating point"),
        (lambda: reason(e, e[0], 20), ValueError, "database must be 2-D"),
        (lambda: reason(e, None, 1), ValueError, "num_bins must be at least 2, got 1"),
        (lambda: reason(e, e, 20.0), TypeError, "num_bins must be an int, got float"),
        (lambda: fastap.embeddings.fused_uses_wgmma([1]), TypeError, "queries must be a torch"),
        (lambda: fastap.embeddings.square_tile_side(0, 5), ValueError, "block_size must be at"),
        (lambda: fastap.embeddings.square_tile_side(4, -1), ValueError, "num_rows must be at"),
        (lambda: fastap.embeddings.square_tile_side(4.5, 5), TypeError, "block_size must be an"),
        (lambda: fastap.train.freeze_batchnorm(e), TypeError, "model must be a torch.nn.Module"),
    ]:
        with pytest.raises(error, match=match):
            call()
    # In batch (no database), as the losses take it: on the CPU, the device is the reason.
    assert (
        reason(e, None, 20) == reason(e, e, 20) == "the embeddings are on cpu, not on a CUDA device"
    )
    assert fastap.embeddings.square_tile_side(4, 5) == 3


def test_multistage_backward_of_an_empty_sequence():
    with pytest.raises(ValueError, match="inputs is an empty sequence"):
        fastap.train.multistage_backward(torch.nn.Linear(3, 2), [], lambda d: d.sum(), 2)


def test_front_end_errors_name_their_own_arguments():
    compat = fastap.compat
    with pytest.raises(ValueError, match=r"nq .* at least 2, got 1"):
        compat.APLoss(nq=1)
    with pytest.raises(TypeError, match=r"nq .* must be an int"):
        compat.TAPLoss(nq=2.5)
    with pytest.raises(TypeError, match=r"nq .* must be an int"):
        compat.TAPLoss(nq=True)
    assert compat.APLoss(nq=torch.tensor(7)).nq == 7  # integer-like values are fine
    with pytest.raises(ValueError, match="min < max, got 1 and 0"):
        compat.APLoss(min=1, max=0)
    with pytest.raises(ValueError, match="min < max"):
        compat.APLoss(max=float("inf"))
    with pytest.raises(TypeError, match="min and max must be numbers"):
        compat.APLoss(min=None)
    with pytest.raises(ValueError, match=r"got x \[5, 7\] and label \[3, 7\]"):
        compat.APLoss()(torch.rand(5, 7), torch.rand(3, 7) > 0.5)
    with pytest.raises(TypeError, match=r"nq .* must be an int, got tensor\(\[5\]\)"):
        compat.APLoss(nq=torch.tensor([5]))  # (a 0-d tensor only)
    # The checks behind compat name its arguments: x, label, qw, nq, min and max.
    x, label = torch.rand(4, 5), torch.rand(4, 5) > 0.5
    poisoned = x.clone()
    poisoned[1, 2] = float("nan")
    for call, error, message in [
        (lambda: compat.APLoss()(x.long(), label), TypeError, "x must be float32"),
        (lambda: compat.APLoss()(x, label * 0.5), ValueError, "label must hold only 0 and 1"),
        (lambda: compat.APLoss()(x, label, qw=-torch.ones(4)), ValueError, "qw must be finite"),
        (lambda: compat.TAPLoss()(x, label.to("meta")), ValueError, "label is on meta but x is"),
        (lambda: compat.APLoss()(poisoned, label), ValueError, r"x contains NaN .* row 1\); fix"),
        (
            lambda: compat.APLoss(min=0, max=1e-50)(x, label),
            ValueError,
            r"min and max \(0.0, 1e-50\) with nq = 25 bins does not fit float32",
        ),
    ]:
        with pytest.raises(error, match=f"^fastap.compat: {message}") as raised:
            call()
        assert "ignore" not in str(raised.value)
    e, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
    with pytest.raises(ValueError, match=r"^fastap.APLoss: labels must be 1-D with one label pe"):
        fastap.APLoss()(e, labels[:10])
    with pytest.raises(ValueError, match=r"^fastap.FastAPLoss: ref_labels must be 1-D with one "):
        fastap.FastAPLoss()(e, labels, ref_emb=e[:5], ref_labels=labels)
    with pytest.raises(TypeError, match=r"^fastap.APLoss: ref_labels must be an integer or bool"):
        fastap.APLoss()(e, labels, ref_emb=e[:5], ref_labels=labels[:5].float())
    with pytest.raises(ValueError, match="same device, got cpu and meta"):
        fastap.APLoss()(e, labels, ref_emb=e.to("meta"), ref_labels=labels)
    with pytest.raises(ValueError, match="same dimension and device"):
        fastap.ap_loss_from_embeddings(e, e.to("meta"), labels=labels, ref_labels=labels)
    memory = fastap.memory.CrossBatchMemory(fastap.APLoss(), size=32)
    memory(e, labels)
    with pytest.raises(ValueError, match=r"dimension the memory holds \(8\), got shape \[16, 4\]"):
        memory(e[:, :4], labels)


def test_missing_extension_says_how_to_build_it(monkeypatch, tmp_path):
    # A built extension that failed to load (say, against another torch): what it was built for,
    # the torch it met, and how to rebuild.
    monkeypatch.setattr(fastap.ops, "_LOAD_ERROR", ImportError("undefined symbol: _ZN3c10"))
    scores, relevance = torch.rand(3, 4), torch.rand(3, 4) > 0.5
    with pytest.raises(
        RuntimeError,
        match=r"extension fastap/_C\..*failed to load with torch "
        + re.escape(torch.__version__)
        + r" \(undefined symbol: _ZN3c10\): it loads only with the torch it was built against\. "
        r"Rebuild fastap against the torch you run",
    ):
        fastap.ap_loss(scores, relevance)
    # The paths from embeddings too, before any operator runs (the histograms alone), and the
    # modules' above their score_matrix_limit.
    embeddings, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    for call in (
        lambda: fastap.embeddings.histograms_from_embeddings(embeddings, labels=labels),
        lambda: fastap.ap_loss_from_embeddings(embeddings, labels=labels),
        lambda: fastap.APLoss(score_matrix_limit=0)(embeddings, labels),
        lambda: fastap.FastAPLoss(score_matrix_limit=0)(embeddings, labels),
    ):
        with pytest.raises(RuntimeError, match=r"fastap/_C\..* failed to load .*\. Rebuild"):
            call()
    # A package without the extension (an install whose build was deleted, say) says it is not
    # built; a source tree without a build (an unpacked sdist one runs the tests in) says so too.
    monkeypatch.setattr(fastap.ops, "_LOAD_ERROR", ImportError("No module named 'fastap._C'"))
    (tmp_path / "fastap").mkdir()
    monkeypatch.setattr(fastap.ops, "__file__", str(tmp_path / "fastap" / "ops.py"))
    with pytest.raises(RuntimeError, match=r"fastap\._C is not built \(No module .*\. Rebuild"):
        fastap.ap_loss(scores, relevance)
    (tmp_path / "setup.py").touch()
    with pytest.raises(RuntimeError, match=r"source tree .* which has no built extension"):
        fastap.ap_loss(scores, relevance)


def test_numpy_integers_are_ints():
    """Integer arguments take numpy integers (a count read from a config array, say) as the ints
    they are, with the same results; numpy floats and bools, and tensors, stay refused."""
    import fastap.memory

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    e = torch.randn(6, 4, dtype=torch.float64)
    scores = torch.randn(2, 6, dtype=torch.float64).clamp(-1, 1)
    for integer in (np.int64, np.int32, np.uint8):
        assert torch.equal(
            fastap.ap_loss(S, R, num_bins=integer(7)), fastap.ap_loss(S, R, num_bins=7)
        )
        assert torch.equal(
            fastap.ap_loss_from_embeddings(
                e, labels=labels, num_bins=integer(7), block_size=integer(4)
            ),
            fastap.ap_loss_from_embeddings(e, labels=labels, num_bins=7, block_size=4),
        )
        subset = {"labels": labels[2:4], "ref_labels": labels, "exclude_self": True}
        assert torch.equal(
            fastap.ap_loss(scores, **subset, self_offset=integer(2)),
            fastap.ap_loss(scores, **subset, self_offset=2),
        )
        fast_ap = fastap.FastAPLoss(num_bins=integer(9))
        assert type(fast_ap.num_bins) is int and (fast_ap.num_bins, fast_ap.num_edges) == (9, 10)
        assert type(fastap.memory.CrossBatchMemory(size=integer(16)).size) is int
    for not_an_int, got in (
        (np.float64(7.0), "numpy.float64"),
        (np.bool_(True), "numpy.bool"),
        (torch.tensor(7), "torch.Tensor"),
    ):
        with pytest.raises(TypeError, match=f"num_bins must be an int, got {got}"):
            fastap.ap_loss(S, R, num_bins=not_an_int)


def test_real_numbers_of_every_kind_are_range_ends():
    """score_range and the authors' min and max take ints, floats, numpy numbers and 0-d real
    tensors, with the same results (strings and bools, which float() would take, are refused
    above)."""
    expected = fastap.ap_loss(S, R, score_range=(-1.0, 1.0))
    for lo, hi in ((-1, 1), (np.float32(-1), np.int64(1)), (torch.tensor(-1.0), torch.tensor(1))):
        assert torch.equal(fastap.ap_loss(S, R, score_range=(lo, hi)), expected)
        assert fastap.compat.APLoss(min=lo, max=hi)(S, R).isfinite()


def test_wide_unsigned_indices_rankings_and_counts_are_taken_by_value():
    """uint16, uint32 and uint64 tensors, which torch holds but has no comparison, min or max
    kernels for, give a miner's indices (with ref_emb too), a ranking to revisited_map and the
    counts of ap_from_histograms the answers of their int64 values; uint64 values of 2**63 and
    more are refused as out of range."""
    from fastap.functional import ap_from_histograms

    g = torch.Generator().manual_seed(3)
    embeddings, labels = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    ref_emb, ref_labels = torch.randn(7, 3, generator=g), torch.randint(0, 3, (7,), generator=g)
    pairs = [torch.tensor(v) for v in ((0, 1, 2), (1, 0, 3), (4, 5, 6))]
    scores = torch.rand(2, 5, generator=g)
    ranking = torch.argsort(scores, dim=1, descending=True)
    gnd = [{"easy": [0, 1], "hard": [2], "junk": []}, {"easy": [3], "hard": [], "junk": [4]}]
    n = torch.tensor([[1.0, 1.0], [0.5, 2.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.0]])
    counts = torch.tensor([1, 2, 0])
    loss = fastap.APLoss()
    expected = (
        loss(embeddings, labels, tuple(pairs), ref_emb=ref_emb, ref_labels=ref_labels),
        loss(embeddings, labels, tuple(pairs)),
        fastap.metrics.revisited_map(ranking, gnd, is_ranking=True),
        ap_from_histograms(n, p, counts, "ap_q"),
    )
    dtypes = [getattr(torch, name) for name in ("uint16", "uint32", "uint64", "float8_e4m3fn")]
    for dtype in dtypes:
        if not dtype.is_floating_point:
            wide = tuple(t.to(dtype) for t in pairs)
            got = loss(embeddings, labels, wide, ref_emb=ref_emb, ref_labels=ref_labels)
            assert torch.equal(got, expected[0])
            assert torch.equal(loss(embeddings, labels, wide), expected[1])
            got_map = fastap.metrics.revisited_map(ranking.to(dtype), gnd, is_ranking=True)
            assert got_map == expected[2]
        for got, want in zip(ap_from_histograms(n, p, counts.to(dtype), "ap_q"), expected[3]):
            assert torch.equal(got, want)
    huge = torch.tensor([2**63], dtype=torch.uint64)
    with pytest.raises(ValueError, match="outside"):
        loss(embeddings, labels, (pairs[0][:1], huge, pairs[2][:1]), ref_emb, ref_labels)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        fastap.metrics.revisited_map(
            torch.tensor([[2**63, 1]], dtype=torch.uint64), gnd[:1], is_ranking=True
        )
    # (2**63 as a count wraps to a negative one, in the op and in the flags alike.)
    ap, valid = ap_from_histograms(n[:1], p[:1], huge, "ap_q")
    assert ap.item() == 0 and not valid.item()
    # The ground truth's indices in uint64 (a tensor, a numpy array, a list of numpy scalars,
    # which torch.as_tensor alone does not take): by value, and 2**63 or more beyond int64.
    ranked = fastap.metrics.revisited_map(ranking, gnd, is_ranking=True)
    for wide in (
        lambda v: torch.tensor(v, dtype=torch.uint64),
        lambda v: np.array(v, dtype=np.uint64),
        lambda v: [np.uint64(i) for i in v],
    ):
        wide_gnd = [{key: wide(value) for key, value in g.items()} for g in gnd]
        assert fastap.metrics.revisited_map(ranking, wide_gnd, is_ranking=True) == ranked
        beyond = [{"easy": wide([2**63]), "hard": wide([]), "junk": wide([])}] * 2
        with pytest.raises(ValueError, match=r"ground_truth\[0\]\['easy'\] holds an index beyond"):
            fastap.metrics.revisited_map(ranking, beyond, is_ranking=True)


def test_uint64_labels_beyond_int64_are_refused():
    # 2**64 - 1 would wrap onto the int64 label -1 and match it (torch itself refuses to compare
    # uint64 with int64); the same labels in range are taken by value.
    big = torch.tensor([-1, 3, 3, 4]).view(torch.uint64)
    small = torch.tensor([2, 3, 3, 4]).to(torch.uint64)
    signed = torch.tensor([-1, 3, 4, 4])
    scores = torch.rand(4, 4)
    embeddings = torch.randn(4, 3)
    calls = {
        "average_precision": lambda y: fastap.average_precision(
            scores, labels=y, ref_labels=signed
        ),
        "ap_loss_from_embeddings": lambda y: fastap.ap_loss_from_embeddings(
            embeddings, embeddings, labels=y, ref_labels=signed
        ),
        "APLoss": lambda y: fastap.APLoss()(embeddings, y),
        "FastAPLoss": lambda y: fastap.FastAPLoss()(embeddings, y),
        "retrieval_metrics": lambda y: fastap.metrics.retrieval_metrics(embeddings, labels=y),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"labels holds uint64 values of 2\*\*63 or more"):
            call(big)
            pytest.fail(f"{name} took uint64 labels beyond int64")
        call(small)  # (in range: accepted)
    with pytest.raises(ValueError, match=r"ref_labels holds uint64 values of 2\*\*63 or more"):
        fastap.average_precision(scores, labels=signed, ref_labels=big)
    # A value check like the others: without value checks, and under torch.compile, they wrap
    # (2**64 - 1 matches -1), as documented, and there is no host sync.
    wrapped = torch.tensor([-1, 3, 3, 4])
    expected = fastap.average_precision(scores, labels=wrapped, ref_labels=signed)
    with fastap.set_value_checks(False):
        got = fastap.average_precision(scores, labels=big, ref_labels=signed)
    assert torch.equal(got, expected)
    # (aot_eager: dynamo's tracing is what is checked; inductor's CPU kernels of torch 2.5 turn
    # on flush-to-zero for the process, test_compile.py's keep_subnormals)
    compiled = torch.compile(fastap.average_precision, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(scores, labels=big, ref_labels=signed), expected)


def test_negative_relevance_and_ignore_entries_count_as_nonzero_without_value_checks(device):
    """Without value checks a mask is taken as documented: any nonzero entry, negative ones
    included, is a positive (relevance) or ignored (ignore)."""
    relevance = R.to(device).double()
    ignore = torch.zeros(4, 5, dtype=torch.float64, device=device)
    ignore[1, 2] = ignore[3, 0] = 1
    scores = S.to(device)
    expected = fastap.average_precision(scores, relevance != 0, ignore=ignore != 0)
    with fastap.set_value_checks(False):
        got = fastap.average_precision(scores, relevance * -2.5, ignore=ignore * -1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_miner_index_equal_to_the_batch_size_is_refused():
    e = torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    for loss in (fastap.APLoss(), fastap.FastAPLoss()):
        with pytest.raises(ValueError, match=r"indices outside \[0, 4\)"):
            loss(e, labels, indices_tuple=(L4, L4, torch.tensor([0, 1, 2, 4])))
        loss(e, labels, indices_tuple=(L4, L4, torch.tensor([0, 1, 2, 3])))  # the largest: fine
        # With a reference set, the positives and negatives index its rows (3 here).
        ref = {"ref_emb": e[:3], "ref_labels": labels[:3]}
        for bad in ((L4, torch.tensor([0]), torch.tensor([-5])), (L4, torch.tensor([3]), L4[:1])):
            with pytest.raises(ValueError, match=r"indices outside \[0, 3\) \(ref_emb\)"):
                loss(e, labels, indices_tuple=bad, **ref)
        pairs = (L4, torch.tensor([0, 1, 2, 2]), torch.tensor([1]), torch.tensor([4]))
        with pytest.raises(ValueError, match=r"indices outside \[0, 3\) \(ref_emb\)"):
            loss(e, labels, indices_tuple=pairs, **ref)
        loss(e, labels, indices_tuple=(L4, torch.tensor([2]), torch.tensor([0])), **ref)
        # Indices on the meta device hold none.
        with pytest.raises(ValueError, match="indices_tuple is on the meta device"):
            loss(e, labels, indices_tuple=(L4.to("meta"), L4, L4))


def test_compat_query_weights_go_with_the_loss_only():
    x, label = torch.rand(3, 4), torch.rand(3, 4) > 0.5
    qw = torch.ones(3)
    for module in (fastap.compat.APLoss(), fastap.compat.TAPLoss()):
        with pytest.raises(ValueError, match=r"qw \(query weights\) only applies to ret='1-mAP'"):
            module(x, label, qw=qw, ret="AP")
        module(x, label, qw=qw)  # with the loss: fine
