import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread, and don't spin-wait on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lm_checkpoint(tmp_path):
    """A Hugging Face directory of a tiny untrained built-in LM (3 blocks) and its byte tokenizer."""
    pytest.importorskip("transformers")
    from sparsenets.text import LMConfig, byte_tokenizer, untrained_lm

    config = LMConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, seq_len=32)
    directory = tmp_path / "lm"
    untrained_lm(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory
