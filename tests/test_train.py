"""Multi-stage backpropagation: the gradients of a plain backward, chunk by chunk."""

import contextlib
import copy
import io
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap.train import freeze_batchnorm, multistage_backward


def small_cnn(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Dropout(dropout),
        torch.nn.Conv2d(8, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 16),
    ).double()


def batch(size=23):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(size, 3, 12, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (size,), generator=g)
    return images, labels


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_equals_full_batch_backward_with_frozen_batchnorm():
    images, labels = batch()
    loss_fn = fastap.APLoss()
    full_model = freeze_batchnorm(small_cnn())
    full_loss = loss_fn(full_model(images), labels)
    full_loss.backward()

    model = freeze_batchnorm(small_cnn())
    loss = multistage_backward(model, images, lambda d: loss_fn(d, labels), chunk_size=5)
    torch.testing.assert_close(loss, full_loss.detach(), rtol=0, atol=1e-12)
    expected = grads(full_model)
    # Weights and biases of the two convolutions and the linear layer; BatchNorm is frozen.
    assert len(expected) == 6 and full_model[1].weight.grad is None
    for ours, ref in zip(grads(model), expected):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_dropout_and_batchnorm_in_training_mode_equal_a_chunked_forward():
    """With random layers and batch statistics the reference is one backward through the same
    chunks: same dropout masks (random state replayed), same per-chunk statistics, and running
    statistics updated once per chunk."""
    images, labels = batch()
    loss_fn = fastap.APLoss(variant="tie_aware")
    reference_model = small_cnn(dropout=0.3)
    torch.manual_seed(7)
    descriptors = torch.cat([reference_model(chunk) for chunk in images.split(6)])
    reference_loss = loss_fn(descriptors, labels)
    reference_loss.backward()

    model = small_cnn(dropout=0.3)
    torch.manual_seed(7)
    loss = multistage_backward(model, images, lambda d: loss_fn(d, labels), chunk_size=6)
    torch.testing.assert_close(loss, reference_loss.detach(), rtol=0, atol=1e-12)
    for ours, ref in zip(grads(model), grads(reference_model)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for ours, ref in zip(model.buffers(), reference_model.buffers()):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_instance_norm_running_statistics_are_updated_once_per_chunk():
    """InstanceNorm with track_running_stats keeps running statistics too: stage 1 leaves them
    as they were, as BatchNorm's, so they end as after one forward of each chunk (they were
    updated twice per chunk)."""
    torch.manual_seed(2)
    x, labels = torch.randn(10, 3, 6, dtype=torch.float64), torch.randint(0, 3, (10,))

    def net():
        torch.manual_seed(5)
        norm = torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True)
        return torch.nn.Sequential(norm, torch.nn.Flatten(), torch.nn.Linear(18, 4)).double()

    reference_model, model = net(), net()
    loss_fn = fastap.APLoss()
    descriptors = torch.cat([reference_model(chunk) for chunk in x.split(4)])
    loss_fn(descriptors, labels).backward()
    multistage_backward(model, x, lambda d: loss_fn(d, labels), chunk_size=4)
    for ours, ref in zip(model.buffers(), reference_model.buffers()):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    for ours, ref in zip(grads(model), grads(reference_model)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_gradients_accumulate_and_tuple_inputs():
    images, labels = batch(10)

    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = freeze_batchnorm(small_cnn())

        def forward(self, x, scale):
            return self.net(x) * scale[:, None]

    model = TwoInputs()
    scale = torch.linspace(0.5, 1.5, 10, dtype=torch.float64)
    loss_fn = fastap.APLoss()
    multistage_backward(model, (images, scale), lambda d: loss_fn(d, labels), chunk_size=4)
    once = grads(model)
    multistage_backward(model, (images, scale), lambda d: loss_fn(d, labels), chunk_size=3)
    for twice, single in zip(grads(model), once):
        torch.testing.assert_close(twice, 2 * single, rtol=0, atol=1e-12)


def test_autocast_bfloat16_cpu():
    images, labels = batch()
    loss_fn = fastap.APLoss()
    model = freeze_batchnorm(small_cnn()).float()
    multistage_backward(
        model, images.float(), lambda d: loss_fn(d, labels), 8, autocast_dtype=torch.bfloat16
    )
    low = grads(model)
    exact_model = freeze_batchnorm(small_cnn()).float()
    multistage_backward(exact_model, images.float(), lambda d: loss_fn(d, labels), 8)
    for ours, ref in zip(low, grads(exact_model)):
        assert torch.isfinite(ours).all()
        cosine = torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0)
        assert cosine > 0.95


