"""Peak memory and time per block of layer-by-layer pruning on a ~1B-parameter Llama.

The model has TinyLlama-1.1B's shape with random weights (memory and time don't depend on the
values) and calibration windows are random tokens. RSS is sampled every 20 ms while
``sparsify_`` runs, and compared with the model's own fp32 size.

    .venv/bin/python bench/llm_memory.py                       # SparseGPT 50%, 128 x 512 tokens
    .venv/bin/python bench/llm_memory.py --criterion wanda --layers 4
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time

import torch

import sparsenets as sn


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = rss(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, rss())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criterion", default="sparsegpt")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--layers", type=int, default=22, help="decoder blocks (22: TinyLlama-1.1B)")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, config.vocab_size, (1, args.seq_len), generator=g)}
            for _ in range(args.calibration)]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand construction's scratch memory back first
    before = rss()
    times: list[float] = []
    monitor = PeakRSS()
    monitor.start()
    start = time.perf_counter()
    sn.sparsify_(model, {"criterion": args.criterion, "pattern": args.pattern, "sparsity": None,
                         "exclude": ["lm_head"]}, data=data, masks=False,
                 on_block=lambda stack, index, seconds: (
                     times.append(seconds),
                     print(f"block {index}: {seconds:.1f} s, peak RSS so far {monitor.peak / model_bytes:.3f}x "
                           f"the model", flush=True)))
    total = time.perf_counter() - start
    peak = monitor.stop()
    gib = 2.0**30
    print(f"\nmodel: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
          f"{model_bytes / gib:.2f} GiB in fp32; {args.calibration} x {args.seq_len} calibration tokens; "
          f"{args.criterion} {args.pattern}; {torch.get_num_threads()} threads")
    print(f"RSS before pruning: {before / gib:.2f} GiB ({before / model_bytes:.2f}x the model)")
    print(f"peak RSS while pruning: {peak / gib:.2f} GiB ({peak / model_bytes:.2f}x the model, "
          f"+{(peak - before) / gib:.2f} GiB)")
    print(f"time: {total:.0f} s, {sum(times) / len(times):.1f} s per block (median "
          f"{sorted(times)[len(times) // 2]:.1f} s)")


if __name__ == "__main__":
    main()
