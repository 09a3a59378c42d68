"""Sampling on both backends against transformers' logits warpers (temperature, then top-k, then
top-p): the kept set and the renormalised probabilities, row by row with one setting per row;
and the exponential race draws from exactly those probabilities."""

import numpy as np
import pytest
import torch

from csm.sampling import Sampling, row_settings
from csm_torch import sampling as torch_sampling

SETTINGS = [(1.0, 50, 1.0), (0.9, 50, 0.9), (0.7, 200, 0.5), (1.3, 2051, 0.95), (0.5, 3, 0.99), (1.0, 1000, 0.3),
            (0.9, 1, 1.0)]
VOCAB = 2051


def transformers_probs(logits: torch.Tensor, temperature: float, topk: int, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(topk)])
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits.clone()).softmax(dim=-1)


@pytest.fixture(scope="module")
def logits():
    # peaked rows, like a trained model's, and flat ones: both ends of what top-p sees
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=VOCAB) * scale for scale in (0.5, 2.0, 6.0) for _ in range(3)]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def batch_settings(n):
    """One setting per row, as in a running batch."""
    chosen = [SETTINGS[i % len(SETTINGS)] for i in range(n)]
    return chosen, [torch.tensor(v) for v in zip(*chosen, strict=True)]


def check_against_transformers(probs: np.ndarray, logits: torch.Tensor, chosen):
    for row, (temperature, topk, top_p) in enumerate(chosen):
        expected = transformers_probs(logits[row : row + 1], temperature, topk, top_p)[0].numpy()
        np.testing.assert_array_equal(probs[row] > 0, expected > 0, err_msg=f"kept set, row {row}: {chosen[row]}")
        np.testing.assert_allclose(probs[row], expected, rtol=1e-5, atol=1e-7, err_msg=f"row {row}: {chosen[row]}")
        assert 1 <= (expected > 0).sum() <= topk


def test_torch_kept_set_and_probabilities_equal_transformers_warpers(logits):
    chosen, (temperature, topk, top_p) = batch_settings(len(logits))
    probs = torch_sampling.filtered_probs(logits, temperature.float(), topk.long(), top_p.float()).numpy()
    check_against_transformers(probs, logits, chosen)


def test_mlx_kept_set_and_probabilities_equal_transformers_warpers(logits):
    mx = pytest.importorskip("mlx.core")
    from csm_mlx import sampling as mlx_sampling

    chosen, (temperature, topk, top_p) = batch_settings(len(logits))
    probs = mlx_sampling.filtered_probs(mx.array(logits.numpy()), mx.array(temperature.numpy().astype(np.float32)),
                                        mx.array(topk.numpy()), mx.array(top_p.numpy().astype(np.float32)))
    check_against_transformers(np.array(probs), logits, chosen)


def test_the_race_draws_from_the_kept_probabilities():
    """The torch sampler on many rows of one setting: the frequencies of the drawn codes match the
    filtered probabilities, and nothing outside the kept set is ever drawn."""
    rows, vocab = 4000, 40
    logits = torch.tensor(np.random.default_rng(1).normal(size=vocab) * 1.5, dtype=torch.float32).repeat(rows, 1)
    sampling = Sampling(temperature=0.8, topk=12, top_p=0.7)
    slots = torch_sampling.SlotSampling(rows, 1, vocab, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for slot in range(rows):
        slots.set(slot, sampling, generator)
    slots.draw(rows)
    codes = torch_sampling.sample(logits, slots, rows, slots.kept(rows), 0)
    t, k, p = row_settings(sampling)
    expected = torch_sampling.filtered_probs(logits[:1], torch.tensor([t]), torch.tensor([k]), torch.tensor([p]))[0]
    counts = torch.bincount(codes, minlength=vocab).float() / rows
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(torch.nonzero(expected).flatten().tolist())
    np.testing.assert_allclose(counts.numpy(), expected.numpy(), atol=0.03)


def test_greedy_rows_take_the_argmax_beside_sampled_ones():
    logits = torch.tensor(np.random.default_rng(2).normal(size=(2, 100)), dtype=torch.float32)
    slots = torch_sampling.SlotSampling(2, 1, 100, torch.device("cpu"))
    slots.set(0, Sampling(topk=1), torch.Generator().manual_seed(0))
    slots.set(1, Sampling(temperature=5.0, topk=100), torch.Generator().manual_seed(0))
    slots.draw(2)
    assert slots.kept(2) == (100, False) and slots.kept(1) is None
    for _ in range(5):
        assert torch_sampling.sample(logits, slots, 2, slots.kept(2), 0)[0] == logits[0].argmax()
