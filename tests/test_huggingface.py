"""Hugging Face: methods inside transformers.Trainer, and masked models through save_pretrained/from_pretrained."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import sparsenets as sn  # noqa: E402
from sparsenets.errors import CheckpointError  # noqa: E402
from sparsenets.integrations.huggingface import (  # noqa: E402
    MASKS_FILE,
    SparsityCallback,
    restore_masks,
    save_pretrained,
)
from sparsenets.masking import masks  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def tokens(n: int = 16, length: int = 12) -> list[dict]:
    ids = torch.randint(0, 128, (n, length))
    return [{"input_ids": row, "labels": row} for row in ids]


def train(model, method, tmp_path, **overrides) -> Trainer:
    options = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                   report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                   dataloader_num_workers=0)
    trainer = Trainer(model=model, args=TrainingArguments(**(options | overrides)), train_dataset=tokens(),
                      callbacks=[SparsityCallback(method)])
    trainer.train()
    return trainer


def mask_tensors(model) -> dict[str, torch.Tensor]:
    return {f"{module_name}.{name}": mask.mask.clone() for module_name, _, name, mask in masks(model)}


# ---- Trainer -----------------------------------------------------------------------------------


def test_gradual_pruning_in_trainer_reaches_its_target(tmp_path):
    model = tiny_llama()
    method = sn.GradualMagnitudePruning(model, {"sparsity": 0.75}, start=0, end=4, frequency=2)
    train(model, method, tmp_path)
    kept = mask_tensors(model)
    assert len(kept) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    assert sum(int(m.sum()) for m in kept.values()) / sum(m.numel() for m in kept.values()) == pytest.approx(0.25)


def test_rigl_in_trainer_moves_masks_at_exact_sparsity(tmp_path):
    model = tiny_llama()
    method = sn.RigL(model, {"sparsity": 0.8, "criterion": "random"}, update_every=2, drop_fraction=0.3)
    before = mask_tensors(model)
    train(model, method, tmp_path)
    after = mask_tensors(model)
    assert [u["step"] for u in method.updates] == [2, 4, 6]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # RigL saw dense gradients and rewired
    assert {k: int(m.sum()) for k, m in after.items()} == {k: int(m.sum()) for k, m in before.items()}


class Recorder(sn.Method):
    """Records each hook, whether gradients are there, and whether the weights moved since the last hook."""

    def __init__(self, model):
        super().__init__(model, {"sparsity": 0.5})
        self.events: list[tuple] = []
        self.weight = model.model.layers[0].mlp.up_proj.weight

    def on_train_begin(self, model, optimizer):
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.events.append(("begin", model is self.model, id(self.weight) in owned))

    def before_optimizer_step(self, step):
        self.seen = self.weight.detach().clone()
        has_grad = self.weight.grad is not None and bool(self.weight.grad.abs().sum() > 0)
        self.events.append(("before", step, has_grad))

    def step(self, step):
        self.events.append(("step", step, not torch.equal(self.weight, self.seen)))

    def on_epoch_end(self, epoch):
        self.events.append(("epoch", epoch))


def test_trainer_calls_the_hooks_in_order_once_per_update_with_gradients(tmp_path):
    model = tiny_llama()
    recorder = Recorder(model)
    # 16 samples in batches of 4, two batches per update: 2 updates an epoch
    train(model, recorder, tmp_path, max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=2)
    updates = [[("before", s, True), ("step", s, True)] for s in range(1, 5)]
    assert recorder.events == [("begin", True, True), *updates[0], *updates[1], ("epoch", 1),
                               *updates[2], *updates[3], ("epoch", 2)]


def test_callback_binds_an_optimizer_made_after_train_begin():
    recorder = Recorder(tiny_llama())
    callback = SparsityCallback(recorder)
    state, optimizer = SimpleNamespace(global_step=0), torch.optim.SGD(recorder.model.parameters(), lr=0.1)
    callback.on_train_begin(None, state, None, optimizer=None)
    assert recorder.events == []
    callback.on_step_begin(None, state, None, optimizer=optimizer)
    callback.on_step_begin(None, state, None, optimizer=optimizer)
    assert recorder.events == [("begin", True, True)]
    with pytest.raises(RuntimeError, match="no optimizer"):
        SparsityCallback(recorder).on_step_begin(None, state, None, optimizer=None)


# ---- save_pretrained / from_pretrained -----------------------------------------------------------


@pytest.fixture
def masked(tmp_path):
    """A tiny Llama pruned by a method, saved with save_pretrained."""
    model = tiny_llama().eval()
    method = sn.OneShot(model, {"sparsity": 0.6, "pattern": "block:4x4"}, at_step=0)
    method.on_train_begin(model, None)
    path = save_pretrained(model, tmp_path / "pretrained", method=method)
    return model, method, path


def test_from_pretrained_loads_the_zeros_and_the_outputs(masked):
    model, _, path = masked
    loaded = LlamaForCausalLM.from_pretrained(path).eval()
    assert not list(masks(loaded))
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-6, rtol=0)
    for module_name, module, name, mask in masks(model):
        weight = getattr(loaded.get_submodule(module_name), name)
        assert torch.equal(weight != 0, mask.mask & (getattr(module, name) != 0)), module_name
        assert bool((weight[~mask.mask] == 0).all()), module_name


def test_save_pretrained_leaves_the_model_masked_and_its_config_as_it_was(masked):
    model, _, _ = masked
    assert len(list(masks(model))) == 15
    assert not hasattr(model.config, "sparsenets")


def test_config_records_the_recipe(masked):
    model, _, path = masked
    record = json.loads((path / "config.json").read_text())["sparsenets"]
    assert record["version"] == sn.__version__
    assert record["method"] == {"name": "OneShot", "options": {"at_step": 0}}
    assert (record["config"]["sparsity"], record["config"]["pattern"]) == (0.6, "block:4x4")
    assert record["sparsity"] == pytest.approx(sn.report(model).sparsity)
    down = model.model.layers[1].mlp.down_proj.parametrizations.weight[0].mask
    assert record["layers"]["model.layers.1.mlp.down_proj"] == {"pattern": "block:4x4",
                                                                "density": down.float().mean().item()}
    assert record["layers"]["model.layers.1.mlp.down_proj"]["density"] == pytest.approx(0.4, abs=0.01)
    assert record["layers"]["model.embed_tokens"]["density"] == 1.0
    assert record["masks"] == MASKS_FILE
    assert LlamaForCausalLM.from_pretrained(path).config.sparsenets == record


def test_restore_masks_puts_the_masks_back(masked):
    model, _, path = masked
    loaded = restore_masks(LlamaForCausalLM.from_pretrained(path), path)
    want, got = mask_tensors(model), mask_tensors(loaded)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert {m.pattern for *_, m in masks(loaded)} == {"block:4x4"}
    # the masks keep working: training the restored model further leaves the pruned weights at zero
    weight = loaded.model.layers[0].self_attn.q_proj.parametrizations.weight
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    optimizer.step()
    assert bool((loaded.model.layers[0].self_attn.q_proj.weight[~weight[0].mask] == 0).all())


def test_restore_masks_names_what_does_not_fit(masked, tmp_path):
    _, _, path = masked
    with pytest.raises(CheckpointError, match="no sparsenets masks file"):
        restore_masks(tiny_llama(), tmp_path)
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)}, str(tmp_path / "bad"))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(3, 3\)"):
        restore_masks(tiny_llama(), tmp_path / "bad")
    save_file({"model.nowhere.weight": torch.ones(3, 3, dtype=torch.bool)}, str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match="no module 'model.nowhere'"):
        restore_masks(tiny_llama(), tmp_path / "gone")
    fresh = tiny_llama()
    with pytest.raises(CheckpointError):  # nothing is attached when one mask does not fit
        save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.bool),
                   "lm_head.weight": torch.ones(1, 1, dtype=torch.bool)}, str(tmp_path / "half"))
        restore_masks(fresh, tmp_path / "half")
    assert not list(masks(fresh))


def test_importing_sparsenets_imports_neither_transformers_nor_lightning():
    code = ("import sys, sparsenets, sparsenets.integrations\n"
            "print(sorted(m for m in ('transformers', 'lightning') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_finalized_model_saves_its_zeros_and_recipe_without_masks(tmp_path):
    model = tiny_llama()
    sn.finalize_(sn.sparsify_(model, {"sparsity": 0.5, "pattern": "2:4"}))
    save_pretrained(model, tmp_path, config={"sparsity": 0.5, "pattern": "2:4"})
    loaded = restore_masks(LlamaForCausalLM.from_pretrained(tmp_path), tmp_path)
    assert not list(masks(loaded))
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    record = loaded.config.sparsenets
    assert (record["method"], record["masks"], record["config"]["pattern"]) == (None, None, "2:4")
    assert record["layers"]["model.layers.0.mlp.up_proj"] == {"pattern": "dense", "density": 0.5}  # no mask: "dense"
    with pytest.raises(TypeError, match="got Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)


# ---- compressed models through save_pretrained / from_pretrained ---------------------------------


def tiny(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return tiny_llama().eval()
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)).eval()
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=64)).eval()


def layers(model):
    return model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers


def zero_out(model, groups: list[list[int]], channels: list[list[int]]):
    """Zero attention groups (output-projection columns) and MLP channels (up/fc1 rows), per layer."""
    with torch.no_grad():
        for layer, gone, cut in zip(layers(model), groups, channels):
            attn = layer.self_attn
            output = getattr(attn, "o_proj", None) or attn.out_proj
            width = output.in_features // getattr(attn.config, "num_key_value_heads", attn.config.num_attention_heads)
            for g in gone:
                output.weight[:, g * width:(g + 1) * width] = 0
            up = layer.mlp.up_proj if hasattr(layer, "mlp") else layer.fc1
            up.weight[cut] = 0
            if up.bias is not None:
                up.bias[cut] = 0
    return model


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def greedy(model) -> torch.Tensor:
    return model.generate(IDS[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=4,
                          do_sample=False, pad_token_id=0)


@pytest.mark.parametrize(("family", "groups", "heads", "kv_heads", "mlp"), [
    ("llama", [[1], [0]], 2, 1, "intermediate_size"), ("qwen2", [[0], [0]], 2, 1, "intermediate_size"),
    ("opt", [[], []], 4, None, "ffn_dim")])  # OPT keeps its heads: see the test below
def test_uniformly_compressed_model_loads_with_plain_from_pretrained(tmp_path, family, groups, heads, kv_heads, mlp):
    dense = zero_out(tiny(family), groups, [list(range(0, 64, 2))] * 2)  # 32 of 128 channels in each layer
    compressed = sn.compress(dense, {"input_ids": IDS}, autotune=False)
    assert n_params(compressed) < n_params(dense)
    tokens_before = greedy(compressed)
    save_pretrained(compressed, tmp_path)
    loaded = type(dense).from_pretrained(tmp_path).eval()
    assert (loaded.config.num_attention_heads, getattr(loaded.config, "num_key_value_heads", None)) == (heads, kv_heads)
    assert getattr(loaded.config, mlp) == 96
    assert n_params(loaded) == n_params(compressed)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, compressed(IDS).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(compressed(IDS).logits, dense(IDS).logits, atol=1e-5, rtol=0)
    assert torch.equal(greedy(loaded), tokens_before)
    assert torch.equal(tokens_before, greedy(dense))
    assert compressed.config.num_attention_heads == 4  # the live model's config is left as it was
    assert not hasattr(compressed.config, "sparsenets")


def test_config_records_the_compression(tmp_path):
    compressed = sn.compress(zero_out(tiny("qwen2"), [[1], [1]], [[0, 5]] * 2), {"input_ids": IDS}, autotune=False)
    save_pretrained(compressed, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # hidden_size // num_attention_heads would now give 32: head_dim is written out
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (2, 1, 16)
    assert saved["intermediate_size"] == 126
    record = saved["sparsenets"]["compressed"]
    assert record["config_changes"] == {"head_dim": [None, 16], "num_attention_heads": [4, 2],
                                        "num_key_value_heads": [2, 1], "intermediate_size": [128, 126]}
    assert record["params_before"] == n_params(tiny("qwen2"))
    assert record["params_after"] == n_params(compressed)
    assert record["removed"] == compressed.compress_report.removed
    assert "model.layers.1.self_attn: removed 1 of 2 key/value groups (2 query heads each)" in record["removed"]


@pytest.mark.parametrize(("groups", "channels", "message"), [
    ([[1], []], [[], []], r"num_attention_heads \[2, 4\]; num_key_value_heads \[1, 2\]"),
    ([[], []], [[0], [0, 1]], r"intermediate_size \[127, 126\]")])
def test_layers_of_different_sizes_name_sparsenets_save(tmp_path, groups, channels, message):
    compressed = sn.compress(zero_out(tiny("llama"), groups, channels), {"input_ids": IDS}, autotune=False)
    with pytest.raises(CheckpointError, match=message) as raised:
        save_pretrained(compressed, tmp_path)
    assert "kept different sizes" in str(raised.value)
    assert "sparsenets.save(model, file)" in str(raised.value)
    assert "sparsenets.load(file, model=...)" in str(raised.value)
    assert not (tmp_path / "config.json").exists()
    # what the message says works
    loaded = sn.load(sn.save(compressed, tmp_path / "m.safetensors"), model=lambda: tiny("llama"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(IDS).logits, compressed(IDS).logits, atol=1e-6, rtol=0)


def test_a_family_whose_config_cannot_describe_the_shapes_raises(tmp_path):
    # OPT derives head_dim from hidden_size // num_attention_heads: it has no setting for fewer heads
    compressed = sn.compress(zero_out(tiny("opt"), [[1], [2]], [[], []]), {"input_ids": IDS}, autotune=False)
    with pytest.raises(CheckpointError, match=r"OPTConfig with .*num_attention_heads=3 does not build OPTForCausalLM "
                                              r".*sparsenets\.save"):
        save_pretrained(compressed, tmp_path)
    # Qwen2: a dead value group's bias folds into o_proj.bias, which Qwen2's config has no place for
    model = tiny("qwen2")
    with torch.no_grad():
        for layer in layers(model):
            layer.self_attn.v_proj.weight[16:] = 0
            layer.self_attn.v_proj.bias[16:] = 0.5
    compressed = sn.compress(model, {"input_ids": IDS}, autotune=False)
    bias = r"model\.layers\.0\.self_attn\.o_proj\.bias \(not in the config's model\)"
    with pytest.raises(CheckpointError, match=rf"Qwen2Config cannot describe .*{bias}"):
        save_pretrained(compressed, tmp_path)


@pytest.mark.parametrize(("family", "key"), [("gpt2", "n_inner"), ("distilbert", "hidden_dim")])
def test_mlp_width_goes_under_the_familys_own_key(tmp_path, family, key):
    """GPT-2's n_inner starts as None (4 * n_embd); DistilBERT's FFN is cut by the traced search."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4,
                                                                     n_positions=16)).eval()
        producers = [(block.mlp.c_fc.weight.T, block.mlp.c_fc.bias) for block in model.transformer.h]
    else:
        model = transformers.DistilBertModel(transformers.DistilBertConfig(
            vocab_size=50, dim=16, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=16)).eval()
        producers = [(layer.ffn.lin1.weight, layer.ffn.lin1.bias) for layer in model.transformer.layer]
    with torch.no_grad():
        for weight, bias in producers:
            weight[:4] = 0
            bias[:4] = 0
    ids = IDS[:, :7] % 50
    compressed = sn.compress(model, {"input_ids": ids}, autotune=False)
    save_pretrained(compressed, tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert getattr(loaded.config, key) == 60
    assert n_params(loaded) == n_params(compressed) == n_params(model) - 2 * 4 * (16 + 1 + 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], compressed(ids)[0], atol=1e-5, rtol=0)