def test_loss_that_ignores_the_descriptors_gives_zero_gradients():
    # A loss that never reaches the descriptors leaves them without a .grad: each chunk then
    # backpropagates zeros (every chunk still runs stage 3, as DDP's one reduction needs).
    model = small_cnn()
    images, _ = batch(7)
    constant = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    loss = multistage_backward(model, images, lambda d: constant * 2, chunk_size=3)
    assert loss.item() == 0.5 and constant.grad.item() == 2.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_freeze_batchnorm_survives_train_and_a_round_trip_through_pickle():
    """model.train() leaves the frozen layers in eval mode, also in a copy of the model saved
    whole with torch.save (a bound method put there once could not be loaded back) or copied."""
    frozen = freeze_batchnorm(small_cnn())
    saved = io.BytesIO()
    torch.save(frozen, saved)
    saved.seek(0)
    copies = [torch.load(saved, weights_only=False), pickle.loads(pickle.dumps(frozen))]
    for model in [frozen, *copies, copy.deepcopy(frozen)]:
        model.train()
        assert model.training and not model[1].training and not model[0].weight.grad
        assert not model[1].weight.requires_grad and model[0].weight.requires_grad
        before = model[1].running_mean.clone()
        model(batch(4)[0])
        assert torch.equal(model[1].running_mean, before)


def test_bad_arguments():
    model = small_cnn()
    images, _ = batch(4)
    with pytest.raises(ValueError, match="chunk_size"):
        multistage_backward(model, images, lambda d: d.sum(), chunk_size=0)
    with pytest.raises(ValueError, match="scalar"):
        multistage_backward(model, images, lambda d: d, chunk_size=2)
    with pytest.raises(TypeError, match="inputs must be"):
        multistage_backward(model, [1, 2], lambda d: d.sum(), chunk_size=2)
    with pytest.raises(TypeError, match="preserve_rng_state must be a bool, got str"):
        multistage_backward(model, images, lambda d: d.sum(), 2, preserve_rng_state="no")
    with pytest.raises(ValueError, match="share their first dimension"):
        multistage_backward(model, (images, images[:2]), lambda d: d.sum(), chunk_size=2)
    for zero_d in (torch.tensor(1.0), (images, torch.tensor(1.0))):
        with pytest.raises(ValueError, match="inputs must be batch first, got a 0-d tensor"):
            multistage_backward(model, zero_d, lambda d: d.sum(), chunk_size=2)
    with pytest.raises(TypeError, match="loss_fn must return a tensor, got float"):
        multistage_backward(model, images, lambda d: 0.5, chunk_size=2)
    for no_grad in (torch.no_grad, torch.inference_mode):
        with no_grad(), pytest.raises(RuntimeError, match="gradients are disabled here"):
            multistage_backward(model, images, lambda d: d.sum(), chunk_size=2)
    frozen = small_cnn().requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameter of the model and no input requires grad"):
        multistage_backward(frozen, images, lambda d: d.sum(), chunk_size=2)
    for change, error, match in (
        (dict(model=lambda x: x), TypeError, "model must be a torch.nn.Module, got function"),
        (dict(loss_fn=None), TypeError, "loss_fn must be callable, got None"),
        (dict(scaler=3), TypeError, "scaler must be a torch.amp.GradScaler or None, got int"),
        (dict(autocast_dtype=torch.int32), ValueError, "autocast_dtype must be torch.float16"),
        (dict(autocast_dtype=torch.float32), ValueError, "autocast_dtype must be torch.float16"),
        (dict(autocast_dtype="bfloat16"), TypeError, "autocast_dtype must be .* got str"),
        (dict(autocast_dtype=np.zeros(2)), TypeError, "autocast_dtype must be .* got numpy"),
        (
            dict(autocast_dtype=torch.zeros(2)),
            TypeError,
            "autocast_dtype must be .* got torch.Tensor",
        ),
        (dict(model=Pair()), TypeError, "must return a tensor .* got tuple"),
        (dict(model=Integers()), TypeError, "floating-point descriptors .* got torch.int64"),
    ):
        arguments = dict(model=model, inputs=images, loss_fn=lambda d: d.sum(), chunk_size=2)
        with pytest.raises(error, match=match):
            multistage_backward(**{**arguments, **change})


