"""engine.sampling: parameter validation, the filters' distributions (Sampler.pick on
fixed logits), seeded reproducibility on every backend, and EOS stopping."""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine.model import Model, ModelConfig
from engine.sampling import Sampler, SamplingParams

CONFIG = ModelConfig(128, 32, 3, 4, 160)
PROMPT = [3, 14, 15, 92, 65]
PROBS = np.array([0.5, 0.3, 0.15, 0.05])
DRAWS = 20_000


@pytest.fixture
def model(xp, device):
    return Model(CONFIG, seed=0, xp=xp, device=device)


@pytest.fixture(scope="module")
def numpy_model():
    return Model(CONFIG, seed=0)


def frequencies(params: SamplingParams, logits, draws: int = DRAWS) -> np.ndarray:
    sampler = Sampler(params)
    logits = np.asarray(logits, dtype=np.float64)
    counts = np.bincount([sampler.pick(logits) for _ in range(draws)], minlength=logits.shape[0])
    return counts / draws


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"temperature": "1.0"}, "temperature must be a finite number >= 0"),
        ({"temperature": True}, "temperature must be a finite number >= 0"),
        ({"top_k": -1}, "top_k must be an int >= 0"),
        ({"top_k": 2.5}, "top_k must be an int >= 0"),
        ({"top_k": "3"}, "top_k must be an int >= 0"),
        ({"top_k": True}, "top_k must be an int >= 0"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_p": -0.2}, "top_p must be in (0, 1]"),
        ({"top_p": float("nan")}, "top_p must be in (0, 1]"),
        ({"top_p": True}, "top_p must be in (0, 1]"),
        ({"seed": -1}, "seed must be an int >= 0 or None"),
        ({"seed": 1.5}, "seed must be an int >= 0 or None"),
        ({"seed": "7"}, "seed must be an int >= 0 or None"),
        ({"seed": True}, "seed must be an int >= 0 or None"),
    ],
)
def test_bad_sampling_params_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**kwargs)


def test_good_sampling_params_are_accepted():
    SamplingParams()
    SamplingParams(temperature=0.7, top_k=np.int64(5), top_p=1, seed=0)
    SamplingParams(temperature=2, top_k=0, top_p=1e-9, seed=2**40)
    assert SamplingParams().greedy and not SamplingParams(temperature=1e-3).greedy


def test_bad_sampling_arguments_raise_before_generation_starts(numpy_model):
    with pytest.raises(ValueError, match="temperature"):
        numpy_model.generate_stream(PROMPT, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        numpy_model.generate_stream(PROMPT, 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        numpy_model.generate_stream(PROMPT, 4, temperature=1.0, top_k=-2)


# -- greedy and its sampling equivalents, on every backend --------------------------


def test_greedy_is_the_default_and_ignores_the_filters(model):
    greedy = model.generate(PROMPT, 24)
    assert model.generate(PROMPT, 24, temperature=0.0) == greedy
    assert model.generate(PROMPT, 24, temperature=0, top_k=3, top_p=0.2, seed=9) == greedy


def test_greedy_matches_argmax_of_full_recompute(model, numpy_model):
    greedy = model.generate(PROMPT, 12)
    tokens = list(PROMPT)
    for _ in range(12):
        tokens.append(int(np.argmax(np.asarray(numpy_model.forward(tokens))[-1])))
    assert greedy == tokens[len(PROMPT) :]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_1_sampling_equals_greedy(model, seed):
    greedy = model.generate(PROMPT, 40)
    assert model.generate(PROMPT, 40, temperature=1.3, top_k=1, seed=seed) == greedy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_top_p_sampling_equals_greedy(model, seed):
    greedy = model.generate(PROMPT, 40)
    assert model.generate(PROMPT, 40, temperature=1.3, top_p=1e-6, seed=seed) == greedy


# -- seeds ---------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_tokens(model):
    first = model.generate(PROMPT, 40, temperature=1.0, seed=11)
    second = model.generate(PROMPT, 40, temperature=1.0, seed=11)
    assert first == second
    assert first != model.generate(PROMPT, 40), "temperature 1 should not be greedy here"


def test_different_seeds_give_different_tokens(model):
    runs = {tuple(model.generate(PROMPT, 40, temperature=1.0, seed=s)) for s in range(5)}
    assert len(runs) >= 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 1.0, "seed": 0},
        {"temperature": 0.8, "top_k": 10, "seed": 5},
        {"temperature": 1.2, "top_p": 0.9, "seed": 7},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "seed": 123},
    ],
    ids=["plain", "top_k", "top_p", "both"],
)
def test_seeded_sampling_is_the_same_on_every_backend(model, numpy_model, kwargs):
    # The logits agree with NumPy's to float32 rounding; a token could differ only
    # if a uniform draw fell within that rounding of a CDF step: negligible.
    expected = numpy_model.generate(PROMPT, 32, **kwargs)
    assert model.generate(PROMPT, 32, **kwargs) == expected
    assert list(model.generate_stream(PROMPT, 32, **kwargs)) == expected


