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
