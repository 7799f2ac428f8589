"""Hugging Face ``transformers``: run any method inside ``Trainer``, and save masked models for ``from_pretrained``.

- :class:`SparsityCallback` calls a method's hooks from ``Trainer``'s callback events.
- :func:`save_pretrained` writes the masked weights baked in, under their plain names, so plain
  ``from_pretrained`` loads the zeros and the outputs; the masks go to a side file
  (:data:`MASKS_FILE`) and the recipe to ``config.json`` (``config.sparsenets``).
- :func:`restore_masks` puts the masks back on the loaded model for further sparse training.
- :func:`save_quantized` / :func:`load_quantized`: a quantized model (``sparsenets.quantize_``)
  as ``config.json`` plus its integer codes in a sparsenets checkpoint (:data:`QUANTIZED_FILE`),
  since ``from_pretrained`` has no place for them.

A model from :func:`sparsenets.compress` with heads or MLP channels removed saves with its
``config.json`` rewritten to the new sizes (``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``intermediate_size`` or the family's name for it) when every layer kept the same
number, so plain ``from_pretrained`` builds the smaller model; otherwise it raises
:class:`~sparsenets.errors.CheckpointError` and ``sparsenets.save``/``sparsenets.load`` is the way.

``model.save_pretrained`` of a masked model would write parametrize's keys
(``…parametrizations.weight.original``), which ``from_pretrained`` does not recognise: it would
re-initialise those weights without an error.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import TrainerCallback

from .._version import __version__
from ..attention import projections
from ..compression.channels import feedforward_groups
from ..config import SparsityConfig, as_config
from ..errors import CheckpointError
from ..masking import Mask, attach, masks, parametrization_list
from ..methods import Method
from ..methods.state import copy_masks
from ..report import report

MASKS_FILE = "sparsenets_masks.safetensors"
QUANTIZED_FILE = "sparsenets_quantized.safetensors"


# ---- Trainer ---------------------------------------------------------------------------------


class SparsityCallback(TrainerCallback):
    """Drive ``method`` from ``transformers.Trainer``: ``Trainer(..., callbacks=[SparsityCallback(method)])``.

    Build the method before ``trainer.train()``. Its hooks get ``step`` = updates done
    (``state.global_step``), so gradient accumulation counts one step per optimizer update.
    """

    def __init__(self, method: Method) -> None:
        self.method = method
        self._started = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._started = False
        if optimizer is not None:  # some set-ups (FSDP, SageMaker) create it later: see on_step_begin
            self._start(optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if not self._started:
            if optimizer is None:
                raise RuntimeError("Trainer gave SparsityCallback no optimizer before the first update")
            self._start(optimizer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.method.before_optimizer_step(state.global_step + 1)  # the update about to be made

    def on_step_end(self, args, state, control, **kwargs):
        self.method.step(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        # state.epoch is fractional (epoch + share of it done); an epoch cut short by max_steps still ends
        self.method.on_epoch_end(max(1, math.ceil(state.epoch - 1e-6)))

    def _start(self, optimizer: Any) -> None:
        self.method.on_train_begin(self.method.model, optimizer)
        self._started = True


# ---- save_pretrained / from_pretrained ---------------------------------------------------------


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every masked tensor baked in (``original * mask``) under its plain name."""
    state = model.state_dict()
    for module_name, module, name, _ in masks(model):
        others = [p for p in parametrization_list(module, name) if not isinstance(p, Mask)]
        if others:
            raise CheckpointError(f"{module_name}.{name} has other parametrizations "
                                  f"({[type(p).__name__ for p in others]}); remove them first")
        prefix = f"{module_name}.parametrizations.{name}." if module_name else f"parametrizations.{name}."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        with torch.no_grad():
            state[_key(module_name, name)] = getattr(module, name).detach()
    return state


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, method: Method | None = None,
                    config: SparsityConfig | dict | str | None = None, **kwargs: Any) -> Path:
    """``model.save_pretrained(path, **kwargs)`` for a masked or compressed model; returns ``path``.

    Weights are saved with the masks applied under their plain names (plain ``from_pretrained``
    loads them, zeros included), the masks in ``path/sparsenets_masks.safetensors``, and
    ``config.json`` gets ``sparsenets``: the version, the method and its options, the
    sparsity config (``config``, or the method's), and each layer's pattern and density.

    A model that :func:`sparsenets.compress` made smaller (heads, key/value groups or MLP channels
    removed) is saved with the new sizes in ``config.json`` (see :func:`shrunk_config`), and
    ``sparsenets.compressed`` records the compression. Raises
    :class:`~sparsenets.errors.CheckpointError` when the config cannot describe the model (layers
    kept different numbers of heads or channels, or a family whose config has no such setting):
    save such a model with ``sparsenets.save`` and load it with ``sparsenets.load(path, model=...)``.
    The live model and its config are left as they were.
    """
    if not callable(getattr(model, "save_pretrained", None)) or not hasattr(model, "config"):
        raise TypeError(f"save_pretrained needs a Hugging Face model (a PreTrainedModel), got {type(model).__name__}")
    path, state = Path(path), plain_state_dict(model)
    live: Any = model.config
    saved, changes = shrunk_config(model, state)
    saved.sparsenets = recipe(model, method, config)
    if changes or getattr(model, "compress_report", None) is not None:
        saved.sparsenets["compressed"] = _compression(model, changes)
    model.config = saved  # what model.save_pretrained writes; the live config is not touched
    try:
        model.save_pretrained(path, state_dict=state, **kwargs)  # type: ignore[operator]
    finally:
        model.config = live
    _save_masks(model, path / MASKS_FILE)
    return path


