"""Experiments: built-in data and models, a small trainer, recipes and resumable run directories.

>>> from sparsenets.experiments import load_dataset, build_model, Trainer, TrainConfig
>>> data = load_dataset("mnist1d")
>>> model = build_model("lenet_300_100", data.input_shape, data.num_classes)
>>> history = Trainer(model, data, TrainConfig(epochs=5)).fit()

Every experiment (``method:`` of a recipe) is a protocol in :mod:`.protocols`, one file each;
``register_protocol`` adds one.
"""

from ..errors import RecipeError, RunDirError
from ..models import build_model
from .data import Dataset, load_dataset
from .protocols import PROTOCOLS, Protocol, register_protocol
from .recipe import Recipe, load_recipe
from .rundir import RunDir
from .runner import run_recipe
from .trainer import TrainConfig, Trainer, evaluate

__all__ = [
    "PROTOCOLS", "Dataset", "Protocol", "Recipe", "RecipeError", "RunDir", "RunDirError", "TrainConfig", "Trainer",
    "build_model", "evaluate", "load_dataset", "load_recipe", "register_protocol", "run_recipe",
]