def test_a_sampler_advances_its_generator_with_every_token():
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    logits = np.zeros(50)
    draws = [sampler.pick(logits) for _ in range(20)]
    assert len(set(draws)) > 5
    again = Sampler(SamplingParams(temperature=1.0, seed=3))
    assert [again.pick(logits) for _ in range(20)] == draws


# -- Sampler.pick's distributions ----------------------------------------------------


def test_pick_follows_the_softmax_of_the_logits():
    freq = frequencies(SamplingParams(temperature=1.0, seed=0), np.log(PROBS))
    np.testing.assert_allclose(freq, PROBS, atol=0.015)


def test_pick_is_invariant_to_a_shift_of_the_logits():
    freq = frequencies(SamplingParams(temperature=1.0, seed=1), np.log(PROBS) + 500.0)
    np.testing.assert_allclose(freq, PROBS, atol=0.015)


def test_low_temperature_sharpens_and_high_temperature_flattens():
    logits = np.log(PROBS)
    sharp = PROBS**2 / np.sum(PROBS**2)  # temperature 0.5
    flat = np.sqrt(PROBS) / np.sum(np.sqrt(PROBS))  # temperature 2
    freq_sharp = frequencies(SamplingParams(temperature=0.5, seed=2), logits)
    freq_flat = frequencies(SamplingParams(temperature=2.0, seed=3), logits)
    np.testing.assert_allclose(freq_sharp, sharp, atol=0.015)
    np.testing.assert_allclose(freq_flat, flat, atol=0.015)
    assert freq_sharp[0] > 0.6 and freq_flat[0] < 0.45


def test_top_k_draws_only_the_k_most_likely_in_their_ratio():
    logits = np.log(np.array([0.15, 0.5, 0.05, 0.3]))
    freq = frequencies(SamplingParams(temperature=1.0, top_k=2, seed=4), logits)
    assert freq[0] == 0 and freq[2] == 0
    np.testing.assert_allclose(freq[[1, 3]], [0.625, 0.375], atol=0.015)


def test_top_k_at_least_the_vocabulary_is_no_filter():
    freq = frequencies(SamplingParams(temperature=1.0, top_k=4, seed=5), np.log(PROBS))
    np.testing.assert_allclose(freq, PROBS, atol=0.015)
    freq = frequencies(SamplingParams(temperature=1.0, top_k=99, seed=5), np.log(PROBS))
    np.testing.assert_allclose(freq, PROBS, atol=0.015)


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = np.array([3.0, 2.0, 2.0, 2.0, 0.0, -1.0])
    freq = frequencies(SamplingParams(temperature=1.0, top_k=2, seed=6), logits)
    assert freq[4] == 0 and freq[5] == 0
    e = np.exp([1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(freq[:4], e / e.sum(), atol=0.015)
    freq = frequencies(SamplingParams(temperature=1.0, top_k=1, seed=7), [1.0, 1.0, 1.0, 0.0])
    assert freq[3] == 0
    np.testing.assert_allclose(freq[:3], [1 / 3] * 3, atol=0.015)


def test_top_p_keeps_the_smallest_set_reaching_p():
    freq = frequencies(SamplingParams(temperature=1.0, top_p=0.7, seed=8), np.log(PROBS))
    assert freq[2] == 0 and freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.625, 0.375], atol=0.015)
    # 0.85 is past 0.5 + 0.3: the third token is needed as well
    freq = frequencies(SamplingParams(temperature=1.0, top_p=0.85, seed=9), np.log(PROBS))
    assert freq[3] == 0 and freq[2] > 0
    np.testing.assert_allclose(freq[:3], PROBS[:3] / 0.95, atol=0.015)


def test_top_p_stops_as_soon_as_the_mass_reaches_p_exactly():
    # probabilities exact in binary: [0.5, 0.25, 0.25]; the top token alone reaches 0.5
    logits = np.log(np.array([0.5, 0.25, 0.25]))
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=14)
    assert frequencies(params, logits, 2000).tolist() == [1.0, 0.0, 0.0]
    freq = frequencies(SamplingParams(temperature=1.0, top_p=0.5000001, seed=14), logits)
    # just past 0.5: one of the two tied 0.25 tokens joins (which one is a tie-break)
    assert min(freq[1], freq[2]) == 0
    np.testing.assert_allclose([freq[0], freq[1] + freq[2]], [2 / 3, 1 / 3], atol=0.015)


