"""Domain splits of the corpus, LMConfig.data, and the LM experiments (bench/lm_adapters.py, bench/lm_formats.py)."""

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sparsenets.errors import ConfigError
from sparsenets.text import LMConfig, corpus_text, domain_text
from sparsenets.text import corpus as corpus_module
from sparsenets.text import lm as lm_module

pytest.importorskip("transformers")

BENCH = Path(__file__).parents[1] / "bench"


def _is_code(paragraph):
    lines = [line for line in paragraph.split("\n") if line.strip()]
    return bool(lines) and all(line.startswith("   ") for line in lines)


def test_domains_partition_each_split():
    train_code = set(domain_text("train", "code").split("\n\n"))
    for split in ("train", "validation", "test"):
        prose, code = (domain_text(split, kind).split("\n\n") for kind in ("prose", "code"))
        assert prose and code and all(prose) and all(code)
        assert not any(_is_code(p) for p in prose) and all(_is_code(p) for p in code)
        assert sorted(prose + code) == sorted(corpus_text(split).split("\n\n"))
        if split != "train":  # held-out code is never training code
            assert not [p for p in code if p in train_code and len(p) >= 60]
    assert 0.3 < len(domain_text("train", "code")) / len(corpus_text("train")) < 0.4


def test_domain_text_names_bad_values():
    with pytest.raises(ConfigError, match="'python'"):
        domain_text("train", "python")
    with pytest.raises(ConfigError, match="'dev'"):
        domain_text("dev", "code")


def test_lm_config_data_chooses_the_training_text():
    assert lm_module.training_text(LMConfig()) == corpus_text("train")
    assert lm_module.training_text(LMConfig(data="code")) == domain_text("train", "code")
    with pytest.raises(ConfigError, match="'python'"):
        LMConfig(data="python")


def test_default_cache_key_is_the_key_from_before_data_existed():
    import transformers

    config = LMConfig()
    old = {"config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "data"},
           "steps": 1000, "corpus": corpus_module.SHA256, "torch": torch.__version__,
           "transformers": transformers.__version__}
    key = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:24]
    assert lm_module.cache_key(config, 1000) == key
    keys = {lm_module.cache_key(LMConfig(data=d), 1000) for d in ("all", "prose", "code")}
    assert len(keys) == 3


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the tiny LMs the scripts train are trained once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARSENETS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a transformers API deprecated for v6
def test_adapters_script_quick(tmp_path, cache, one_thread):
    pytest.importorskip("peft")
    out = _bench("lm_adapters").main(["--tiny", "--quick", "--json", str(tmp_path / "a.json"),
                                      "--plot", str(tmp_path / "a.png")])
    rows = {r["arm"]: r for r in out["rows"]}
    assert rows["no adaptation"]["trainable"] == 0
    lora, more = rows["LoRA r=1"]["trainable"], rows["MoRe 4x1"]["trainable"]
    assert lora == more > 0 and rows["LoRA r=2"]["trainable"] == 2 * lora  # block_rank·(in+out), as LoRA r
    assert rows["full fine-tuning"]["percent"] == pytest.approx(100)
    assert all(r["code"] and r["prose"] for r in out["rows"])
    assert json.loads((tmp_path / "a.json").read_text())["settings"]["split"] == "test"
    assert (tmp_path / "a.png").stat().st_size > 0


def test_formats_script_quick(tmp_path, cache, one_thread):
    out = _bench("lm_formats").main(["--tiny", "--quick", "--heal", "2", "--plot", str(tmp_path / "f.png")])
    cells = {label: cells["0.5"] for label, cells in out["results"].items()}
    for label, cell in cells.items():
        assert 0.3 < cell["kept"] <= 0.51, label
        assert cell["ppl"] > 1 and cell["healed"] > 1
        assert cell["healed_kept"] == cell["kept"], label  # healing keeps pruned weights at zero
    assert cells["unstructured magnitude"]["kept"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "f.png").stat().st_size > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_adapters_script_tunes_on_validation(cache, one_thread, capsys):
    pytest.importorskip("peft")
    module = _bench("lm_adapters")
    found = module.main(["--tiny", "--quick", "--tune"])["tune"]
    assert {f: len(s) for f, s in found.items()} == {f: len(g) for f, g in module.GRID.items()}
    assert "validation split" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_adapters_script_runs_only_the_arms_asked(cache, one_thread):
    pytest.importorskip("peft")
    out = _bench("lm_adapters").main(["--tiny", "--quick", "--arms", "MoRe 2x*", "no *"])
    assert [r["arm"] for r in out["rows"]] == ["no adaptation", "MoRe 2x1"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_adapters_recipe_runs_every_arm_and_reports_perplexity(tmp_path, cache, one_thread):
    pytest.importorskip("peft")
    from sparsenets.experiments import load_recipe, run_recipe

    recipe = {"name": "tiny_adapters", "seeds": [0, 1],
              "method": {"name": "adapters", "steps": 3, "lora_ranks": [1, 2], "more": [[4, 1]], "tiny": True,
                         "eval_windows": 2}}
    results = run_recipe(load_recipe(recipe), tmp_path / "run")
    rows = results["jobs"]
    assert sorted({r["label"] for r in rows}) == ["LoRA r=1", "LoRA r=2", "MoRe 4x1", "full fine-tuning",
                                                   "no adaptation"]
    assert len([r for r in rows if r["label"] == "MoRe 4x1"]) == 2  # every seed
    by = {r["label"]: r for r in rows}
    assert by["no adaptation"]["trainable"] == 0 and by["full fine-tuning"]["remaining"] == pytest.approx(1)
    assert by["MoRe 4x1"]["trainable"] == by["LoRA r=1"]["trainable"] > 0  # equal parameters, rank 4 vs 1
    assert all(r["code_perplexity"] > 1 and r["prose_perplexity"] > 1 for r in rows)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| MoRe 4x1 |" in report and (tmp_path / "run" / "plots" / "perplexity_vs_trainable.png").exists()