# config keys of an MLP's hidden width, by family: Llama/Qwen2/Mistral/BERT/ViT, OPT, DistilBERT, GPT-2, T5
MLP_KEYS = ("intermediate_size", "ffn_dim", "hidden_dim", "n_inner", "d_ff")


def layer_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Each layer's head, key/value head and MLP hidden counts, read from the weights' shapes.

    Keys: ``num_attention_heads`` and ``num_key_value_heads`` (attention with separate q/k/v/o
    projections) and ``mlp`` (known transformer MLPs), each a list in module order.
    """
    sizes: dict[str, list[int]] = {"num_attention_heads": [], "num_key_value_heads": [], "mlp": []}
    for module in model.modules():
        if (p := projections(module)) is not None:
            sizes["num_attention_heads"].append(p.heads)
            sizes["num_key_value_heads"].append(p.kv_heads)
    producers: list[Any] = [group.producer for group in feedforward_groups(model)]
    producers += [m.lin1 for m in model.modules()  # DistilBERT's FFN (cut by the traced channel search)
                  if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("lin1", "lin2"))]
    for producer in producers:
        width = getattr(producer, "out_features", None) or getattr(producer, "nf", None)
        if isinstance(width, int):
            sizes["mlp"].append(width)
    return {key: values for key, values in sizes.items() if values}


def shrunk_config(model: nn.Module, state: dict[str, Tensor] | None = None) -> tuple[Any, dict[str, list[Any]]]:
    """A copy of ``model.config`` with the sizes ``model`` has now, and the changes as ``{key: [old, new]}``.

    When the model's head or MLP sizes differ from its config, the copy gets the new
    ``num_attention_heads``, ``num_key_value_heads`` (with ``head_dim`` set, which
    ``hidden_size // num_attention_heads`` would no longer give) and MLP width, and is checked:
    the family's model built from it (on the meta device) must have exactly the tensors of
    ``state`` (default: :func:`plain_state_dict`), names and shapes. Raises
    :class:`~sparsenets.errors.CheckpointError` when layers differ in size or the check fails.
    """
    live: Any = model.config
    result: Any = copy.deepcopy(live)
    sizes, changes = layer_sizes(model), dict[str, list[Any]]()
    uneven = {key: values for key, values in sizes.items() if len(set(values)) > 1}
    if uneven:
        per_layer = "; ".join(f"{_name(live, key)} {values}" for key, values in uneven.items())
        raise CheckpointError(f"the layers of this compressed {type(model).__name__} kept different sizes "
                              f"({per_layer}), which one {type(live).__name__} cannot describe: save it with "
                              f"sparsenets.save(model, file) and load it with sparsenets.load(file, model=...), "
                              f"which rebuilds the layers' shapes from the file")
    for key, values in sizes.items():
        name = _name(live, key)
        if name is None or getattr(live, name) == values[0]:
            continue
        if key == "num_attention_heads" and "head_dim" not in changes:
            head_dim = next(p.head_dim for m in model.modules() if (p := projections(m)) is not None)
            if getattr(live, "head_dim", None) != head_dim:
                changes["head_dim"] = [getattr(live, "head_dim", None), head_dim]
        changes[name] = [getattr(live, name), values[0]]
    if not changes and getattr(model, "compress_report", None) is None:
        return result, changes
    for name, (_, new) in changes.items():
        setattr(result, name, new)
    _check_shapes(model, result, plain_state_dict(model) if state is None else state, changes)
    return result, changes


def _name(config: Any, key: str) -> str | None:
    """The config attribute behind a :func:`layer_sizes` key (``None`` when the config has none)."""
    names = MLP_KEYS if key == "mlp" else (key,)
    found = next((n for n in names if isinstance(getattr(config, n, None), int)), None)
    if found is None and key == "mlp" and hasattr(config, "n_inner"):  # GPT-2: None stands for 4 * n_embd
        return "n_inner"
    return found


def _check_shapes(model: nn.Module, config: Any, state: dict[str, Tensor], changes: dict[str, list[Any]]) -> None:
    try:
        with torch.device("meta"):
            built = type(model)(config)
    except Exception as err:  # a config value the family rejects (head counts that do not divide hidden_size…)
        raise CheckpointError(f"{type(config).__name__} with {_describe(changes)} does not build "
                              f"{type(model).__name__} ({type(err).__name__}: {err}); save this compressed model "
                              f"with sparsenets.save(model, file), load it with sparsenets.load(file, model=...)"
                              ) from None
    want = {key: tuple(t.shape) for key, t in built.state_dict().items()}
    have = {key: tuple(t.shape) for key, t in state.items()}
    wrong = [f"{key} {have[key]} (the config gives {want[key]})"
             for key in have if key in want and have[key] != want[key]]
    wrong += [f"{key} (not in the config's model)" for key in have if key not in want]
    wrong += [f"{key} (missing)" for key in want if key not in have]
    if wrong:
        listed = "; ".join(wrong[:4]) + (f"; and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise CheckpointError(f"{type(config).__name__} cannot describe this compressed {type(model).__name__}"
                              f"{' even with ' + _describe(changes) if changes else ''}: {listed}. Save it with "
                              f"sparsenets.save(model, file) and load it with sparsenets.load(file, model=...)")


def _describe(changes: dict[str, list[Any]]) -> str:
    return ", ".join(f"{name}={new}" for name, (_, new) in changes.items()) or "its sizes"


def _compression(model: nn.Module, changes: dict[str, list[Any]]) -> dict[str, Any]:
    """What ``config.sparsenets.compressed`` holds: the compress report's summary and the config changes."""
    report_: Any = getattr(model, "compress_report", None)
    return {
        "params_before": getattr(report_, "params_before", None),
        "params_after": sum(p.numel() for p in model.parameters()),
        "removed": list(getattr(report_, "removed", [])),
        "notes": list(getattr(report_, "notes", [])),
        "config_changes": changes,
    }


def recipe(model: nn.Module, method: Method | None = None, config: SparsityConfig | dict | str | None = None
           ) -> dict[str, Any]:
    """How ``model`` was made, as JSON-ready data: what :func:`save_pretrained` writes to ``config.sparsenets``."""
    if config is None and method is not None:
        config = method.config
    result = report(model)
    record: dict[str, Any] = {
        "version": __version__,
        "method": None if method is None else {"name": type(method).__name__, "options": _options(method)},
        "config": None if config is None else as_config(config).to_dict(),
        "sparsity": result.sparsity,
        "layers": {row.name: {"pattern": row.pattern, "density": row.density} for row in result.rows},
        "masks": MASKS_FILE if next(masks(model), None) is not None else None,
    }
    return json.loads(json.dumps(record, default=str))  # tuples, classes and the like as JSON


def restore_masks(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the masks that :func:`save_pretrained` saved in ``path`` back on ``model`` (in place; returns it).

    ``path`` is the ``save_pretrained`` directory or the masks file itself. Every mask is checked
    against the model before the first is attached.
    """
    file = Path(path)
    if file.is_dir():
        file = file / MASKS_FILE
    if not file.is_file():
        raise CheckpointError(f"no sparsenets masks file at {str(file)!r} (was the model saved with "
                              f"sparsenets.integrations.huggingface.save_pretrained?)")
    with safe_open(str(file), framework="pt") as handle:
        patterns = json.loads((handle.metadata() or {}).get("patterns", "{}"))
        loaded = {key: handle.get_tensor(key) for key in handle.keys()}
    targets = {key: _target(model, key, mask) for key, mask in loaded.items()}
    for key, (module, name) in targets.items():
        attach(module, name, loaded[key], patterns.get(key, "unstructured"))
    return model


def _save_masks(model: nn.Module, file: Path) -> None:
    saved = copy_masks(model)
    tensors = {key: mask.cpu().contiguous() for key, (mask, _) in saved.items()}
    patterns = {key: pattern for key, (_, pattern) in saved.items()}
    save_file(tensors, str(file), metadata={"format": "sparsenets-masks", "patterns": json.dumps(patterns)})


def _target(model: nn.Module, key: str, mask: Tensor) -> tuple[nn.Module, str]:
    module_name, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise CheckpointError(f"the masks file has a mask for {key!r}, but the model has no module "
                              f"{module_name!r}") from None
    tensor = getattr(module, name, None)
    if not isinstance(tensor, Tensor):
        raise CheckpointError(f"the masks file has a mask for {key!r}, but {module_name!r} has no tensor {name!r}")
    if tuple(tensor.shape) != tuple(mask.shape):
        raise CheckpointError(f"the mask for {key!r} has shape {tuple(mask.shape)}, "
                              f"the model's tensor {tuple(tensor.shape)}")
    return module, name


def _key(module_name: str, name: str) -> str:
    return f"{module_name}.{name}" if module_name else name


def _options(method: Method) -> dict[str, Any]:
    """The method's keyword-only options (``start``, ``update_every``…) as they are set on it."""
    names = [p.name for p in inspect.signature(type(method).__init__).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    values = {name: getattr(method, name) for name in names if hasattr(method, name)}
    return {name: v for name, v in values.items() if v is None or isinstance(v, (bool, int, float, str))}


# ---- quantized models ------------------------------------------------------------------------

def save_quantized(model: nn.Module, path: str | os.PathLike, config: Any = None) -> Path:
    """Write ``model``'s ``config.json`` (with ``sparsenets.quantization``: the ``QuantConfig``
    used, if given) and its weights, integer codes included, as :data:`QUANTIZED_FILE` in
    ``path``; returns ``path``. The live model and its config are left as they were."""
    from ..io import save

    if not hasattr(model, "config") or not callable(getattr(model.config, "save_pretrained", None)):
        raise TypeError(f"save_quantized needs a Hugging Face model (a PreTrainedModel), got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    saved: Any = copy.deepcopy(model.config)
    quantization = None if config is None else json.loads(json.dumps(vars(config), default=str))
    saved.sparsenets = {"version": __version__, "weights": QUANTIZED_FILE, "quantization": quantization}
    save(model, path / QUANTIZED_FILE)  # first: a failed save leaves no config.json announcing a model
    saved.save_pretrained(path)
    return path


def load_quantized(path: str | os.PathLike, auto_class: Any = None) -> nn.Module:
    """The model :func:`save_quantized` wrote to ``path``, in eval mode: built from its
    ``config.json`` with ``auto_class`` (default ``AutoModelForCausalLM``), quantized layers
    rebuilt from the file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..io import load

    path = Path(path)
    if not (path / QUANTIZED_FILE).is_file():
        raise CheckpointError(f"{path} holds no quantized weights ({QUANTIZED_FILE} is missing)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = (auto_class or AutoModelForCausalLM).from_config(config)
    return load(path / QUANTIZED_FILE, model).eval()
