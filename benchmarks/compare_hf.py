"""Time tunefleet against the plain Hugging Face ways of running the same fine-tuning job.

    .venv/bin/python benchmarks/compare_hf.py --steps 20 --reps 3                        # CPU: the comparison
    .venv/bin/python benchmarks/compare_hf.py --steps 3 --reps 1 --label cpu-smoke       # does the harness work?
    .venv/bin/python benchmarks/compare_hf.py --gpu --steps 40 --reps 3                  # 1B Llama, bf16, seq 2048

Contenders, each a separate process, run in turn (A B C D A B C D ... for --reps rounds) on one
machine in one session:
  tunefleet        `tunefleet run recipe=lora_long train.max_steps=K ...`
  hf_trainer       transformers' Trainer + peft, defaults (benchmarks/contenders/hf_trainer.py)
  trl_sft          TRL's SFTTrainer + peft_config, defaults (benchmarks/contenders/trl_sft.py)
  accelerate_loop  accelerate + peft + AdamW + a plain loop (benchmarks/contenders/accelerate_loop.py)
The job is the same for all: the recipe's model, LoRA settings, batch split, learning rate and
schedule (warmup given in steps, so no one rounds differently), K optimizer steps, precision,
torch threads, and tunefleet's own tokens (input_ids and response-only labels) for every
contender. No eval runs during training; each evaluates the same rows once at the end.

Every contender process carries the same probe (benchmarks/probe/sitecustomize.py), so every
figure is measured the same way, by one instrument, from outside the code being timed; what
each figure means is in DEFINITIONS below (and in every results file). Medians over repetitions
and the ratios tunefleet / other go to benchmarks/results/compare_hf_LABEL.json and to the LABEL
block of benchmarks/throughput.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: the launcher package (recipe loading, no torch)

PROBE_DIR = BENCH / "probe"
CONTENDER_DIR = BENCH / "contenders"
CONTENDERS = ("tunefleet", "hf_trainer", "trl_sft", "accelerate_loop")
BASE = "tunefleet"
FLOOR = "accelerate_loop"  # the start-up floor tunefleet's overhead is measured against
# Words every contender's recipe gets: no evaluation, samples or checkpoints inside the timed steps.
QUIET_WORDS = ["eval.at_start=false", "eval.every_steps=null", "eval.sample_prompts=[]", "train.checkpoint_every=null"]
# The GPU comparison: a random-weight 1B Llama (benchmarks/contenders/common.py), bf16, rows up to 2048.
GPU_WORDS = ["model.dtype=bfloat16", "train.precision=bf16", "data.max_seq_len=2048", "train.micro_batch_size=8",
             "train.global_batch_size=32"]
# Dense bf16 peak in TFLOP/s (vendor data sheets), matched against the device name in this order
# (PCIe before the SXM default); --peak-tflops for any other GPU.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
DEFINITIONS = {
    "wall_s": "process start to exit: imports, loading, training, the final eval, saving",
    "start_to_first_step_s": "process start to the end of the first optimizer step",
    "first_step_s": "first training forward to the end of the first optimizer step",
    "tokens_per_s": "real tokens of steps 2..K / time from the end of step 1 to the end of step K; real tokens are "
                    "the positions of the training forwards that are not padding (attention-mask sum, or the "
                    "pad-only tail blocks of packed rows), prompt and response tokens alike; on a GPU this is "
                    "tokens/s/GPU (one GPU)",
    "padding_fraction": "1 - real tokens / positions computed (batch x sequence), over all K steps",
    "peak_rss_mb": "peak of the summed resident memory of the contender's process tree, sampled every 0.1 s",
    "peak_rss_process_mb": "peak resident memory of its largest single process, sampled likewise",
    "peak_pss_mb": "while the tree has several processes: peak of their summed proportional set size (shared "
                   "pages split among the processes sharing them), sampled every 1 s; null for one process",
    "eval_loss": "mean cross-entropy per predicted response token on the same eval rows, after step K",
    "peak_cuda_mb": "torch.cuda.max_memory_allocated of the training process, read at each optimizer step",
    "achieved_tflops": "tokens_per_s x training FLOPs per token (flops_per_token below)",
    "mfu": "achieved_tflops / the GPU's dense bf16 peak",
}
MEDIAN_KEYS = ("wall_s", "start_to_first_step_s", "first_step_s", "tokens_per_s", "padding_fraction",
               "peak_rss_mb", "peak_rss_process_mb", "peak_pss_mb", "eval_loss", "peak_cuda_mb", "mfu",
               "achieved_tflops")


class HarnessError(RuntimeError):
    """A run's records do not allow the figures to be computed (no steps, wrong step count...)."""


