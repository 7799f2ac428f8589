"""One-shot LLM pruning side by side: llm-compressor against sparsenets, same model, same calibration windows.

For each method (SparseGPT, Wanda) and each tool, a fresh copy of the Hugging Face checkpoint
``--model`` is loaded in its own subprocess (so peak RSS is that run's alone), pruned to
``--sparsity`` with ``--pattern`` (``unstructured`` or ``2:4``) from the same ``--calibration``
windows of ``--seq-len`` tokens of the corpus' train split, every decoder Linear, ``lm_head`` left
dense. Then: perplexity on the test split, the sparsity reached by the decoder Linear weights (and
whether each is 2:4), the wall time of the pruning call, and the peak RSS of the process.

* sparsenets: ``sn.sparsify_(model, {"criterion": m, "sparsity": s, "pattern": p, "exclude": ["lm_head"]},
  data=batches)`` then ``sn.finalize_(model)`` (with ``--zeros``: ``masks=False``, as llm-compressor, which
  writes the zeros in place and keeps no mask).
* llm-compressor: ``oneshot(model=..., recipe=SparseGPTModifier | WandaPruningModifier(sparsity=s,
  mask_structure="0:0" | "2:4", targets=["Linear"], ignore=["re:.*lm_head"]), dataset=DataLoader(batches),
  pipeline="sequential")``, its defaults otherwise (SparseGPT: block 128, dampening 0.01).

Runs are interleaved (sparsenets, llm-compressor, sparsenets, ...) ``--repeats`` times; time and
RSS are medians, perplexity is from the first repeat (pruning is deterministic). A run that fails
gets its error in the table and the others go on. Needs a venv with both tools (docs/vs_llmcompressor.md):

    /tmp/lcvenv/bin/python bench/vs_llmcompressor.py [--model DIR] [--sparsity 0.5] [--pattern unstructured|2:4]
        [--calibration 32] [--seq-len 256] [--repeats 1] [--methods sparsegpt wanda] [--json out.json]

Without ``--model`` it writes sparsenets' built-in LM (``sparsenets.text.save_builtin_lm``) to a
temporary directory first; that trains it when this interpreter's cache has no copy yet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = ("sparsenets", "llmcompressor")
METHODS = ("sparsegpt", "wanda")
MIB = 1024  # ru_maxrss is in KiB on Linux


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB


# ---- one run, in its own process ------------------------------------------------------------------


def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001  a checkpoint without a tokenizer: the built-in byte-level one
        from sparsenets.text import byte_tokenizer

        tokenizer = byte_tokenizer()
    return model, tokenizer


def prune_sparsenets(model, tokenizer, method: str, batches: list, args) -> None:
    import sparsenets as sn

    config = {"criterion": method, "sparsity": args.sparsity, "pattern": args.pattern, "exclude": ["lm_head"]}
    sn.sparsify_(model, config, data=batches, masks=not args.zeros)
    sn.finalize_(model)


def prune_llmcompressor(model, tokenizer, method: str, batches: list, args) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader

    modifier = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[method]
    recipe = modifier(sparsity=args.sparsity, mask_structure="0:0" if args.pattern == "unstructured" else args.pattern,
                      targets=["Linear"], ignore=["re:.*lm_head"])  # "Linear" alone would take lm_head too
    # A DataLoader is used as it is (no tokenizing, shuffling or truncating): exactly our windows.
    # oneshot still wants a processor object whenever a dataset is given, and reads the model's
    # config.json again from model.config.name_or_path, so the model must come from a directory.
    oneshot(model=model, recipe=recipe, dataset=DataLoader(batches, batch_size=None), processor=tokenizer,
            num_calibration_samples=len(batches), max_seq_length=args.seq_len, pipeline="sequential")


def decoder_sparsity(model) -> tuple[float, bool]:
    """Share of zeros over the Linear weights outside lm_head, and whether every one is 2:4 along its input."""
    import torch

    zeros = total = 0
    nm = True
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            w = module.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
            nm = nm and w.shape[1] % 4 == 0 and bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
    return zeros / max(total, 1), nm


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
    from sparsenets.text import calibration_batches, corpus_text, encode, perplexity

    if args.tool == "llmcompressor":
        # its imports weigh ~100 MiB more than sparsenets': count them in "loaded", not in pruning
        import llmcompressor.entrypoints  # noqa: F401
        import llmcompressor.modifiers.pruning  # noqa: F401
    else:
        import sparsenets  # noqa: F401
    model, tokenizer = load(args.model)
    train = encode(corpus_text("train"), tokenizer)
    batches = calibration_batches(train, args.calibration, args.seq_len, seed=0)
    out = {"tool": args.tool, "method": args.method, "loaded_mib": peak_rss_mib()}
    if args.tool != "dense":
        start = time.perf_counter()
        (prune_sparsenets if args.tool == "sparsenets" else prune_llmcompressor)(model, tokenizer, args.method,
                                                                                  batches, args)
        out["seconds"] = time.perf_counter() - start
    out["peak_mib"] = peak_rss_mib()
    out["sparsity"], out["2:4"] = decoder_sparsity(model)
    if args.eval:
        test = encode(corpus_text("test"), tokenizer)
        out["ppl"] = perplexity(model, test, seq_len=args.seq_len, batch_size=8, max_windows=args.eval_windows)
    return out


# ---- the driver -----------------------------------------------------------------------------------


def run(args, tool: str, method: str, evaluate: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, method, "--model", args.model, "--sparsity", str(args.sparsity),
           "--pattern", args.pattern, "--calibration", str(args.calibration), "--seq-len", str(args.seq_len),
           "--threads", str(args.threads), "--eval-windows", str(args.eval_windows or 0)]
    cmd += ["--eval"] if evaluate else []
    cmd += ["--zeros"] if args.zeros else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.limit)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "method": method, "error": f"took over {args.limit:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"tool": tool, "method": method, "error": tail[:200]}
    return json.loads(lines[-1][len("RESULT "):])


def summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key in ("seconds", "peak_mib", "loaded_mib"):
        if key in out:
            out[key] = statistics.median(r[key] for r in ok)
    return out


def fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def table(results: dict, args) -> str:
    rows = ["| method | tool | perplexity | prune time (s) | peak RSS (MiB) | RSS over loaded (MiB) | sparsity | 2:4 |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    dense = results.get(("dense", "dense"))
    if dense and "error" not in dense:
        rows.append(f"| dense | – | {fmt(dense.get('ppl'))} | – | {dense['peak_mib']:.0f} | – | "
                    f"{dense['sparsity']:.3f} | – |")
    for method in args.methods:
        for tool in TOOLS:
            r = results[(tool, method)]
            if "error" in r:
                rows.append(f"| {method} | {tool} | failed: {r['error']} | | | | | |")
                continue
            nm = "yes" if r["2:4"] else "no"
            rows.append(f"| {method} | {tool} | {fmt(r.get('ppl'))} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | "
                        f"{r['peak_mib'] - r['loaded_mib']:.0f} | {r['sparsity']:.3f} | {nm} |")
    rows += ["", "| method | perplexity sn/lc | time sn/lc | peak RSS sn/lc | RSS over loaded sn/lc |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for method in args.methods:
        sn, lc = results[("sparsenets", method)], results[("llmcompressor", method)]
        if "error" in sn or "error" in lc:
            rows.append(f"| {method} | – | – | – | – |")
            continue

        def ratio(key, a=sn, b=lc):
            return fmt(a[key] / b[key] if a.get(key) and b.get(key) else None)

        extra = (sn["peak_mib"] - sn["loaded_mib"]) / max(lc["peak_mib"] - lc["loaded_mib"], 1)
        rows.append(f"| {method} | {ratio('ppl')} | {ratio('seconds')} | {ratio('peak_mib')} | {extra:.2f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Hugging Face checkpoint directory (default: sparsenets' built-in LM)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"])
    p.add_argument("--calibration", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    p.add_argument("--eval-windows", type=int, default=0, help="test windows for perplexity (0: all)")
    p.add_argument("--limit", type=float, default=3600, help="seconds before a run is given up")
    p.add_argument("--zeros", action="store_true", help="sparsenets: masks=False (zeros written, no masks kept)")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--eval", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.eval_windows = args.eval_windows or None
    if args.worker:
        args.tool, args.method = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.model is None:
        from sparsenets.text import save_builtin_lm

        args.model = str(save_builtin_lm(Path(tempfile.mkdtemp(prefix="builtin-lm-"))))
    runs: dict = {("dense", "dense"): [run(args, "dense", "dense", True)]}
    for repeat in range(args.repeats):
        for method in args.methods:
            for tool in TOOLS:
                r = run(args, tool, method, evaluate=repeat == 0)
                runs.setdefault((tool, method), []).append(r)
                print(f"# repeat {repeat} {method} {tool}: " + (r.get("error") or f"{r['seconds']:.1f} s, "
                      f"peak {r['peak_mib']:.0f} MiB, ppl {fmt(r.get('ppl'))}"), file=sys.stderr, flush=True)
    results = {key: summary(value) for key, value in runs.items()}
    print(f"model {args.model}, sparsity {args.sparsity}, {args.pattern}, {args.calibration} x {args.seq_len} "
          f"calibration tokens, {args.repeats} repeat(s)\n")
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": [r for value in runs.values() for r in value]}, indent=2))


if __name__ == "__main__":
    main()
