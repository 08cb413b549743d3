"""Cross-batch memory: FIFO contents, size bound, and the loss against a direct computation."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import fastap
from fastap import reference
from fastap.cosine import unit_rows
from fastap.memory import CrossBatchMemory


def test_fifo_and_bound():
    memory = CrossBatchMemory(size=5)
    for start in (0, 3, 6):
        rows = torch.arange(start, start + 3.0)[:, None]
        memory.enqueue(torch.cat([rows, rows + 1], dim=1), torch.arange(3) + start)
    embeddings, labels = memory.contents()
    assert labels.tolist() == [4, 5, 6, 7, 8]  # the oldest four (0..3) were dropped
    # (as directions: the rows (k, k + 1) scaled to unit length)
    ratios = embeddings[:, 1] / embeddings[:, 0]
    torch.testing.assert_close(ratios, torch.arange(5.0, 10.0) / torch.arange(4.0, 9.0))
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(5))
    memory.enqueue(torch.zeros(7, 2), torch.arange(100, 107))  # larger than the memory
    assert memory.contents()[1].tolist() == [102, 103, 104, 105, 106]
    with pytest.raises(ValueError, match="dimension"):
        memory.enqueue(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
    for flag in ("no", 0, None):  # a truthy string would enqueue, a 0 would not: neither is taken
        with pytest.raises(TypeError, match="enqueue must be a bool"):
            memory(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), enqueue=flag)
    assert memory.contents()[1].tolist() == [102, 103, 104, 105, 106]


def test_loss_against_direct_computation_and_state_dict():
    g = torch.Generator().manual_seed(0)
    memory = CrossBatchMemory(fastap.APLoss(num_bins=15), size=20)
    past = torch.randn(12, 6, generator=g, dtype=torch.float64)
    past_labels = torch.randint(0, 3, (12,), generator=g)
    memory(past, past_labels)
    batch = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (9,), generator=g)
    loss = memory(batch, labels)

    database = torch.cat([batch, past])
    scores = F.normalize(batch, dim=1) @ F.normalize(database, dim=1).T
    ignore = torch.zeros(9, 21, dtype=torch.bool)
    ignore[torch.arange(9), torch.arange(9)] = True
    expected = reference.ap_loss(
        scores,
        labels=labels,
        ref_labels=torch.cat([labels, past_labels]),
        num_bins=15,
        ignore=ignore,
    )
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, batch)
    (expected_grad,) = torch.autograd.grad(expected, batch)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    assert memory.filled == 20 and memory.contents()[1].tolist()[-9:] == labels.tolist()

    # Evaluating without enqueueing leaves the memory as it was.
    before = memory.contents()[1].clone()
    memory(batch.detach(), labels, enqueue=False)
    assert torch.equal(memory.contents()[1], before)

    restored = CrossBatchMemory(fastap.APLoss(num_bins=15), size=20)
    restored.load_state_dict(memory.state_dict())
    for a, b in zip(restored.contents(), memory.contents()):
        assert torch.equal(a, b)


def used_memory(batches: int, dim: int, seed: int) -> CrossBatchMemory:
    """A memory of size 10 after `batches` batches of 6 random embeddings of dimension `dim`."""
    g = torch.Generator().manual_seed(seed)
    memory = CrossBatchMemory(size=10)
    for _ in range(batches):
        memory(torch.randn(6, dim, generator=g), torch.randint(0, 3, (6,), generator=g))
    return memory


def test_state_dict_of_another_size_is_refused():
    state = used_memory(2, dim=4, seed=1).state_dict()
    for size in (3, 12):
        other = CrossBatchMemory(size=size)
        with pytest.raises(RuntimeError, match=f"of size 10, this one has size={size}"):
            other.load_state_dict(state)
    # A memory saved before its first batch (no entries yet) loads into any size.
    empty = CrossBatchMemory(size=10).state_dict()
    other = CrossBatchMemory(size=3)
    other.load_state_dict(empty)
    assert other.filled == 0 and other.contents()[1].numel() == 0
    # Embeddings and labels of different lengths: the message says so.
    cut = {**state, "labels": state["labels"][:7]}
    with pytest.raises(RuntimeError, match="embeddings have 10 rows and its labels 7"):
        CrossBatchMemory(size=10).load_state_dict(cut)
    # A state whose counters do not fit its entries is refused, not taken as is.
    state[next(k for k in state if k.endswith("_extra_state"))] = {"filled": 11, "next": 0}
    with pytest.raises(RuntimeError, match="filled=11, next=0 does not fit its 10 stored entr"):
        CrossBatchMemory(size=10).load_state_dict(state)


def test_state_whose_next_entry_is_past_the_end_is_refused():
    memory = CrossBatchMemory(size=10)
    # (full: a state that says filled=10 has its 10 entries read, and unfilled slots hold
    # whatever torch.empty left there, NaN included)
    memory(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    state = memory.state_dict()
    key = next(k for k in state if k.endswith("_extra_state"))
    state[key] = {"filled": 10, "next": 9}  # the last slot: fine
    CrossBatchMemory(size=10).load_state_dict(state)
    state[key] = {"filled": 10, "next": 10}
    with pytest.raises(RuntimeError, match="filled=10, next=10 does not fit its 10 stored entr"):
        CrossBatchMemory(size=10).load_state_dict(state)


def test_malformed_states_are_refused_and_leave_the_memory_as_it_was():
    g = torch.Generator().manual_seed(2)
    good = used_memory(3, dim=8, seed=2).state_dict()
    key = next(k for k in good if k.endswith("_extra_state"))
    nan = good["embeddings"].clone()
    nan[4, 1] = float("nan")
    for change, message in (
        ({key: {"filled": 4, "next": 7}}, "filled=4, next=7 does not fit its 10 stored entries"),
        ({key: {"filled": 4.7, "next": 4}}, "must be a dict of int filled and next"),
        ({key: {"filled": 4}}, "must be a dict of int filled and next"),
        ({"embeddings": nan}, "embeddings contain NaN or infinity"),
        ({"embeddings": good["embeddings"].long()}, "embeddings must be 2-D floating point"),
        ({"embeddings": good["embeddings"][:, :0]}, "embeddings must be 2-D floating point"),
        ({"labels": good["labels"].float()}, "labels must be 1-D integer"),
        ({"labels": good["labels"][:, None]}, "labels must be 1-D integer"),
        ({key: None}, "lacks its _extra_state"),
        ({"labels": None}, "lacks its labels"),
    ):
        other = CrossBatchMemory(size=10)
        other(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
        before = [t.clone() for t in other.contents()]
        state = {k: v for k, v in {**good, **change}.items() if v is not None}
        with pytest.raises(RuntimeError, match=message):
            other.load_state_dict(state, strict=False)
        # (this memory's own entries, dimension and counters, untouched)
        assert (other.filled, other.next, other.embeddings.shape) == (4, 4, (10, 8))
        assert all(torch.equal(a, b) for a, b in zip(other.contents(), before))
        other(torch.randn(2, 8, generator=g), torch.randint(0, 3, (2,), generator=g))
    # Unfilled slots hold whatever was there: only the filled entries need be finite.
    partial = CrossBatchMemory(size=10)
    partial(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
    state = partial.state_dict()
    state["embeddings"][6] = float("nan")
    CrossBatchMemory(size=10).load_state_dict(state)


def test_a_memory_with_entries_refuses_a_checkpoint_of_another_dimension():
    state = used_memory(1, dim=4, seed=2).state_dict()
    memory = used_memory(1, dim=5, seed=3)
    before = [t.clone() for t in memory.contents()]
    with pytest.raises(RuntimeError, match="dimension 4, this memory's entries have dimension 5"):
        memory.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(memory.contents(), before))
    fresh = CrossBatchMemory(size=10)  # one without entries takes the checkpoint's dimension
    fresh.load_state_dict(state)
    assert fresh.embeddings.shape == (10, 4)


def test_loading_keeps_the_dtype_of_a_memory_with_entries():
    memory = CrossBatchMemory(size=10)
    memory(torch.randn(6, 4), torch.randint(0, 3, (6,)))
    restored = CrossBatchMemory(size=10)
    restored(torch.randn(2, 4, dtype=torch.float64), torch.randint(0, 3, (2,)))
    restored.load_state_dict(memory.state_dict())
    assert restored.embeddings.dtype == torch.float64
    torch.testing.assert_close(restored.contents()[0], memory.contents()[0].double())
    # One without entries takes the checkpoint's, as it would take its first batch's.
    fresh = CrossBatchMemory(size=10).double()
    fresh.load_state_dict(memory.state_dict())
    assert fresh.embeddings.dtype == torch.float32


def test_entries_are_directions_in_every_dtype():
    """The memory holds unit rows: a finite batch scaled by a power of two beyond float16's range,
    or below its normal numbers, gives the bits of the same batch unscaled, in a float16 memory,
    in a float32 one cast by .half(), in a float64 one read by a float32 batch, and loaded from a
    float64 checkpoint into a float32 memory; where raw entries turned into infinities (and every
    later call into an error blaming the batch) or zeros."""
    g = torch.Generator().manual_seed(5)
    first = torch.randn(4, 3, generator=g).half()
    wide = torch.randn(4, 3, generator=g)
    batch = torch.randn(4, 3, generator=g).half()
    labels = torch.tensor([0, 0, 1, 1])

    def filled(scale: float, cast_to_half: bool) -> CrossBatchMemory:
        memory = CrossBatchMemory(size=12)
        if cast_to_half:
            memory(wide * scale, labels)
            memory.half()
        else:
            memory(first, labels)
            memory(wide * scale, labels)
        assert memory.embeddings.dtype == torch.float16
        return memory

    for cast_to_half in (False, True):
        twin = filled(1.0, cast_to_half)
        for scale in (2.0**17, 2.0**-30):
            memory = filled(scale, cast_to_half)
            stored = memory.contents()[0]
            assert torch.equal(stored, twin.contents()[0])
            assert torch.isfinite(stored).all() and (stored.abs().amax(dim=1) > 0.1).all()
            loss = memory(batch, labels, enqueue=False)
            assert torch.isfinite(loss) and torch.equal(loss, twin(batch, labels, enqueue=False))

    past = torch.randn(6, 5, generator=g, dtype=torch.float64)
    past_labels = torch.randint(0, 3, (6,), generator=g)
    now, now_labels = torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
    losses = []
    for scale in (1.0, 2.0**990):
        memory = CrossBatchMemory(size=6)
        memory.enqueue(past * scale, past_labels)
        losses.append(memory(now, now_labels, enqueue=False))
        narrow = CrossBatchMemory(size=6)
        narrow(now, now_labels)
        narrow.load_state_dict(memory.state_dict())
        assert narrow.embeddings.dtype == torch.float32
        torch.testing.assert_close(narrow.contents()[0], unit_rows(past).float(), rtol=0, atol=0)
    assert torch.isfinite(losses[1]) and torch.equal(losses[0], losses[1])

    # A checkpoint of raw entries (beyond float16's range) and int32 labels, loaded into a float16
    # memory: its directions, and int64 labels that later labels beyond int32 do not wrap.
    state = {
        "embeddings": past.float() * 1e5,
        "labels": past_labels.int(),
        "_extra_state": {"filled": 6, "next": 0},
    }
    memory = CrossBatchMemory(size=6)
    memory(now.half(), now_labels)
    memory.load_state_dict(state)
    torch.testing.assert_close(memory.contents()[0], unit_rows(past).half(), rtol=0, atol=1e-3)
    assert memory.labels.dtype == torch.int64
    memory.enqueue(now[:2], torch.tensor([2**32 + 1, 2**32 + 1]))
    assert memory.contents()[1].tolist()[-2:] == [2**32 + 1, 2**32 + 1]


def test_meta_batches_are_evaluated_and_not_remembered():
    """A meta batch gets a meta loss against the entries and leaves the memory as it was; one
    given to enqueue, and a real batch meeting entries moved to meta, raise; a meta checkpoint
    is refused."""
    g = torch.Generator().manual_seed(6)
    memory = CrossBatchMemory(size=8)
    batch, labels = torch.randn(4, 3, generator=g), torch.tensor([0, 0, 1, 1])
    for _ in range(2):  # empty, then with entries
        loss = memory(batch.to("meta"), labels.to("meta"))
        assert loss.device.type == "meta" and loss.shape == ()
        assert memory.embeddings.device.type == "cpu"
        memory(batch, labels)
    assert memory.filled == 8
    with pytest.raises(ValueError, match="meta device, which holds no values to remember"):
        memory.enqueue(batch.to("meta"), labels.to("meta"))
    state = memory.state_dict()
    memory.to("meta")
    with pytest.raises(ValueError, match="entries are on the meta device"):
        memory(batch, labels)
    with pytest.raises(RuntimeError, match="on the meta device: no values"):
        CrossBatchMemory(size=8).load_state_dict(memory.state_dict())
    memory.reset()
    memory(batch, labels)  # a reset memory on meta starts again where the batch is
    assert memory.embeddings.device.type == "cpu" and memory.filled == 4
    restored = CrossBatchMemory(size=8)
    restored.load_state_dict(state)
    assert restored.filled == 8


def test_compiled_it_runs_eagerly_and_equals_eager_on_every_step():
    """Its ring's position changes on every call: traced, each call was a new graph (up to
    torch's recompile limit, the ninth call, where fullgraph=True failed). It runs eagerly."""
    g = torch.Generator().manual_seed(4)
    eager, compiled = CrossBatchMemory(size=16), CrossBatchMemory(size=16)
    step = torch.compile(compiled)
    for _ in range(12):
        batch, labels = torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
        assert torch.equal(step(batch, labels), eager(batch, labels))
    assert compiled.filled == eager.filled == 16