# ---------------------------------------------------------------------------- what the probe saw


def read_probe(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("probe-*.jsonl")):
        records.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return records


def summarize_probe(records: list[dict], t_spawn: float, expected_steps: int | None = None) -> dict:
    """The timing and token figures of one run from its probe records (all processes of the tree).

    Steps are matched by number across training processes (one per rank): a step ends when its
    last rank ends it, and its tokens are summed over ranks.
    """
    steps: dict[int, list[dict]] = {}
    for record in records:
        if record.get("event") == "step":
            steps.setdefault(record["step"], []).append(record)
    if not steps:
        raise HarnessError("the probe recorded no optimizer step (did the process import torch and train?)")
    numbers = sorted(steps)
    if numbers != list(range(1, len(numbers) + 1)):
        raise HarnessError(f"optimizer steps recorded out of sequence: {numbers}")
    if expected_steps is not None and len(numbers) != expected_steps:
        raise HarnessError(f"{len(numbers)} optimizer steps recorded, {expected_steps} expected")
    end = {n: max(r["t"] for r in rs) for n, rs in steps.items()}
    real = {n: sum(r["real"] for r in rs) for n, rs in steps.items()}
    positions = {n: sum(r["positions"] for r in rs) for n, rs in steps.items()}
    last = numbers[-1]
    first_forward = min((r["t"] for r in records if r.get("event") == "first_forward"), default=None)
    summary = {
        "steps": last,
        "start_to_first_step_s": end[1] - t_spawn,
        "first_step_s": end[1] - first_forward if first_forward is not None else None,
        "train_tokens": real[last],
        "positions": positions[last],
        "padding_fraction": 1.0 - real[last] / positions[last] if positions[last] else None,
        # Steps 2..K: the first step carries one-time costs (allocator, lazy init) reported above.
        "tokens_per_s": (real[last] - real[1]) / (end[last] - end[1]) if last > 1 else None,
        "tokens_exact": all(r["real_exact"] for rs in steps.values() for r in rs),
        "threads": sorted({r["threads"] for rs in steps.values() for r in rs}),
        "training_processes": len(steps[1]),
        "device": next((r["device"] for r in steps[1] if "device" in r), None),
    }
    cuda = [r["cuda_peak_mb"] for rs in steps.values() for r in rs if r.get("cuda_peak_mb") is not None]
    summary["peak_cuda_mb"] = max(cuda) if cuda else None
    return summary


# ---------------------------------------------------------------------------- FLOPs and MFU


def matmul_params(config: dict) -> int:
    """Weights a token meets in a matmul in a Llama-style decoder: every block's projections and the head."""
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    kv = config.get("num_key_value_heads") or heads
    attention = 2 * d * heads * head_dim + 2 * d * kv * head_dim  # q, o; k, v
    mlp = 3 * d * config["intermediate_size"]
    return layers * (attention + mlp) + config["vocab_size"] * d


def flops_per_token(config: dict, mean_seq_len: float, full_finetune: bool) -> float:
    """Training FLOPs per real token: m x (2 x matmul weights + 4 x layers x width x sequence length).

    The attention term (scores and weighted values, without the causal halving, as PaLM counts it)
    uses the mean real length of an example. m = 3 for full fine-tuning (forward, input and weight
    gradients); 2 when the base weights are frozen (forward and input gradients; the adapters'
    own FLOPs are negligible).
    """
    forward = 2 * matmul_params(config) + 4 * config["num_hidden_layers"] * config["hidden_size"] * mean_seq_len
    return (3 if full_finetune else 2) * forward