class Scaled(torch.nn.Module):
    """A model with a parameter (one without is refused before it runs)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))


class Pair(Scaled):  # (as an LSTM returns its output and state)
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flatten(1) * self.scale, x.flatten(1)


class Integers(Scaled):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) * self.scale).long()


def test_a_model_that_raises_leaves_the_batchnorm_statistics_as_they_were():
    class FailsOnThirdCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = small_cnn(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return self.net(x)

    model = FailsOnThirdCall().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):  # in stage 1, after two chunks
        multistage_backward(model, batch(6)[0], lambda d: d.sum(), chunk_size=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_constant_loss_gives_zero_gradients():
    model = small_cnn()
    images, _ = batch(5)
    loss = multistage_backward(model, images, lambda d: torch.tensor(0.5), chunk_size=2)
    assert loss.item() == 0.5
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_gradients_are_synchronised_with_the_last_chunk_only():
    """Under DistributedDataParallel (a model with no_sync) every chunk but the last runs under
    no_sync(), so that the gradient all-reduce happens once, with the complete gradient."""

    class Recorder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.syncing = True
            self.synced_chunks = []

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

        def forward(self, x):
            if torch.is_grad_enabled():  # stage 3
                self.synced_chunks.append(self.syncing)
            return self.model(x)

    model = Recorder(freeze_batchnorm(small_cnn()))
    images, labels = batch(10)
    multistage_backward(model, images, lambda d: fastap.APLoss()(d, labels), chunk_size=3)
    assert model.synced_chunks == [False, False, False, True]


def test_grad_scaler_scales_the_parameter_gradients():
    """With a GradScaler the loss is scaled before its backward: the gradients come out
    multiplied by the scale (which scaler.step divides out), the returned loss is not."""
    images, labels = batch(12)
    loss_fn = fastap.APLoss()
    plain = freeze_batchnorm(small_cnn())
    plain_loss = multistage_backward(plain, images, lambda d: loss_fn(d, labels), chunk_size=5)
    scaled = freeze_batchnorm(small_cnn())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss = multistage_backward(
        scaled, images, lambda d: loss_fn(d, labels), chunk_size=5, scaler=scaler
    )
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for ours, ref in zip(grads(scaled), grads(plain)):
        assert ref.any()
        torch.testing.assert_close(ours, ref * 2.0**10, rtol=1e-12, atol=0)


def test_a_refused_call_changes_nothing():
    """A model with nothing to backpropagate to is refused before any stage: loss_fn is not
    called (a cross-batch memory does not take the batch) and BatchNorm's statistics do not
    move. One that detaches its output is refused at stage 3, its statistics restored. With an
    input that requires grad, a frozen model is no refusal: the gradient goes to the input."""
    torch.manual_seed(0)
    x, labels = torch.randn(11, 6), torch.randint(0, 3, (11,))

    def model_and_memory():
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5))
        return model, fastap.memory.CrossBatchMemory(fastap.APLoss(), size=16)

    model, memory = model_and_memory()
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no parameter of the model and no input requires grad"):
        multistage_backward(model, x, lambda d: memory(d, labels), chunk_size=4)
    assert memory.filled == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    class Detaching(torch.nn.Sequential):
        def forward(self, x):
            return super().forward(x).detach()

    detaching = Detaching(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5))
    before = {k: v.clone() for k, v in detaching.state_dict().items()}
    with pytest.raises(ValueError, match=r"output does not require grad .*detach"):
        multistage_backward(detaching, x, lambda d: fastap.APLoss()(d, labels), chunk_size=4)
    assert all(torch.equal(v, before[k]) for k, v in detaching.state_dict().items())

    model, memory = model_and_memory()
    model.requires_grad_(False)
    model.eval()
    wanted = x.clone().requires_grad_()
    fastap.APLoss()(model(wanted), labels).backward()
    inputs = x.clone().requires_grad_()
    multistage_backward(model, inputs, lambda d: fastap.APLoss()(d, labels), chunk_size=4)
    torch.testing.assert_close(inputs.grad, wanted.grad, rtol=1e-5, atol=1e-7)


LOSSES = {
    "ap": lambda: fastap.APLoss(num_bins=9),
    "tie_aware": lambda: fastap.APLoss(variant="tie_aware"),
    "fastap": lambda: fastap.FastAPLoss(num_bins=6),
    "blockwise": lambda: fastap.APLoss(score_matrix_limit=0),  # (from the embeddings)
}


@given(
    size=st.integers(1, 14),
    chunk_size=st.integers(1, 16),
    loss=st.sampled_from(sorted(LOSSES)),
    tuple_inputs=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_full_batch_backward_on_random_batches(size, chunk_size, loss, tuple_inputs, seed):
    """Any batch and chunk size (one chunk, a ragged last chunk, chunks of one sample), any loss
    of the package, one input or several: the loss and the gradients of a plain backward."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, 5, generator=g, dtype=torch.float64)
    extra = torch.randn(size, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (size,), generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))
    model = model.double()

    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, a, b):
            return self.body(a + 0.5 * b)

    net = TwoInputs() if tuple_inputs else model
    args = (inputs, extra) if tuple_inputs else (inputs,)
    loss_fn = LOSSES[loss]()
    full_loss = loss_fn(net(*args), labels)
    full_loss.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    staged = multistage_backward(
        net, args if tuple_inputs else inputs, lambda d: loss_fn(d, labels), chunk_size
    )
    torch.testing.assert_close(staged, full_loss.detach(), rtol=0, atol=1e-12)
    got = grads(model)
    assert len(got) == len(expected) == 4
    for ours, ref in zip(got, expected):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