def test_a_reset_memory_is_a_new_one():
    """reset() forgets the entries and their dtype and dimension: the next batch or checkpoint
    sets them, as for a new memory (it kept them, and refused a batch of another dimension with
    a message about entries it no longer held)."""
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 0, 1, 1])
    source = CrossBatchMemory(size=4)
    source(torch.randn(4, 5, generator=g), labels)
    memory = CrossBatchMemory(size=4)
    memory(torch.randn(4, 3, generator=g).half(), labels)
    memory.reset()
    assert memory.filled == 0 and memory.embeddings.numel() == 0
    memory.load_state_dict(source.state_dict())  # of dimension 5, in float32
    assert memory.embeddings.dtype == torch.float32 and torch.equal(
        memory.contents()[0], source.contents()[0]
    )
    memory.reset()
    batch = torch.randn(2, 7, generator=g, dtype=torch.float64)
    fresh = CrossBatchMemory(size=4)
    assert torch.equal(memory(batch, labels[:2]), fresh(batch, labels[:2]))
    assert memory.embeddings.dtype == torch.float64 and memory.embeddings.shape == (4, 7)
    assert torch.equal(memory.contents()[0], fresh.contents()[0])


class MemoryAgainstAList(RuleBasedStateMachine):
    """Random sequences of batches (empty, smaller or larger than the memory), evaluations with
    and without enqueueing, resets and checkpoint round trips, against a plain list of the
    entries: the contents are the last `size` unit rows and labels, oldest first, and each loss
    (and its gradient) is the reference loss against the batch and those entries."""

    DIM = 3

    size: int
    memory: CrossBatchMemory

    def __init__(self):
        super().__init__()
        self.entries: list[tuple[torch.Tensor, int]] = []  # (unit row, label), oldest first

    @initialize(size=st.integers(1, 7))
    def create(self, size):
        self.size = size
        self.memory = CrossBatchMemory(fastap.APLoss(num_bins=7), size=size)

    def remember(self, batch: torch.Tensor, labels: torch.Tensor) -> None:
        unit = unit_rows(batch.detach())
        self.entries = (self.entries + list(zip(unit, labels.tolist())))[-self.size :]

    @rule(rows=st.integers(0, 9), seed=st.integers(0, 2**16), enqueue=st.booleans())
    def loss_of_a_batch(self, rows, seed, enqueue):
        g = torch.Generator().manual_seed(seed)
        batch = torch.randn(rows, self.DIM, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, 3, (rows,), generator=g)
        loss = self.memory(batch, labels, enqueue=enqueue)
        past = [e for e, _ in self.entries]
        database = torch.cat([batch, torch.stack(past)]) if past else batch
        ref_labels = torch.cat([labels, torch.tensor([lab for _, lab in self.entries])]).long()
        scores = F.normalize(batch, dim=1) @ F.normalize(database, dim=1).T
        ignore = torch.zeros(rows, len(ref_labels), dtype=torch.bool)
        ignore[torch.arange(rows), torch.arange(rows)] = True
        expected = reference.ap_loss(
            scores, labels=labels, ref_labels=ref_labels, num_bins=7, ignore=ignore
        )
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
        if rows:
            (grad,) = torch.autograd.grad(loss, batch, allow_unused=True)
            (expected_grad,) = torch.autograd.grad(expected, batch, allow_unused=True)
            zeros = torch.zeros_like(batch)
            torch.testing.assert_close(
                zeros if grad is None else grad,
                zeros if expected_grad is None else expected_grad,
                rtol=0,
                atol=1e-12,
            )
        if enqueue:
            self.remember(batch, labels)

    @rule(rows=st.integers(0, 9), seed=st.integers(0, 2**16))
    def enqueue(self, rows, seed):
        g = torch.Generator().manual_seed(seed)
        batch = torch.randn(rows, self.DIM, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (rows,), generator=g)
        self.memory.enqueue(batch, labels)
        self.remember(batch, labels)

    @rule()
    def reset(self):
        self.memory.reset()
        self.entries = []

    @rule()
    def checkpoint_round_trip(self):
        restored = CrossBatchMemory(fastap.APLoss(num_bins=7), size=self.size)
        restored.load_state_dict(self.memory.state_dict())
        for a, b in zip(restored.contents(), self.memory.contents()):
            assert torch.equal(a, b)
        self.memory = restored

    @invariant()
    def holds_the_last_entries(self):
        embeddings, labels = self.memory.contents()
        assert self.memory.filled == len(self.entries) == len(labels)
        assert labels.tolist() == [lab for _, lab in self.entries]
        if self.entries:
            assert torch.equal(embeddings, torch.stack([e for e, _ in self.entries]))


TestMemoryAgainstAList = MemoryAgainstAList.TestCase
TestMemoryAgainstAList.settings = settings(
    settings(), stateful_step_count=12, max_examples=max(5, settings().max_examples // 3)
)