def test_top_p_sorts_by_probability_not_by_index():
    logits = np.log(np.array([0.05, 0.15, 0.3, 0.5]))
    freq = frequencies(SamplingParams(temperature=1.0, top_p=0.7, seed=10), logits)
    assert freq[0] == 0 and freq[1] == 0
    np.testing.assert_allclose(freq[2:], [0.375, 0.625], atol=0.015)


def test_a_tiny_top_p_keeps_only_the_most_likely_token():
    freq = frequencies(SamplingParams(temperature=5.0, top_p=1e-6, seed=11), [0.1, 0.3, 0.2], 500)
    assert freq.tolist() == [0.0, 1.0, 0.0]


def test_top_k_applies_before_top_p():
    # top-k 3 leaves [0.5, 0.3, 0.15] / 0.95, where the top token alone holds 0.526 >=
    # 0.52: top-p keeps only it. (Top-p first would keep two: 0.5 < 0.52.)
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.52, seed=12)
    assert frequencies(params, np.log(PROBS), 2000).tolist() == [1.0, 0.0, 0.0, 0.0]
    params = SamplingParams(temperature=1.0, top_p=0.52, seed=12)
    freq = frequencies(params, np.log(PROBS))
    np.testing.assert_allclose(freq, [0.625, 0.375, 0.0, 0.0], atol=0.015)


def test_the_sampler_call_matches_pick_on_backend_logits(xp, device):
    logits = np.log(PROBS).astype(np.float32)
    on_backend = Sampler(SamplingParams(temperature=1.0, seed=13), xp)
    on_host = Sampler(SamplingParams(temperature=1.0, seed=13))
    array = xp.asarray(logits, device=device)
    assert [on_backend(array) for _ in range(200)] == [on_host.pick(logits) for _ in range(200)]
    greedy = Sampler(SamplingParams(), xp)
    assert greedy(xp.asarray(np.array([0.1, 2.0, -1.0, 1.9], np.float32), device=device)) == 1


# -- EOS -----------------------------------------------------------------------------


def test_generation_stops_after_the_first_eos_token(model):
    greedy = model.generate(PROMPT, 40)
    eos = greedy[3]
    expected = greedy[: greedy.index(eos) + 1]
    assert model.generate(PROMPT, 40, eos_token_id=eos) == expected
    assert list(model.generate_stream(PROMPT, 40, eos_token_id=eos)) == expected
    assert expected[-1] == eos and len(expected) <= 4


def test_eos_token_ids_as_a_list_stop_at_whichever_comes_first(model):
    greedy = model.generate(PROMPT, 40)
    first = min(greedy.index(greedy[5]), greedy.index(greedy[9]))
    expected = greedy[: first + 1]
    assert model.generate(PROMPT, 40, eos_token_id=[greedy[9], greedy[5]]) == expected
    assert model.generate(PROMPT, 40, eos_token_id=(greedy[9], greedy[5])) == expected
    assert model.generate(PROMPT, 40, eos_token_id=[np.int64(greedy[5])])[-1] == greedy[5]


def test_eos_stops_a_sampled_generation_too(model):
    sampled = model.generate(PROMPT, 40, temperature=1.0, seed=4)
    eos = sampled[6]
    expected = sampled[: sampled.index(eos) + 1]
    assert model.generate(PROMPT, 40, temperature=1.0, seed=4, eos_token_id=eos) == expected


def test_empty_eos_never_stops_and_none_uses_the_models_own(model):
    greedy = model.generate(PROMPT, 40)
    assert model.eos_token_ids == ()
    assert model.generate(PROMPT, 40, eos_token_id=()) == greedy
    assert model.generate(PROMPT, 40, eos_token_id=[]) == greedy
    assert model.generate(PROMPT, 40, eos_token_id=None) == greedy
    model.eos_token_ids = (greedy[3],)
    assert model.generate(PROMPT, 40) == greedy[: greedy.index(greedy[3]) + 1]
    assert model.generate(PROMPT, 40, eos_token_id=()) == greedy


def test_an_eos_that_is_never_produced_changes_nothing(model):
    greedy = model.generate(PROMPT, 40)
    unused = next(t for t in range(CONFIG.vocab_size) if t not in greedy)
    assert model.generate(PROMPT, 40, eos_token_id=unused) == greedy


def test_eos_as_the_first_token_yields_just_it(model):
    greedy = model.generate(PROMPT, 10)
    assert model.generate(PROMPT, 10, eos_token_id=greedy[0]) == greedy[:1]


@pytest.mark.parametrize("eos", [2.5, "2", [1, None], [1, 2.0], object()])
def test_bad_eos_raises_type_error_before_iteration(numpy_model, eos):
    with pytest.raises(TypeError, match="eos_token_id must be an int or ints"):
        numpy_model.generate_stream(PROMPT, 4, eos_token_id=eos)
