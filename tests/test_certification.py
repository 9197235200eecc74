"""The batched sampling engine and CERTIFY."""

import numpy as np
import pytest
import torch
from torch import nn

from approxtune.certification import certify, class_dtype, predict_under_noise
from approxtune.noise import Stream, input_seeds, sample_noise
from approxtune.statistics import lower_confidence_bound, radius


def linear_model(seed=0, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, classes))


@pytest.fixture
def setup():
    torch.manual_seed(1)
    x = torch.rand(7, 1, 4, 4)
    return linear_model(), x, input_seeds(11, np.arange(7))


def reference_predictions(model, x, seeds, stream, start, stop, sigma):
    """The definition, one input and one sample range at a time."""
    rows = []
    with torch.no_grad():
        for xi, s in zip(x, seeds, strict=True):
            noise = sample_noise(s, stream, start, stop, tuple(x.shape[1:]), sigma)
            rows.append(model(noise + xi).argmax(1).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("batch_size", [1, 13, 64, 100, 5000])
def test_engine_matches_definition_for_any_batch_size(setup, batch_size):
    model, x, seeds = setup
    got = predict_under_noise(model, x, seeds, Stream.ESTIMATION, 0, 250, 0.7, batch_size=batch_size)
    assert np.array_equal(got, reference_predictions(model, x, seeds, Stream.ESTIMATION, 0, 250, 0.7))


def test_engine_ranges_per_input_and_offsets(setup):
    model, x, seeds = setup
    full = predict_under_noise(model, x, seeds, Stream.ESTIMATION, 0, 300, 0.7)
    starts = np.array([0, 10, 64, 65, 100, 200, 299])
    part = predict_under_noise(model, x, seeds, Stream.ESTIMATION, starts, 300, 0.7, batch_size=37)
    for i, s in enumerate(starts):
        assert np.array_equal(part[i, : 300 - s], full[i, s:])
        assert np.all(part[i, 300 - s :] == 0)


def test_engine_output_type_and_empty(setup):
    model, x, seeds = setup
    assert predict_under_noise(model, x, seeds, 1, 0, 10, 0.5).dtype == np.uint8
    assert predict_under_noise(model, x, seeds, 1, 0, 0, 0.5).shape == (7, 0)
    assert class_dtype(256) == np.uint8 and class_dtype(257) == np.uint16 and class_dtype(1000) == np.uint16
    with pytest.raises(ValueError, match="sigma"):
        predict_under_noise(model, x, seeds, 1, 0, 10, 0.0)


def test_certify_follows_algorithm_1(setup):
    model, x, seeds = setup
    n0, n, alpha, sigma = 20, 500, 0.01, 0.7
    result = certify(model, x, seeds, sigma, n0, n, alpha, batch_size=64)
    sel = reference_predictions(model, x, seeds, Stream.SELECTION, 0, n0, sigma)
    est = reference_predictions(model, x, seeds, Stream.ESTIMATION, 0, n, sigma)
    c_hat = np.array([np.bincount(r, minlength=3).argmax() for r in sel])
    count = (est == c_hat[:, None]).sum(1)
    assert np.array_equal(result.c_hat, c_hat)
    assert np.array_equal(result.count, count)
    assert np.array_equal(result.predictions, est)
    np.testing.assert_allclose(result.p_a, lower_confidence_bound(count, n, alpha))
    np.testing.assert_allclose(result.radius, radius(result.p_a, sigma))
    assert np.all((result.radius > 0) == (result.p_a > 0.5))


def test_certify_constant_classifier_gets_the_maximal_radius():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(len(x), 4)
            out[:, 2] = 1.0
            return out + self.w

    x = torch.zeros(3, 1, 2, 2)
    result = certify(Constant(), x, input_seeds(0, [0, 1, 2]), 0.5, 10, 1000, 0.001)
    assert np.all(result.c_hat == 2) and np.all(result.count == 1000)
    expected = 0.5 * __import__("scipy").stats.norm.ppf(0.001 ** (1 / 1000))
    np.testing.assert_allclose(result.radius, expected)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.7])
def test_certify_refuses_alpha_outside_the_open_half_interval(setup, alpha):
    model, x, seeds = setup
    with pytest.raises(ValueError, match="alpha"):
        certify(model, x, seeds, 0.5, 10, 100, alpha)


def test_any_function_from_a_batch_to_logits_can_be_certified(setup):
    """A deployable (an ONNX Runtime session, a loaded ExportedProgram) is a plain function: no .eval(), no
    parameters to read the device from; it gets the same noise and gives what the module it computes gives."""
    model, x, seeds = setup
    model.train()  # the module itself is put in eval mode; a function is called as it is
    calls = []

    def function(batch):
        calls.append(batch.device)
        with torch.no_grad():
            return model[1](batch.flatten(1)).numpy()  # an array-returning runtime, wrapped below

    def wrapped(batch):
        return torch.from_numpy(function(batch))

    got = predict_under_noise(wrapped, x, seeds, Stream.ESTIMATION, 0, 120, 0.7, batch_size=50, device="cpu")
    assert np.array_equal(got, predict_under_noise(model, x, seeds, Stream.ESTIMATION, 0, 120, 0.7, batch_size=50))
    assert not model.training and set(calls) == {torch.device("cpu")}
    assert np.array_equal(predict_under_noise(wrapped, x, seeds, Stream.ESTIMATION, 0, 120, 0.7), got), "default cpu"
    result = certify(wrapped, x, seeds, 0.7, 16, 100, 0.01)
    assert np.array_equal(result.c_hat, certify(model, x, seeds, 0.7, 16, 100, 0.01).c_hat)