def peak_tflops_for(device: str | None, override: float | None) -> float | None:
    if override:
        return override
    for name, peak in PEAK_BF16_TFLOPS.items():
        if device and name in device:
            return peak
    return None


# ---------------------------------------------------------------------------- running one contender


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages split among the processes that map them (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    except OSError:
        return 0


def run_process(argv: list[str], env: dict, log_path: Path, poll_s: float = 0.1, pss_every_s: float = 1.0) -> dict:
    """Run `argv` to its end: wall time, exit status, and memory of its process tree.

    RSS is summed over the tree every `poll_s`. A summed RSS counts pages that processes share
    (a forked data-loader worker maps its parent's model) once per process, so while the tree has
    several processes their proportional share (PSS) is summed too, every `pss_every_s` only:
    reading it costs the kernel tens of milliseconds per process.
    """
    import psutil

    with log_path.open("w") as log:
        t_spawn = time.time()
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        peak = {"rss": 0, "process": 0, "pss_kb": 0, "processes": 1}
        done = threading.Event()

        def watch():
            root, last_pss = psutil.Process(proc.pid), 0.0
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                except psutil.Error:
                    break
                sizes = []
                for member in tree:
                    try:
                        sizes.append(member.memory_info().rss)
                    except psutil.Error:
                        pass
                peak["rss"] = max(peak["rss"], sum(sizes))
                peak["process"] = max([peak["process"], *sizes])
                peak["processes"] = max(peak["processes"], len(tree))
                if len(tree) > 1 and time.monotonic() - last_pss >= pss_every_s:
                    last_pss = time.monotonic()
                    peak["pss_kb"] = max(peak["pss_kb"], sum(_pss_kb(member.pid) for member in tree))
                done.wait(poll_s)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # Not wait4's ru_maxrss: exec carries the forking process's peak into it, so it would read at least
        # the harness's own size (or a test runner's).
        proc.wait()
        t_exit = time.time()
        done.set()
        watcher.join()
    return {"t_spawn": t_spawn, "wall_s": t_exit - t_spawn, "returncode": proc.returncode,
            "peak_rss_mb": peak["rss"] / 2**20, "peak_rss_process_mb": peak["process"] / 2**20,
            "peak_pss_mb": peak["pss_kb"] / 1024 if peak["pss_kb"] else None, "max_processes": peak["processes"]}


def log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------- the job


def job_words(args, recipe_loader) -> list[str]:
    """The override words every contender's recipe gets (tunefleet adds only its output.dir)."""
    words = [f"train.max_steps={args.steps}", *QUIET_WORDS]
    words.append("train.precision=bf16" if args.gpu else "train.precision=fp32")
    if args.gpu:
        words += [f"model.name={args.gpu_model}", *GPU_WORDS]
    words += args.set
    if not any(w.startswith("train.warmup_steps=") for w in words):
        # tunefleet rounds warmup_ratio x steps, transformers rounds up: give every contender the same integer.
        recipe = recipe_loader([f"recipe={args.recipe}", *words])[1]
        words.append(f"train.warmup_steps={round(recipe.train.warmup_ratio * args.steps)}")
    return words


def contender_argv(name: str, args, words: list[str], run_dir: Path, job_file: Path, result_file: Path) -> list[str]:
    if name == "tunefleet":
        return [*args.tunefleet, "run", f"recipe={args.recipe}", *words, f"output.dir={run_dir / 'run'}"]
    python = args.trl_python if name == "trl_sft" else sys.executable
    return [python, str(CONTENDER_DIR / f"{name}.py"), str(job_file), str(result_file)]


def contender_env(args, probe_dir: Path | None) -> dict:
    env = dict(os.environ)
    threads = str(args.threads)
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    paths = [str(PROBE_DIR), str(ROOT)] if probe_dir else [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("BENCH_PROBE_DIR", None)
    if probe_dir:
        env["BENCH_PROBE_DIR"] = str(probe_dir)
    return env


def unavailable(name: str, args) -> str | None:
    """Why a contender cannot run here, or None."""
    if name == "trl_sft":
        found = subprocess.run([args.trl_python, "-c", "import trl"], capture_output=True, text=True,
                               env=contender_env(args, None), check=False)
        if found.returncode != 0:
            return (f"trl is not importable by {args.trl_python}; install it with "
                    "`pip install -c requirements/cpu.txt -r benchmarks/requirements.txt`")
    return None


# ---------------------------------------------------------------------------- one run's figures


def collect_run(name: str, raw: dict, probe: list[dict], run_dir: Path, result_file: Path, steps: int) -> dict:
    row = {"contender": name, "notes": [],
           **{k: raw[k] for k in ("wall_s", "peak_rss_mb", "peak_rss_process_mb", "peak_pss_mb", "max_processes",
                                  "returncode")}}
    row.update(summarize_probe(probe, raw["t_spawn"], expected_steps=steps))
    if name == "tunefleet":
        metrics = json.loads((run_dir / "run" / "metrics.json").read_text())
        row["eval_loss"] = (metrics.get("eval_final") or {}).get("eval_loss")
        row["trainable_params"], row["total_params"] = metrics.get("trainable_params"), metrics.get("total_params")
        # What tunefleet says of itself, for comparison only: its own definitions may differ (e.g. step 1 included).
        row["self_reported"] = {k: metrics[k] for k in ("tokens_per_s", "padding", "mfu", "peak_memory_mb")
                                if metrics.get(k) is not None}
        reported = row["self_reported"].get("padding")
        if not row["tokens_exact"] and reported is not None:
            keep = 1.0 - reported
            row["train_tokens"] = round(row["positions"] * keep)
            row["tokens_per_s"] = row["tokens_per_s"] * keep if row["tokens_per_s"] else None
            row["padding_fraction"] = reported
            row["notes"].append("the probe could not tell padding from tokens in tunefleet's batches: real tokens "
                                f"are its positions x (1 - tunefleet's own padding figure {reported:.4f})")
        elif reported is not None and row["padding_fraction"] is not None and \
                abs(reported - row["padding_fraction"]) > 0.005:
            row["notes"].append(f"tunefleet reports padding {reported:.4f}, the probe measured "
                                f"{row['padding_fraction']:.4f}")
    else:
        result = json.loads(result_file.read_text())
        row.update({k: result.get(k) for k in ("eval_loss", "optimizer", "trainable_params", "total_params")})
    if not row["tokens_exact"] and not row["notes"]:
        row["notes"].append("the probe could not tell padding from tokens: every position counted as a token")
    return row


def add_flops(row: dict, model_config: dict | None, examples: int, full_finetune: bool,
              peak_override: float | None) -> None:
    if model_config is None or not row.get("tokens_per_s"):
        return
    mean_len = row["train_tokens"] / examples
    achieved = row["tokens_per_s"] * flops_per_token(model_config, mean_len, full_finetune)
    row["achieved_tflops"] = achieved / 1e12
    peak = peak_tflops_for(row.get("device"), peak_override)
    row["mfu"] = achieved / (peak * 1e12) if peak and row.get("device") != "cpu" else None


# ---------------------------------------------------------------------------- medians, ratios, report


def medians(runs: list[dict]) -> dict[str, dict]:
    """Per contender, the median of each figure over its successful repetitions."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["contender"] for r in runs):
        ok = [r for r in runs if r["contender"] == name and not r.get("failed")]
        figures = {"repetitions": len(ok)}
        for key in MEDIAN_KEYS:
            values = [r[key] for r in ok if r.get(key) is not None]
            figures[key] = statistics.median(values) if values else None
        out[name] = figures
    return out


def ratios(summary: dict[str, dict], base: str = BASE) -> dict[str, dict]:
    """tunefleet / other for each figure both have (time and memory: lower is better; tokens/s: higher)."""
    if base not in summary:
        return {}
    ours = summary[base]
    out = {}
    for name, theirs in summary.items():
        if name == base:
            continue
        out[name] = {k: ours[k] / theirs[k] for k in MEDIAN_KEYS
                     if ours.get(k) is not None and theirs.get(k) not in (None, 0)}
    return out


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def render_markdown(result: dict) -> str:
    summary, ratio = result["summary"], result["ratios"]
    gpu = result["mode"] == "gpu"
    job, machine = result["job"], result["machine"]
    lines = [
        f"Measured {result['date']} by `benchmarks/compare_hf.py` (figures: `{result['results_file']}`).",
        "",
        f"    {result['command']}",
        "",
        (f"- Machine: {machine['cpu']} ({machine['cores']} cores, {machine['memory_gb']} GB)"
         + (f", {machine['gpu']}" if machine.get("gpu") else "") + f"; {machine['os']}"),
        f"- Software: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        (f"- Job: recipe `{job['recipe']}`, {job['steps']} optimizer steps of {job['global_batch_size']} examples "
         f"(micro batch {job['micro_batch_size']} x accumulation {job['accumulation']}), max_seq_len "
         f"{job['max_seq_len']}, {job['precision']}, {job['threads']} torch threads, {job['eval_examples']} eval "
         f"rows; {job['repetitions']} repetition(s), order {' '.join(job['order'])} per round; medians shown"),
        "",
    ]
    header = ["contender", "wall s", "start to 1st step s", "tokens/s" + ("/GPU" if gpu else ""), "padding",
              "peak RSS MB (tree)", "peak PSS MB (tree)", "eval loss"]
    if gpu:
        header += ["peak CUDA MB", "MFU"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, s in summary.items():
        cells = [f"`{name}`", _fmt(s["wall_s"], 1), _fmt(s["start_to_first_step_s"], 1), _fmt(s["tokens_per_s"], 0),
                 f"{100 * s['padding_fraction']:.1f}%" if s["padding_fraction"] is not None else "-",
                 _fmt(s["peak_rss_mb"], 0), _fmt(s["peak_pss_mb"], 0), _fmt(s["eval_loss"], 4)]
        if gpu:
            cells += [_fmt(s["peak_cuda_mb"], 0), f"{100 * s['mfu']:.1f}%" if s.get("mfu") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if ratio:
        keys = ["wall_s", "start_to_first_step_s", "tokens_per_s", "peak_rss_mb"] + (["peak_cuda_mb"] if gpu else [])
        lines += ["", "tunefleet / other (time and memory: below 1 is better for tunefleet; tokens/s: above 1):", "",
                  "| other | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
        for name, r in ratio.items():
            lines.append(f"| `{name}` | " + " | ".join(_fmt(r.get(k), 2) for k in keys) + " |")
    overhead = result.get("startup_overhead")
    if overhead:
        lines += ["", (f"Start-up overhead: tunefleet reaches the end of its first step {overhead['seconds']:+.1f} s "
                       f"after the minimal accelerate loop ({overhead['ratio']:.2f}x its start-to-first-step time).")]
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def replace_block(text: str, label: str, block: str) -> str:
    """Put `block` between this label's markers in `text` (appended at the end if they are missing)."""
    begin, end = f"<!-- compare_hf:{label}:begin -->", f"<!-- compare_hf:{label}:end -->"
    wrapped = f"{begin}\n{block}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + wrapped + rest.split(end, 1)[1]
    return text.rstrip("\n") + f"\n\n### compare_hf: {label}\n\n{wrapped}\n"


# ---------------------------------------------------------------------------- machine and versions


def machine_info() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for package in ("torch", "transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                            check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "launcher"], capture_output=True, text=True,
                           cwd=ROOT, check=False)
    if commit.returncode == 0:
        out["tunefleet"] = commit.stdout.strip() + (" (launcher/ modified)" if dirty.stdout.strip() else "")
    return out


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="lora_long", help="the job (default lora_long)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (at least 2)")
    parser.add_argument("--reps", type=int, default=3, help="rounds over all contenders")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every contender")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma list, run in this order each round")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every contender (repeatable), e.g. --set train.micro_batch_size=8")
    parser.add_argument("--label", help="names the results file and the throughput.md block (default cpu or gpu)")
    parser.add_argument("--results-dir", type=Path, default=BENCH / "results")
    parser.add_argument("--markdown", type=Path, default=BENCH / "throughput.md")
    parser.add_argument("--work-dir", type=Path, help="run folders, logs, probe records (default under "
                        "$TUNEFLEET_CACHE/bench)")
    parser.add_argument("--trl-python", default=sys.executable, help="the Python that runs TRL (a separate venv)")
    parser.add_argument("--tunefleet", default=None, help="the tunefleet command (default: next to this Python)")
    parser.add_argument("--gpu", action="store_true", help="the 1B Llama comparison in bf16 on one GPU")
    parser.add_argument("--gpu-model", default=None, help="its model folder (built once if missing)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (known: H100, H200, A100)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: tokens/s is measured from the end of step 1 to the end of step K")
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    args.label = args.label or ("gpu" if args.gpu else "cpu")
    cache = Path(os.environ.get("TUNEFLEET_CACHE", Path.home() / ".cache" / "tunefleet"))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.work_dir = (args.work_dir or cache / "bench" / f"compare_hf-{args.label}-{stamp}").resolve()
    args.gpu_model = args.gpu_model or str(cache / "bench" / "llama-1b-random")
    script = Path(sys.executable).parent / "tunefleet"
    args.tunefleet = shlex.split(args.tunefleet) if args.tunefleet else (
        [str(script)] if script.exists() else [sys.executable, "-m", "launcher.cli"])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from launcher.config.load import load_recipe
    from launcher.preflight import preflight

    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    command = shlex.join([python, "benchmarks/compare_hf.py", *(argv if argv is not None else sys.argv[1:])])
    args.work_dir.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(f"[compare_hf] {message}", flush=True)

    say(f"work folder {args.work_dir}")
    quiet_env = contender_env(args, None)
    if args.gpu:
        check = subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"],
                               env=quiet_env, capture_output=True, check=False)
        if check.returncode != 0:
            print("error: --gpu needs a CUDA device visible to torch", file=sys.stderr)
            return 2
    if args.gpu and not (Path(args.gpu_model) / "config.json").is_file():
        say(f"building the random-weight 1B Llama in {args.gpu_model}")
        subprocess.run([sys.executable, str(CONTENDER_DIR / "common.py"), "build-llama-1b", args.gpu_model],
                       env=quiet_env, check=True, cwd=ROOT)

    words = job_words(args, load_recipe)
    name, recipe = load_recipe([f"recipe={args.recipe}", *words])  # any mistake ends here, before a model loads
    preflight(recipe, name)
    t = recipe.train
    job = {"recipe": args.recipe, "overrides": words, "threads": args.threads, "precision": t.precision}
    (args.work_dir / "job.json").write_text(json.dumps({**job, "work_dir": str(args.work_dir)}, indent=1))
    say("warming the caches (model conversion, tokenized data): not timed")
    subprocess.run([sys.executable, str(CONTENDER_DIR / "common.py"), "warm", str(args.work_dir / "job.json")],
                   env=quiet_env, check=True, cwd=ROOT)
    warm = json.loads((args.work_dir / "warm.json").read_text())
    model_config = json.loads((Path(warm["model_path"]) / "config.json").read_text())

    notes: list[str] = []
    if not warm["tunefleet_rows_identical"]:
        notes.append("tunefleet's prepared rows differ from the baselines' (packing at preparation time?): "
                     "the baselines were given unpacked rows")
    skipped = {}
    for contender in args.contenders:
        reason = unavailable(contender, args)
        if reason:
            skipped[contender] = reason
            notes.append(f"{contender} skipped: {reason}")
    order = [c for c in args.contenders if c not in skipped]

    runs: list[dict] = []
    for rep in range(1, args.reps + 1):
        for contender in order:
            run_dir = args.work_dir / f"rep{rep}-{contender}"
            probe_dir = run_dir / "probe"
            probe_dir.mkdir(parents=True)
            job_file, result_file = run_dir / "job.json", run_dir / "result.json"
            job_file.write_text(json.dumps({**job, "work_dir": str(run_dir)}, indent=1))
            argv_c = contender_argv(contender, args, words, run_dir, job_file, result_file)
            say(f"round {rep}/{args.reps}: {contender}")
            raw = run_process(argv_c, contender_env(args, probe_dir), run_dir / "log.txt")
            try:
                if raw["returncode"] != 0:
                    raise HarnessError(f"exit status {raw['returncode']}")
                row = collect_run(contender, raw, read_probe(probe_dir), run_dir, result_file, t.max_steps)
                add_flops(row, model_config, t.max_steps * t.global_batch_size, recipe.peft.method == "full",
                          args.peak_tflops)
            except (HarnessError, OSError, KeyError, ValueError) as err:
                row = {"contender": contender, "failed": True, "error": str(err), "wall_s": raw["wall_s"],
                       "returncode": raw["returncode"], "log_tail": log_tail(run_dir / "log.txt")}
                notes.append(f"{contender}, round {rep}: failed ({err}); log {run_dir / 'log.txt'}")
                say(f"{contender} failed: {err}\n{row['log_tail']}")
            row["repetition"], row["argv"] = rep, shlex.join(argv_c)
            notes += [f"{contender}, round {rep}: {note}" for note in row.get("notes", [])]
            runs.append(row)
            if not row.get("failed"):
                say(f"{contender}: wall {row['wall_s']:.1f} s, first step at {row['start_to_first_step_s']:.1f} s, "
                    f"{row['tokens_per_s'] or 0:.0f} tokens/s, padding {100 * (row['padding_fraction'] or 0):.1f}%, "
                    f"peak RSS {row['peak_rss_mb']:.0f} MB, eval loss {row['eval_loss']}")

    threads = {tuple(r["threads"]) for r in runs if not r.get("failed")}
    if len(threads) > 1:
        notes.append(f"contenders ran with different torch thread counts: {sorted(threads)}")
    summary = medians(runs)
    out = args.results_dir / f"compare_hf_{args.label}.json"
    result = {
        "benchmark": "compare_hf", "label": args.label, "mode": "gpu" if args.gpu else "cpu",
        "date": datetime.date.today().isoformat(), "command": command,
        "results_file": os.path.relpath(out, ROOT),
        "machine": {**machine_info(), **({"gpu": next((r.get("device") for r in runs if r.get("device")), None)}
                                          if args.gpu else {})},
        "versions": versions(),
        "job": {"recipe": args.recipe, "overrides": words, "steps": t.max_steps,
                "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
                "accumulation": recipe.gradient_accumulation_steps, "max_seq_len": recipe.data.max_seq_len,
                "precision": t.precision, "threads": args.threads, "eval_examples": warm["eval_examples"],
                "train_examples": warm["train_examples"], "repetitions": args.reps, "order": order},
        "definitions": DEFINITIONS,
        "skipped": skipped, "notes": notes, "runs": runs, "summary": summary, "ratios": ratios(summary),
        "work_dir": str(args.work_dir),
    }
    if BASE in summary and FLOOR in summary and summary[BASE]["start_to_first_step_s"] and \
            summary[FLOOR]["start_to_first_step_s"]:
        ours, floor = summary[BASE]["start_to_first_step_s"], summary[FLOOR]["start_to_first_step_s"]
        result["startup_overhead"] = {"seconds": ours - floor, "ratio": ours / floor}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    markdown = render_markdown(result)
    existing = args.markdown.read_text() if args.markdown.exists() else "# Throughput\n"
    args.markdown.write_text(replace_block(existing, args.label, markdown))
    say(f"results: {out}; table: {args.markdown} (block {args.label})")
    print(markdown)
    return 1 if any(r.get("failed") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
