"""The text yardstick: the pinned corpus and its splits, perplexity, calibration windows, the built-in LM."""

import gzip
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenets.errors import ConfigError, SparsenetsError
from sparsenets.text import (
    LMConfig,
    builtin_lm,
    byte_tokenizer,
    calibration_batches,
    corpus_info,
    corpus_text,
    encode,
    perplexity,
    save_builtin_lm,
    untrained_lm,
)
from sparsenets.text import corpus as corpus_module
from sparsenets.text import lm as lm_module

pytest.importorskip("transformers")

TINY = LMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, seq_len=64, batch_size=8, steps=40, lr=1e-2, warmup_steps=5)
VOCAB = 259


# ---- corpus ------------------------------------------------------------------------------------------


def test_splits_partition_the_corpus_deterministically():
    splits = {s: corpus_text(s) for s in ("train", "validation", "test")}
    assert splits == {s: corpus_text(s) for s in splits}
    whole = corpus_module._read(corpus_module.DATA)
    paragraphs = whole.split("\n\n")
    assert sorted(p for t in splits.values() for p in t.split("\n\n")) == sorted(paragraphs)
    train = set(splits["train"].split("\n\n"))
    for held_out in ("validation", "test"):
        assert 0.03 < len(splits[held_out]) / len(whole) < 0.06
        leaked = [p for p in splits[held_out].split("\n\n") if p in train and len(p) >= 60]
        assert not leaked  # the corpus keeps each long paragraph once, so none is in two splits
    info = corpus_info()
    assert info["sha256"] == corpus_module.SHA256 and info["splits"]["test"]["chars"] == len(splits["test"])


def test_unknown_split_is_named():
    with pytest.raises(ConfigError, match="'dev'"):
        corpus_text("dev")


def test_a_tampered_corpus_file_is_refused(tmp_path, monkeypatch):
    text = gzip.decompress(corpus_module.DATA.read_bytes()).replace(b"Python", b"Pithon", 1)
    tampered = tmp_path / "corpus.txt.gz"
    tampered.write_bytes(gzip.compress(text))
    monkeypatch.setattr(corpus_module, "DATA", tampered)
    with pytest.raises(SparsenetsError, match="sha256"):
        corpus_text("train")


def test_encoding_is_utf8_bytes_plus_three():
    text = "naïve café → ok"
    assert encode(text).tolist() == [b + 3 for b in text.encode()]
    assert len(byte_tokenizer()) == VOCAB


# ---- perplexity --------------------------------------------------------------------------------------


class Recorder(nn.Module):
    """Fixed logits; records the windows it is shown."""

    def __init__(self, logits=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.logits, self.seen = logits, []

    def forward(self, input_ids):
        self.seen.append(input_ids)
        logits = self.logits(input_ids) if self.logits else torch.zeros(*input_ids.shape, VOCAB)
        return SimpleNamespace(logits=logits)


def test_uniform_logits_give_the_vocabulary_size():
    ids = torch.randint(3, VOCAB, (1000,))
    assert perplexity(Recorder(), ids, seq_len=64) == pytest.approx(VOCAB, rel=1e-6)


def test_windows_are_non_overlapping_and_the_tail_is_dropped():
    ids = torch.arange(3 * 50 + 7) % VOCAB
    model = Recorder()
    perplexity(model, ids, seq_len=50, batch_size=2)
    assert [len(b) for b in model.seen] == [2, 1]
    assert torch.equal(torch.cat(model.seen).flatten(), ids[:150])
    model.seen.clear()
    perplexity(model, ids, seq_len=50, max_windows=1)
    assert torch.equal(torch.cat(model.seen).flatten(), ids[:50])


def test_a_model_that_knows_the_next_token_scores_one():
    def next_token(input_ids):  # the stream counts up, so the next id is always this one + 1
        return F.one_hot((input_ids + 1) % VOCAB, VOCAB).float() * 100
    assert perplexity(Recorder(next_token), torch.arange(1000) % VOCAB, seq_len=32) == pytest.approx(1.0)


def test_perplexity_is_exp_mean_nll_by_hand(one_thread):
    model = untrained_lm(TINY)
    ids = encode(corpus_text("test")[:1000])
    seq_len, nll, count = 48, 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - seq_len + 1, seq_len):
            window = ids[start: start + seq_len]
            logp = model(input_ids=window[None]).logits[0].log_softmax(-1)
            nll -= logp[torch.arange(seq_len - 1), window[1:]].sum().item()
            count += seq_len - 1
    assert perplexity(model, ids, seq_len=seq_len, batch_size=3) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_mode_is_restored(one_thread):
    model = untrained_lm(TINY)
    ids = encode(corpus_text("test")[:500])
    model.train()
    perplexity(model, ids, seq_len=64)
    assert model.training
    model.eval()
    perplexity(model, ids, seq_len=64)
    assert not model.training


