"""Peak memory and time of one forward+backward of the causal-LM loss: chunked vs standard.

    .venv/bin/python benchmarks/chunked_loss.py                  # the table in chunked_loss.md
    .venv/bin/python benchmarks/chunked_loss.py --repeats 1      # a quick look

Each measurement runs in a fresh subprocess, so that its peak resident memory (ru_maxrss) is its
own: the figure reported is that peak minus the peak before the loss ran (torch imported, hidden
states and head weight allocated), i.e. what the loss itself adds. The child runs the loss twice:
the first pass is the memory figure, the second (warm) pass is the time: wall clock, and the
process's CPU time (user + system, summed over its threads), which load from other work on a
shared machine inflates less. Variants are interleaved
(standard, chunked, standard, chunked, ...) and medians reported, so that load from other work on
the machine falls on both alike.

standard: logits = hidden @ W.T, then F.cross_entropy(logits.float(), reduction="sum"), as
transformers' loss does. chunked: launcher.train.chunked_loss.linear_cross_entropy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # name: (hidden, vocab, micro batch, sequence length)
    "smollm2-8x512": (576, 49152, 8, 512),
    "qwen2.5-0.5b-2x512": (896, 151936, 2, 512),
}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(variant: str, shape: str, trainable_head: bool, ignored: float, min_chunk: int | None) -> dict:
    import torch
    import torch.nn.functional as F

    from launcher.data.formats import IGNORE
    from launcher.train import chunked_loss
    from launcher.train.chunked_loss import linear_cross_entropy

    if min_chunk is not None:
        chunked_loss.MIN_CHUNK_TOKENS = min_chunk

    hidden_size, vocab, batch, seq = SHAPES[shape]
    torch.manual_seed(0)
    hidden = torch.randn(batch, seq, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size).mul_(0.02).requires_grad_(trainable_head)  # no temporary copy
    labels = torch.randint(0, vocab, (batch, seq))
    labels[torch.rand(batch, seq) < ignored] = IGNORE

    def loss_fn():
        if variant == "chunked":
            return linear_cross_entropy(hidden, weight, None, labels)
        logits = hidden @ weight.t()
        return F.cross_entropy(logits.float().view(-1, vocab), labels.view(-1), reduction="sum")

    def one_pass() -> tuple[float, float]:
        hidden.grad = weight.grad = None
        wall, cpu = time.perf_counter(), time.process_time()
        loss_fn().backward()
        return time.perf_counter() - wall, time.process_time() - cpu

    before = peak_mb()
    first = one_pass()
    extra = peak_mb() - before
    warm = one_pass()
    return {"variant": variant, "extra_mb": extra, "peak_mb": peak_mb(), "cold_s": first[0], "warm_s": warm[0],
            "warm_cpu_s": warm[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3, help="pairs of (standard, chunked) runs per case")
    parser.add_argument("--ignored", type=float, default=0.0, help="share of labels set to IGNORE (prompt tokens)")
    parser.add_argument("--min-chunk", type=int, help="override the chunk floor (1: the bare formula)")
    parser.add_argument("--heads", nargs="+", default=["frozen", "trainable"], choices=["frozen", "trainable"])
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "SHAPE", "TRAINABLE_HEAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, shape, trainable = args.child
        print(json.dumps(child(variant, shape, trainable == "1", args.ignored, args.min_chunk)))
        return

    print("| shape (hidden x vocab, tokens) | head | loss | extra peak RSS (MB) | wall s, fwd+bwd (each run) "
          "| CPU s, fwd+bwd |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes:
        hidden_size, vocab, batch, seq = SHAPES[shape]
        for trainable in ["1" if head == "trainable" else "0" for head in args.heads]:
            results = {"standard": [], "chunked": []}
            for _ in range(args.repeats):
                for variant in ("standard", "chunked"):
                    done = subprocess.run([sys.executable, __file__, "--child", variant, shape, trainable,
                                           "--ignored", str(args.ignored),
                                           *(["--min-chunk", str(args.min_chunk)] if args.min_chunk else [])],
                                          cwd=ROOT, capture_output=True, text=True, check=True)
                    results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            for variant, runs in results.items():
                extra = statistics.median(r["extra_mb"] for r in runs)
                warm = statistics.median(r["warm_s"] for r in runs)
                each = ", ".join(f"{r['warm_s']:.2f}" for r in runs)
                cpu = statistics.median(r["warm_cpu_s"] for r in runs)
                head = "trainable" if trainable == "1" else "frozen"
                print(f"| {shape} ({hidden_size} x {vocab}, {batch}x{seq}) | {head} | {variant} | {extra:,.0f} "
                      f"| {warm:.2f} ({each}) | {cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
