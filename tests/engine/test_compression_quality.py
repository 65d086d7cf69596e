"""4-bit compression on a small trained OPT: perplexity and greedy agreement stay within measured
bounds (tests/support/quality_model.py trains and caches the model; the first run trains for ~2 min).

Bounds come from benchmarks/bench_compression_quality.py on the cached model (table below), with
a margin: training is seeded, but another Python (another stdlib to train on) or torch build gives
another model, so the bounds are set well above the measurement and well below what 2 bits cost.
"""
from __future__ import annotations

import pytest
import torch

from tests.support.quality_model import get_quality_model, heldout_windows, load_model, measure_quality, perplexity

pytestmark = pytest.mark.slow

# Measured with benchmarks/bench_compression_quality.py (2 vCPU Zen4, torch 2.13 CPU, Python 3.11;
# held-out ppl of the uncompressed model 139.8 over 8128 tokens; 32 prompts x 16 greedy tokens):
#   variant              ppl change   prefix agreement   (2-bit, for scale)
#   weights                +0.12 %        0.752           +4.11 %  0.469
#   weights+embeddings     +0.69 %        0.648          +21.19 %  0.242
#   cache                  +0.02 %        0.945           +0.18 %  0.705
#   weights+cache          +0.17 %        0.775           +4.69 %  0.531
# Bounds: perplexity about 5x the measured increase (at least 0.5 points of a percent) — still
# far below what 2-bit weights cost; agreement about 0.2 below the measurement (32 prompts make
# it coarse: one prompt diverging at its first token moves it by 0.03).
MAX_PPL_INCREASE_PCT = {"weights": 1.0, "weights+embeddings": 3.0, "cache": 0.5, "weights+cache": 1.0}
MIN_PREFIX_AGREEMENT = {"weights": 0.55, "weights+embeddings": 0.45, "cache": 0.75, "weights+cache": 0.55}


@pytest.fixture(scope="module")
def model_dir():
    return get_quality_model(log=lambda msg: print(msg, flush=True))


@pytest.fixture(scope="module")
def quality(model_dir):
    return measure_quality(model_dir, bits=4, group_size=64)


def test_the_model_learned_something(model_dir, quality):
    # A 4096-token vocabulary gives perplexity 4096 at chance; measured 140 (held-out files: other
    # modules than the training text). Far above that, the numbers below would say nothing.
    assert quality["variants"]["fp16"]["perplexity"] < 300


def test_token_by_token_pass_equals_one_forward(model_dir):
    # The cache path scores tokens one step at a time; without compression it must agree with a
    # single full forward, or the cache numbers would measure the harness, not the compression.
    model = load_model(model_dir)
    windows = heldout_windows(model_dir, count=4, length=64)
    full = perplexity(model, windows)
    stepwise = perplexity(model, windows, stepwise=True)
    assert stepwise == pytest.approx(full, rel=1e-4)


def test_cache_round_trip_is_live(model_dir):
    # 8-bit cache: next to no change (measured -2e-5); 2-bit: a visible one (measured -1.8e-3,
    # this small model is not very sensitive to its cache). Shows the hook reaches the cache.
    model = load_model(model_dir)
    windows = heldout_windows(model_dir, count=8, length=64)
    full = perplexity(model, windows)
    assert abs(perplexity(model, windows, cache_bits=8) / full - 1) < 2e-4
    assert abs(perplexity(model, windows, cache_bits=2) / full - 1) > 5e-4


@pytest.mark.parametrize("variant", ["weights", "weights+embeddings", "cache", "weights+cache"])
def test_4bit_perplexity_within_bound(quality, variant):
    change = quality["variants"][variant]["perplexity_change_pct"]
    assert change <= MAX_PPL_INCREASE_PCT[variant], (variant, change)


@pytest.mark.parametrize("variant", ["weights", "weights+embeddings", "cache", "weights+cache"])
def test_4bit_greedy_agreement(quality, variant):
    agree = quality["variants"][variant]["prefix_fraction"]
    assert agree >= MIN_PREFIX_AGREEMENT[variant], (variant, agree)


def test_uncompressed_agrees_with_itself(quality):
    assert quality["variants"]["fp16"]["prefix_fraction"] == 1.0
    assert quality["variants"]["fp16"]["perplexity_change_pct"] == 0.0
    assert torch.isfinite(torch.tensor([v["perplexity"] for v in quality["variants"].values()])).all()
