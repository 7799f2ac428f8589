"""Kernel choice that holds under load: the one timer, the median-ratio interval, the decision rule."""

import json
import os
import random
import stat

import pytest
import torch
from torch import nn

import sparsenets as sn
from sparsenets.compression import choose
from sparsenets.layers.block_sparse import BlockSparseLinear
from sparsenets.utils import timing
from sparsenets.utils.timing import Timings, interleaved, median_interval

# ---- the timer -------------------------------------------------------------------------------------------


class FakeClock:
    """A clock that only moves when a candidate "runs": deterministic timings."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def __call__(self):
        return self.now

    def candidate(self, name, seconds):
        def run():
            self.calls.append(name)
            self.now += seconds
        return run


def test_interleaved_rounds_rotate_and_record_each_call():
    clock = FakeClock()
    runs = {name: clock.candidate(name, t) for name, t in (("a", 0.001), ("b", 0.002), ("c", 0.004))}
    synced = []
    timings = interleaved(runs, rounds=4, warmup=1, sync=lambda: synced.append(clock.now), clock=clock)
    assert clock.calls[:3] == ["a", "b", "c"]  # the untimed warm-up round
    assert clock.calls[3:9] == ["a", "b", "c", "b", "c", "a"]  # the order rotates each round
    assert timings.seconds == {name: pytest.approx([t] * 4) for name, t in (("a", 0.001), ("b", 0.002), ("c", 0.004))}
    assert len(synced) == 2 * 12  # before and after every timed call
    assert timings.median_ms() == pytest.approx({"a": 1.0, "b": 2.0, "c": 4.0})
    assert timings.ratios("c", "a") == pytest.approx([4.0] * 4)


def test_interleaved_budgets():
    clock = FakeClock()
    runs = {"fast": clock.candidate("fast", 0.01), "slow": clock.candidate("slow", 1.0)}
    total = interleaved(runs, rounds=100, min_rounds=3, warmup=0, budget_s=5.0, clock=clock)
    assert len(total.seconds["fast"]) == 5  # 5 rounds pass the 5 s budget; a new round then doesn't start
    clock = FakeClock()
    runs = {"fast": clock.candidate("fast", 0.01), "slow": clock.candidate("slow", 1.0)}
    each = interleaved(runs, rounds=10, min_rounds=3, warmup=0, candidate_budget_s=2.0, clock=clock)
    assert len(each.seconds["slow"]) == 3 and len(each.seconds["fast"]) == 10


def test_median_interval_is_the_sign_test_interval():
    values = [float(v) for v in range(1, 13)]
    assert median_interval(values[:4]) == (0.0, float("inf"))  # 4 rounds can never be significant
    assert median_interval(values[:5]) == (1.0, 5.0)  # 1/32 < 5 % on each side
    assert median_interval(values) == (3.0, 10.0)  # n = 12: P(X <= 2) = 1.9 %, P(X <= 3) = 7.3 %
    assert median_interval(list(reversed(values))) == (3.0, 10.0)


# ---- the decision, on synthetic timings ---------------------------------------------------------------------


def _rounds(seed, n, **centres):
    """Per-round seconds around each centre: log-normal noise plus occasional scheduler stalls."""
    rng = random.Random(seed)
    out = {name: [] for name in centres}
    for _ in range(n):
        for name, (centre, noise) in centres.items():
            stall = 0.008 if rng.random() < 0.15 else 0.0
            out[name].append(centre * rng.lognormvariate(0, noise) + stall)
    return Timings(out)


def test_a_noisy_but_clear_win_overrides_the_rule():
    timings = _rounds(1, 12, dense=(0.008, 0.3), block=(0.0012, 0.3))
    assert choose.decide(timings, "dense") == ("block", "timed")


def test_equal_times_with_huge_noise_keep_the_rule_and_say_so():
    timings = _rounds(2, 12, dense=(0.008, 0.6), block=(0.008, 0.6), csr=(0.008, 0.6))
    kind, how = choose.decide(timings, "block")
    assert kind == "block"
    assert how.startswith(choose.INCONCLUSIVE) and "/block" in how and "over 12 rounds" in how


def test_a_clear_dense_win_overrides_a_rule_that_says_block():
    timings = _rounds(3, 12, dense=(0.008, 0.2), block=(0.02, 0.2))
    assert choose.decide(timings, "block") == ("dense", "timed")


def test_timing_that_confirms_the_rule_is_reported_as_timed():
    timings = _rounds(4, 12, dense=(0.008, 0.2), block=(0.001, 0.2))
    assert choose.decide(timings, "block") == ("block", "timed")


def test_best_of_n_would_have_been_fooled():
    """What the old rule (min times, 10 % margin) got wrong: one lucky dense round decided."""
    timings = Timings({"dense": [0.008] * 9 + [0.0009], "block": [0.001] * 10})
    assert timings.min_ms()["block"] > 0.9 * timings.min_ms()["dense"]
    assert choose.decide(timings, "block") == ("block", "timed")


# ---- the decision inside compress ----------------------------------------------------------------------------


def _block_sparse_model():
    model = nn.Sequential(nn.Linear(256, 256))
    sn.sparsify_(model, {"sparsity": 0.9, "pattern": "block:32x32"})
    return model


def _fake_measure(monkeypatch, **centres):
    def measure(built, x, prior):
        assert set(built) == set(centres)
        return _rounds(5, 12, **centres)
    monkeypatch.setattr(choose, "_measure", measure)
    monkeypatch.setattr(choose, "_TIMINGS", {})


def test_inconclusive_timing_is_recorded_in_the_report(monkeypatch):
    _fake_measure(monkeypatch, dense=(0.008, 0.6), csr=(0.008, 0.6), block=(0.008, 0.6))
    compressed = sn.compress(_block_sparse_model(), torch.randn(8, 256))
    (layer,) = compressed.compress_report.layers
    assert layer.kind == "block" and layer.how.startswith(choose.INCONCLUSIVE)
    assert isinstance(compressed[0], BlockSparseLinear)
    assert any(note.startswith("0: rule (timing inconclusive") for note in compressed.compress_report.notes)


def test_a_clear_dense_win_keeps_the_layer_dense(monkeypatch):
    _fake_measure(monkeypatch, dense=(0.008, 0.1), csr=(0.03, 0.1), block=(0.025, 0.1))
    compressed = sn.compress(_block_sparse_model(), torch.randn(8, 256))
    (layer,) = compressed.compress_report.layers
    assert (layer.kind, layer.how) == ("dense", "timed") and isinstance(compressed[0], nn.Linear)
    assert not compressed.compress_report.notes


def test_compress_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(choose, "TUNE_SECONDS", 0.01)
    monkeypatch.setattr(choose, "_TIMINGS", {})
    model, example = _block_sparse_model(), torch.randn(4, 256)
    state = torch.get_rng_state()
    sn.compress(model, example)
    assert torch.equal(torch.get_rng_state(), state)


# ---- the timings file ------------------------------------------------------------------------------------------


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_timings_file_has_the_users_permissions_and_round_trips(tmp_path, monkeypatch, umask_027):
    _fake_measure(monkeypatch, dense=(0.008, 0.1), csr=(0.03, 0.1), block=(0.025, 0.1))
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"old|format": {"dense": 1.5}}))  # an older file: ignored, not an error
    sn.compress(_block_sparse_model(), torch.randn(8, 256), cache=str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 less the umask, as open() would give
    stored = json.loads(path.read_text())
    assert "old|format" not in stored and len(stored) == 1
    monkeypatch.setattr(choose, "_TIMINGS", {})
    monkeypatch.setattr(choose, "_measure", None)  # a rerun must not time again
    again = sn.compress(_block_sparse_model(), torch.randn(8, 256), cache=str(path)).compress_report
    assert [(c.kind, c.how) for c in again.layers] == [("dense", "cached")]


def test_default_timings_file_is_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSENETS_CACHE", str(tmp_path))
    monkeypatch.delenv(choose.CACHE_ENV, raising=False)
    assert choose.cache_path(True) == tmp_path / "autotune" / "timings.json"
    assert choose.cache_path(None) is None
    monkeypatch.setenv(choose.CACHE_ENV, str(tmp_path / "t.json"))
    assert choose.cache_path(None) == tmp_path / "t.json"


def test_cuda_sync_only_for_gpu_tensors():
    assert timing.cuda_sync(torch.zeros(1)) is None


def test_timing_goes_on_only_while_inconclusive(monkeypatch):
    unclear = _rounds(2, 5, dense=(0.008, 0.6), block=(0.008, 0.6))
    clear = Timings({"dense": [0.008] * 12, "block": [0.001] * 12})
    batches, calls = iter([unclear, clear, clear]), []

    def fake(candidates, **options):
        calls.append(options)
        return next(batches)
    monkeypatch.setattr(timing, "interleaved", fake)
    layers = {"dense": nn.Identity(), "block": nn.Identity()}
    found = choose._measure(layers, torch.zeros(1), "dense")
    assert len(calls) == 2 and calls[0]["warmup"] == 1 and calls[1]["warmup"] == 0
    assert len(found.seconds["block"]) == 17  # both batches of rounds count
    assert choose.decide(found, "dense") == ("block", "timed")
