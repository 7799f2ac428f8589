"""``sparsenets prune``: a Hugging Face directory in, a pruned directory out, resumable per block."""

import pytest
import torch

from sparsenets.cli import main
from sparsenets.cli import prune as prune_cli

transformers = pytest.importorskip("transformers")

FAST = ["--calibration", "4", "--seq-len", "32", "--eval-windows", "2"]


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}


def test_prune_writes_a_directory_from_pretrained_loads_with_zeros_kept(lm_checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(lm_checkpoint), "--pattern", "2:4", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "perplexity before" in printed and "perplexity after" in printed
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, weight in linear_weights(model).items():
        groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        assert (groups <= 2).all(), name
    assert (model.lm_head.weight != 0).all()  # left dense by default
    assert (out / "sparsenets_masks.safetensors").is_file()
    assert transformers.AutoTokenizer.from_pretrained(out)("ab")["input_ids"][:2] == [100, 101]
    assert not (out / prune_cli.PARTIAL).exists()


def test_a_killed_run_resumes_after_its_last_pruned_block(lm_checkpoint, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    args = ["--criterion", "sparsegpt", "--sparsity", "0.6", "--no-eval", *FAST]
    assert main(["prune", str(lm_checkpoint), "--out", str(reference), *args]) == 0
    save = prune_cli._save_block

    def save_then_die(model, block_name, partial, index):
        save(model, block_name, partial, index)
        if index == 1:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    monkeypatch.setattr(prune_cli, "_save_block", save_then_die)
    assert main(["prune", str(lm_checkpoint), "--out", str(out), *args]) == 130
    assert sorted(p.name for p in (out / prune_cli.PARTIAL).glob("block_*")) == ["block_0.safetensors",
                                                                                  "block_1.safetensors"]
    monkeypatch.setattr(prune_cli, "_save_block", save)
    # another run's options are refused, and the finished blocks are left in place
    assert main(["prune", str(lm_checkpoint), "--out", str(out), "--sparsity", "0.3", "--no-eval", *FAST]) == 2
    assert "other options" in capsys.readouterr().err
    assert main(["prune", str(lm_checkpoint), "--out", str(out), *args]) == 0
    assert "resuming after 2 pruned block(s)" in capsys.readouterr().out
    expected = linear_weights(transformers.AutoModelForCausalLM.from_pretrained(reference))
    got = linear_weights(transformers.AutoModelForCausalLM.from_pretrained(out))
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name


def test_bad_inputs_exit_2_with_the_bad_value(tmp_path, capsys):
    assert main(["prune", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["prune", str(tmp_path), "--out", str(tmp_path / "o"), "--criterion", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["prune", str(tmp_path), "--out", str(tmp_path / "o"), "--calibration", "0"]) == 2
    assert "--calibration" in capsys.readouterr().err
