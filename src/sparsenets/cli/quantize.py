"""``sparsenets quantize``: a Hugging Face checkpoint directory in, a quantized one out.

The sibling of ``sparsenets prune``: the same calibration windows (the built-in corpus's train
split) and perplexity before and after (its test split). The output directory holds the
config, the tokenizer and the integer codes in a sparsenets checkpoint, which
:func:`sparsenets.integrations.huggingface.load_quantized` loads; ``--dequantize`` writes plain
float weights instead (the rounded values), for tools that only read ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import ConfigError
from .prune import _data, _load, _perplexity, add_calibration_arguments, check_calibration


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="quantize a Hugging Face language model's weights (RTN, GPTQ, mixed precision, + pruning)",
        description="Load a causal language model saved with save_pretrained, quantize its linear layers "
                    "(round-to-nearest, or GPTQ block by block on calibration windows of the built-in corpus, "
                    "optionally pruning in the same sweep), and write a directory with the integer codes. "
                    "Perplexity on the corpus's held-out split is printed before and after. Load the result "
                    "with sparsenets.integrations.huggingface.load_quantized(OUT).",
        epilog="examples:\n"
               "  sparsenets quantize ./llama --bits 4 --group-size 128 --out ./llama-int4\n"
               "  sparsenets quantize ./llama --method rtn --bits 8 --group-size channel --out ./llama-int8\n"
               "  sparsenets quantize ./llama --bits 4 --pattern 2:4 --out ./llama-2of4-int4   # joint\n"
               "  sparsenets quantize ./llama --average-bits 3 --bit-choices 2 3 4 8 --out ./llama-mixed\n"
               "  sparsenets quantize ./llama --bits 8 --group-size channel --activations int8 "
               "--outlier-threshold 6 --out ./llama-w8a8")
    parser.add_argument("model", type=Path, help="Hugging Face checkpoint directory (config.json, weights, tokenizer)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the quantized model to")
    parser.add_argument("--method", default="gptq", help="gptq (default; needs calibration) or rtn")
    parser.add_argument("--bits", type=int, default=4, help="bits per weight, 2..8 (default 4)")
    parser.add_argument("--group-size", default="128",
                        help="inputs sharing one scale (default 128), or 'channel' for one per output channel")
    parser.add_argument("--asymmetric", action="store_true", help="a grid with a zero point (default symmetric)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ: quantize inputs by decreasing Hessian diagonal")
    parser.add_argument("--average-bits", type=float, default=None,
                        help="mixed precision: bits per layer by Hessian-trace sensitivity (HAWQ), this many "
                             "bits per weight on average (overrides --bits)")
    parser.add_argument("--bit-choices", type=int, nargs="+", default=[2, 3, 4, 8],
                        help="bit widths mixed precision chooses from (default 2 3 4 8)")
    parser.add_argument("--sparsity", type=float, default=0.0, help="prune this fraction in the GPTQ sweep (default 0)")
    parser.add_argument("--pattern", default="unstructured",
                        help="pruning pattern: unstructured, N:M such as 2:4, block:RxC")
    parser.add_argument("--activations", choices=["int8"], default=None,
                        help="int8: dynamic int8 activations on the int8 kernels (needs --group-size channel)")
    parser.add_argument("--outlier-threshold", type=float, default=None,
                        help="with --activations int8: input columns above this magnitude stay in floating "
                             "point (LLM.int8(); 6.0 in the paper)")
    parser.add_argument("--dequantize", action="store_true",
                        help="write plain float weights (the rounded values) that from_pretrained loads")
    add_calibration_arguments(parser, left="in float")
    parser.set_defaults(func=_run)


def _config(args: argparse.Namespace):  # -> QuantConfig
    from ..quant import QuantConfig

    group = None if args.group_size == "channel" else _group_size(args.group_size)
    options = {"bits": args.bits, "symmetric": not args.asymmetric, "group_size": group, "method": args.method,
               "sparsity": args.sparsity, "pattern": args.pattern, "exclude": args.exclude,
               "act_order": args.act_order, "activations": args.activations,
               "outlier_threshold": args.outlier_threshold}
    if args.average_bits is not None:
        options.update(average_bits=args.average_bits, bit_choices=tuple(args.bit_choices))
    return QuantConfig(**options)


def _group_size(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--group-size must be a positive integer or 'channel', got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..integrations.huggingface import save_pretrained, save_quantized
    from ..quant import quantize_
    from ..report import report
    from ..targets import find_units

    config = _config(args)  # every option checked before the model loads
    check_calibration(args)
    if args.dequantize and config.activations is not None:
        raise ConfigError("--dequantize writes float weights: int8 activations need the quantized layers")
    model, tokenizer = _load(args.model)
    calibration, test = _data(tokenizer, args)
    if not args.no_eval:
        print(f"perplexity before: {_perplexity(model, test, args):.3f}")
    start = time.perf_counter()
    with tqdm(total=len(find_units(model, config.sparsity_config())), desc=f"quantizing ({config.method})",
              unit="layer") as bar:
        quantize_(model, config, data=calibration, on_layer=lambda name: bar.update(1))
    print(f"quantized in {time.perf_counter() - start:.1f} s")
    if not args.no_eval:
        print(f"perplexity after:  {_perplexity(model, test, args):.3f}")
    summary = report(model)
    print(f"weights: {summary.bytes / 2**20:.2f} MiB stored ({summary.density:.1%} of the weights kept)")
    if args.dequantize:
        save_pretrained(_dequantized(model), args.out)
    else:
        save_quantized(model, args.out, config)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")
    return 0


def _dequantized(model):  # -> nn.Module
    """The model with every quantized layer back in float, holding its rounded values."""
    from ..quant.layers import QuantizedLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.to_float())
    return model