@pytest.mark.parametrize("kwargs, named", [({"seq_len": 1}, "seq_len=1"), ({"seq_len": 101}, "seq_len=101"),
                                           ({"batch_size": 0}, "batch_size=0"), ({"max_windows": 0}, "max_windows=0")])
def test_bad_arguments_are_named(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        perplexity(Recorder(), torch.zeros(100, dtype=torch.long), **{"seq_len": 10, **kwargs})


# ---- calibration -------------------------------------------------------------------------------------


def test_calibration_windows_are_train_text_and_seeded():
    train = encode(corpus_text("train"))
    batches = calibration_batches(train, 10, 128, seed=3, batch_size=4)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(4, 128), (4, 128), (2, 128)]
    train_bytes = bytes((train - 3).tolist())
    for row in torch.cat([b["input_ids"] for b in batches]):
        assert bytes((row - 3).tolist()) in train_bytes
    torch.manual_seed(123)  # the global RNG does not matter, only the seed
    again = calibration_batches(train, 10, 128, seed=3, batch_size=4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    other = calibration_batches(train, 10, 128, seed=4, batch_size=4)
    assert not torch.equal(batches[0]["input_ids"], other[0]["input_ids"])


# ---- the built-in LM ---------------------------------------------------------------------------------


def test_training_lowers_perplexity(one_thread):
    ids = encode(corpus_text("validation"))
    before = perplexity(untrained_lm(TINY), ids, seq_len=64, max_windows=40)
    after = perplexity(lm_module.train_lm(TINY), ids, seq_len=64, max_windows=40)
    assert before > 200 and after < 0.2 * before


def test_the_architecture_is_a_small_llama():
    config = untrained_lm().config
    assert config.model_type == "llama" and config.vocab_size == VOCAB
    assert config.num_key_value_heads < config.num_attention_heads


def test_a_cached_model_is_reused_not_retrained(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("SPARSENETS_CACHE", str(tmp_path))
    first, tokenizer = builtin_lm(3, config=TINY)
    assert not first.training and len(tokenizer) == VOCAB

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(lm_module, "train_lm", no_training)
    second, _ = builtin_lm(3, config=TINY)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    with pytest.raises(AssertionError, match="retrained"):  # other steps: another key
        builtin_lm(4, config=TINY)


def test_saved_directory_loads_offline_with_the_same_logits(tmp_path, monkeypatch, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SPARSENETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = save_builtin_lm(tmp_path / "lm", steps=3, config=TINY)
    assert (directory / "model.safetensors").exists()
    model, tokenizer = builtin_lm(3, config=TINY)
    loaded = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    text = "def f(x):\n    return x"
    ids = encode(text, loaded_tokenizer)
    assert torch.equal(ids, encode(text, tokenizer))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids[None]).logits, model(input_ids=ids[None]).logits)


@pytest.mark.slow
def test_the_default_model_is_well_trained(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSENETS_CACHE", str(tmp_path))
    model, tokenizer = builtin_lm()
    assert perplexity(model, encode(corpus_text("test"), tokenizer)) < 4
