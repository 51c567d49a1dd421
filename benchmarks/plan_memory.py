"""How close `tunefleet plan`'s memory estimate is: every shipped recipe's real peak on CPU, what a
forward keeps for backward, and DeepSpeed's own estimators.

    # one recipe at a time (each a real run of a few steps; results/plan-memory-cpu.json keeps them all)
    flock /tmp/tunefleet-cpu.lock .venv/bin/python benchmarks/plan_memory.py measure lora
    flock /tmp/tunefleet-cpu.lock .venv/bin/python benchmarks/plan_memory.py activations  # plan-activations-cpu.json
    .venv/bin/python benchmarks/plan_memory.py report > benchmarks/plan_memory.md  # the tables, estimates recomputed

What is measured, per recipe (`measure`): the recipe as shipped, with its real model, trained for 3
optimizer steps the way `tunefleet run` starts it (one process in this one, several through
accelerate), on rows long enough that every micro batch holds max_seq_len tokens per row: the case
the plan sizes. Evaluation, samples and checkpoints are off; the run stops after its last measured
step. A probe (this file, run as the training script) records in every process:
- the peak of the bytes held in live tensors: torch's allocator (counting every thread's allocations
  and frees), followed with the profiler's memory events from just before the model loads (the
  loading window ends when the run is built: sharded, filled, teacher loaded; each step is its own
  window), plus the tensors that the allocator never saw because they are a memory-mapped
  safetensors file (a float32 checkpoint loaded in float32). This is what the planner estimates (its
  parts, less the fixed "overhead" line), and the error column;
- in a second run without the profiler, the peak resident memory (VmHWM, reset when the model starts
  loading and after loading) above the resident memory just before the model loads, with the launcher's
  1 MiB glibc mmap threshold. It adds the allocator's slack to the tensors (glibc keeps freed blocks
  under the threshold for reuse rather than returning them) and the pages of a memory-mapped
  checkpoint while it is read (QLoRA quantizes from the float32 file).
The planner's fixed CPU overhead (the Python and torch runtime) is compared with the resident memory
before the model loads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "plan-memory-cpu.json"
ACTIVATIONS = ROOT / "benchmarks" / "results" / "plan-activations-cpu.json"
PROBE_ENV = "PLAN_MEMORY_PROBE"  # set in the training processes: the folder their records go to
STEPS = 3
MiB = 2**20
SHIPPED = ("lora", "qlora", "full", "full_fsdp", "lora_zero3", "classify_lora", "classify_head", "dora", "ia3",
           "prompt_tuning", "prefix_tuning", "partial_freeze", "lora_long", "distill_classify", "distill_lm")
QUIET = ["eval.at_start=false", "eval.every_steps=null", "eval.early_stopping_patience=null", "eval.sample_prompts=[]",
         "train.checkpoint_every=null", "data.max_eval_samples=16", "output.trackers=[]"]


# ---------------------------------------------------------------------------- the probe (in each training process)


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text)[1]) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)


def _mapped_files() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped safetensors files."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _mapped_tensor_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of `modules` whose storage is a mapped file, not the allocator's."""
    ranges = _mapped_files()
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            storage = local.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in seen or not any(a <= ptr < b for a, b in ranges):
                continue
            seen.add(ptr)
            total += storage.nbytes()
    return total


def probe(argv: list[str]) -> int:
    """Run the training script with its memory followed; write RANK's record, stop after the last step."""
    from torch.profiler import ProfilerActivity, profile

    import launcher.train.build as build
    import launcher.train.loop as loop

    profiled = os.environ.get("PLAN_MEMORY_MODE") == "tensors"
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ[PROBE_ENV]) / f"{os.environ['PLAN_MEMORY_MODE']}-rank{rank}.json"
    record: dict = {"rank": rank, "steps": [], "marks": {}}
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if profiled else None
    build_model, build_run, train_step = build.build_model, build.build_run, loop.train_step

    def measured_build_model(*args, **kwargs):
        if "before_load" not in record:
            record["before_load"] = _status()
            _reset_peak_rss()
            record["marks"]["load"] = time.time_ns()
            if profiler:
                _count_every_thread()
                profiler.start()
        model = build_model(*args, **kwargs)
        record["mapped_after_build"] = max(record.get("mapped_after_build", 0), _mapped_tensor_bytes(model))
        return model

    def measured_build_run(*args, **kwargs):
        run = build_run(*args, **kwargs)
        record["loaded"] = _status()
        record["mapped_after_load"] = _mapped_tensor_bytes(run.model, getattr(run.teacher, "model", None))
        record["marks"]["loaded"] = time.time_ns()
        _reset_peak_rss()
        return run

    def measured_train_step(run, step, fed):
        result = train_step(run, step, fed)
        record["steps"].append(_status())
        record["marks"][f"step{step}"] = time.time_ns()
        _reset_peak_rss()
        if step >= int(os.environ.get("PLAN_MEMORY_STEPS", STEPS)):
            if profiler:
                profiler.stop()
                record["tensor_windows"] = _tensor_windows(profiler, record["marks"])
            out.write_text(json.dumps(record))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # the figures are taken: no final evaluation or save
        return result

    build.build_model, build.build_run, loop.train_step = measured_build_model, measured_build_run, measured_train_step
    if os.environ.get("WORLD_SIZE"):  # started by accelerate: what launcher/run.py does
        from launcher.run import main

        return main(argv)
    from launcher.cli import main  # one process: `tunefleet run` trains in its own process

    return main(["run", *argv])


def _count_every_thread() -> None:
    """Make torch's CPU allocator count what every thread allocates and frees (c10's
    caffe2_report_cpu_memory_usage flag): the profiler follows only the threads it runs on, and a tensor
    it saw allocated but another thread freed (gloo's and DeepSpeed's do) would stay counted forever.
    The profiler's events then carry the process's true running total."""
    import ctypes

    import torch

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True


def _print_live_at_peak(nodes, marks: dict[str, int]) -> None:
    """PLAN_MEMORY_WHERE=1: the tensors alive at the last step's peak, by the operations that allocated them
    (how the ZeRO-3 linear's kept inputs were found). Frees made on other threads are not seen here."""
    from collections import Counter

    last = sorted(marks.values())[-2]
    late = [n for n in nodes if n.start_time_ns >= last]
    peak_time = max(late, key=lambda n: n.extra_fields.total_allocated).start_time_ns
    live = {}
    for node in sorted(nodes, key=lambda n: n.start_time_ns):
        if node.start_time_ns > peak_time:
            break
        if node.extra_fields.alloc_size > 0:
            chain, parent = [], node.parent
            while parent is not None and len(chain) < 3:
                chain.append(parent.name)
                parent = parent.parent
            live[node.extra_fields.ptr] = (node.extra_fields.alloc_size, " < ".join(chain))
        else:
            live.pop(node.extra_fields.ptr, None)
    by_op = Counter()
    for size, chain in live.values():
        by_op[chain] += size
    for chain, size in by_op.most_common(30):
        print(f"LIVE {size / MiB:8.1f} MiB {chain}", file=sys.stderr)


def _tensor_windows(profiler, marks: dict[str, int]) -> dict[str, int]:
    """Peak bytes the allocator held, since the model began loading, within each window between marks."""
    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = [n for n in walk(profiler.profiler.kineto_results.experimental_event_tree())
             if type(n.extra_fields).__name__.endswith("Allocation")]
    events = sorted((n.start_time_ns, n.extra_fields.total_allocated) for n in nodes)
    if os.environ.get("PLAN_MEMORY_WHERE"):
        _print_live_at_peak(nodes, marks)
    order = sorted(marks.items(), key=lambda kv: kv[1])
    windows: dict[str, int] = {}
    level = 0
    for (name, start), (next_name, end) in zip(order, order[1:]):
        inside = [total for t, total in events if start <= t < end]
        windows[next_name] = max([level, *inside])  # the level at the window's start counts too
        before = [total for t, total in events if t < end]
        level = before[-1] if before else 0
    return windows


# ---------------------------------------------------------------------------- the runs


def long_rows(max_seq_len: int, count: int, classification: bool) -> list[dict]:
    """Rows that fill max_seq_len tokens after truncation: WordNet glosses strung together (classification,
    every label in turn) or Shakespeare scenes as the answer of an instruction (the rest)."""
    rows = []
    if classification:
        source = [json.loads(line) for line in (ROOT / "data/wordnet/pos_train.jsonl").read_text().splitlines()]
        labels = sorted({r["label"] for r in source})
        texts = {label: [r["text"] for r in source if r["label"] == label] for label in labels}
        for i in range(count):
            label, text, j = labels[i % len(labels)], "", i
            while len(text) < 8 * max_seq_len:
                text += texts[label][j % len(texts[label])] + "; "
                j += 1
            rows.append({"text": text, "label": label})
        return rows
    source = [json.loads(line) for line in (ROOT / "data/shakespeare/train.jsonl").read_text().splitlines()]
    j = 0
    for _ in range(count):
        text = ""
        while len(text) < 8 * max_seq_len:
            text += source[j % len(source)]["input"] + "\n" + source[j % len(source)]["output"] + "\n"
            j += 1
        rows.append({"instruction": "Continue this scene.", "input": "", "output": text})
    return rows


def recipe_words(name: str, work: Path) -> list[str]:
    from launcher.config.load import load_recipe
    from launcher.distributed.rendezvous import free_port

    _, recipe = load_recipe([f"recipe={name}"])
    classification = recipe.model.task == "classification"
    labels = set()
    for split, count in (("train", 64), ("eval", 16)):
        with open(work / f"{split}.jsonl", "w") as f:
            for row in long_rows(recipe.data.max_seq_len, count, classification):
                f.write(json.dumps(row) + "\n")
                labels.add(row.get("label"))
    # The labels named, so that the plan recomputed later (when these files are gone) sizes the same head.
    kind = [f"data.labels=[{','.join(sorted(labels))}]"] if classification else ["data.format=alpaca"]
    return [f"recipe={name}", f"data.train={work}/train.jsonl", f"data.eval={work}/eval.jsonl", *kind,
            f"train.max_steps={STEPS}", *QUIET, f"distributed.main_process_port={free_port()}"]


def launch(words: list[str], work: Path, mode: str) -> list[dict]:
    """Start the run as `tunefleet run` would, with this file as the training script; the records of its ranks."""
    from launcher.config.load import load_recipe
    from launcher.launch import RUN_SCRIPT, accelerate_command

    _, recipe = load_recipe(words)
    out = work / mode
    out.mkdir()
    words = [*words, f"output.dir={out}/run"]
    if recipe.distributed.world_size > 1:
        argv, env = accelerate_command(recipe, words, has_gpu=False, environ=os.environ)
        argv[argv.index(str(RUN_SCRIPT))] = str(Path(__file__).resolve())
    else:
        from launcher.launch import CPU_MMAP_THRESHOLD

        # `tunefleet run` with one process trains in its own process, where glibc's threshold is whatever the
        # shell gave: the launcher's setting (what its multi-process runs get) is given here too, so that the
        # resident figures of all recipes share one allocator behaviour.
        argv, env = [sys.executable, str(Path(__file__).resolve()), *words], {
            "MALLOC_MMAP_THRESHOLD_": str(CPU_MMAP_THRESHOLD)}
    env = {**os.environ, **env, PROBE_ENV: str(out), "PLAN_MEMORY_MODE": mode, "PLAN_MEMORY_STEPS": str(STEPS)}
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    records = [json.loads(f.read_text()) for f in sorted(out.glob(f"{mode}-rank*.json"))]
    if done.returncode != 0 or len(records) != recipe.distributed.world_size:
        raise SystemExit(f"{' '.join(words)}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return records


def measure(name: str) -> dict:
    import torch

    work = Path(tempfile.mkdtemp(prefix=f"plan-memory-{name}-"))
    words = recipe_words(name, work)
    tensors = launch(words, work, "tensors")
    resident = launch(words, work, "resident")
    ranks = []
    for t, r in zip(tensors, resident):
        windows = t["tensor_windows"]
        base = r["before_load"]["VmRSS"]
        ranks.append({
            "rank": t["rank"],
            # Mapped weights: the whole model on FSDP2's rank 0 until sharded; a teacher loaded last.
            "tensors_loading": windows["loaded"] + max(t["mapped_after_build"], t["mapped_after_load"]),
            "tensors_steps": [windows[f"step{i}"] + t["mapped_after_load"] for i in range(1, STEPS + 1)],
            "mapped_weights": t["mapped_after_load"],
            "rss_before_load": base,
            "rss_loading": r["loaded"]["VmHWM"] - base,
            "rss_steps": [s["VmHWM"] - base for s in r["steps"]],
        })
    return {"recipe": name, "words": [w for w in words if not w.startswith(("distributed.main_process_port",))],
            "command": f"flock /tmp/tunefleet-cpu.lock .venv/bin/python benchmarks/plan_memory.py measure {name}",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "steps": STEPS, "ranks": ranks}


def _save(path: Path, key: str, entry: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")


# ---------------------------------------------------------------------------- what a forward keeps


ACTIVATION_CASES = [  # recipe words; the fit runs each in float32 and under CPU bf16 autocast
    ["recipe=lora"], ["recipe=lora", "peft.dropout=0"], ["recipe=qlora"], ["recipe=dora"], ["recipe=ia3"],
    ["recipe=full"], ["recipe=prompt_tuning"], ["recipe=prefix_tuning"], ["recipe=partial_freeze"],
    ["recipe=classify_lora"], ["recipe=classify_lora", "peft.method=full"],
    ["recipe=lora", "train.gradient_checkpointing=true"],
]


def activation_case(words: list[str], autocast: bool, rows: int = 2, length: int = 64) -> dict:
    """Bytes one micro batch keeps for backward, measured (tests/memory_probe.py's kept_for_backward) and planned."""
    import torch

    from launcher.config.load import load_recipe
    from launcher.planning.activations import Run, activation_bytes
    from launcher.planning.params import trainable
    from launcher.planning.shapes import read_shape
    from tests.memory_probe import build_for_fit, kept_for_backward

    extra = []
    if autocast and "peft.method=full" not in words and "recipe=full" not in words:
        extra = ["model.dtype=bfloat16"]  # what model.dtype=auto loads under bf16
    if autocast and "recipe=qlora" in words:
        extra.append("peft.compute_dtype=bfloat16")
    _, recipe = load_recipe([*words, *extra, f"data.max_seq_len={length}", f"train.micro_batch_size={rows}"])
    model, labels, chunked = build_for_fit(recipe)
    measured = kept_for_backward(model, recipe, rows, length, chunked, autocast)
    shape = read_shape(recipe.model.name)
    train = trainable(shape, recipe.peft, recipe.model.task, labels)
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad]
    weights = 4 if recipe.peft.method == "qlora" or not frozen or frozen[0] == torch.float32 else 2
    run = Run(rows=rows, seq_len=length, compute_bytes=2 if autocast else 4, stream_bytes=weights,
              float32_weights=weights == 4, quantized=recipe.peft.method == "qlora", gpu=False,
              checkpointing=recipe.train.gradient_checkpointing,
              loss="classification" if labels else "chunked" if chunked else "full")
    planned = activation_bytes(shape, train, run).kept
    return {"words": [*words, *extra], "autocast": "bf16" if autocast else "fp32", "rows": rows, "length": length,
            "planned": planned, "measured": measured}


# ---------------------------------------------------------------------------- DeepSpeed's estimators


LLAMA_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True}


def deepspeed_table() -> list[str]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from launcher.config.schema import FullConfig
    from launcher.planning.memory import Precision, Setup, model_state_bytes
    from launcher.planning.params import parameters, trainable
    from launcher.planning.shapes import read_shape, shape_from_config
    from tests.helpers import SMOLLM

    rows = ["| model | GPUs | ZeRO | plan (GiB) | DeepSpeed (GiB) | ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for label, shape in (("SmolLM2-135M", read_shape(SMOLLM)), ("llama 1B", shape_from_config(LLAMA_1B, "1b"))):
        total = sum(p.numel for p in parameters(shape, None))
        full = trainable(shape, FullConfig(method="full"), "causal_lm", None)
        block = max(sum(p.numel for p in parameters(shape, None) if p.layer == b and "proj" in p.name)
                    for b in range(shape.layers))
        for world in (1, 2, 8):
            for stage in (2, 3):
                est = model_state_bytes(shape, total, full, Setup(f"zero{stage}", world), Precision("bf16", "bfloat16"),
                                        "adamw", None, None)
                ours = est.weights + est.adapter + est.gradients + est.optimizer + est.gathered
                if stage == 2:
                    _, theirs = estimate_zero2_model_states_mem_needs(total, world, 1, cpu_offload=False)
                else:
                    _, theirs, _ = estimate_zero3_model_states_mem_needs(total, block, world, 1, cpu_offload=False,
                                                                         cpu_offload_params=False)
                rows.append(f"| {label} | {world} | {stage} | {ours / 2**30:.3f} | {theirs / 2**30:.3f} | "
                            f"{ours / theirs:.3f} |")
    return rows


# ---------------------------------------------------------------------------- the report


def planned(words: list[str]):
    """The planner's estimate for the measured run, on a CPU."""
    from launcher.config.load import load_recipe
    from launcher.distributed.device_settings import PROFILES
    from launcher.planning.estimate import estimate

    _, recipe = load_recipe(words)
    return estimate(recipe, PROFILES["cpu"])[0]


def recorded() -> dict:
    """The CPU measurements on record, by recipe."""
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def compared(entry: dict) -> tuple[int, int, list[float]]:
    """The planner's training and loading bytes (less the fixed overhead) for a recorded run, and per rank the
    relative error of its peak against the measured peak of live tensors, loading or training."""
    est = planned(entry["words"])
    overhead = est.device["overhead"]
    train_plan, load_plan = est.training - overhead, est.loading_total - overhead
    errors = []
    for rank in entry["ranks"]:
        measured = max(max(rank["tensors_steps"]), rank["tensors_loading"])
        # The plan's loading figure is the loading rank's (rank 0); the others hold at most their shard.
        plan_peak = max(train_plan, load_plan if rank["rank"] == 0 else 0)
        errors.append(plan_peak / measured - 1)
    return train_plan, load_plan, errors


def recipe_table() -> tuple[list[str], list[str]]:
    data = recorded()
    rows = ["| recipe | rank | plan: training / loading (MiB) | measured tensors: training / loading (MiB) | "
            "error of the peak | peak RSS above the pre-load RSS: training / loading (MiB) | "
            "RSS before loading (MiB) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for name in SHIPPED:
        entry = data.get(name)
        if entry is None:
            rows.append(f"| {name} | | not measured yet | | | | |")
            continue
        train_plan, load_plan, errors = compared(entry)
        for rank, error in zip(entry["ranks"], errors):
            measured_train, measured_load = max(rank["tensors_steps"]), rank["tensors_loading"]
            rows.append(f"| {name} | {rank['rank']} | {train_plan / MiB:.0f} / {load_plan / MiB:.0f} | "
                        f"{measured_train / MiB:.0f} / {measured_load / MiB:.0f} | {100 * error:+.1f}% | "
                        f"{max(rank['rss_steps']) / MiB:.0f} / {rank['rss_loading'] / MiB:.0f} | "
                        f"{rank['rss_before_load'] / MiB:.0f} |")
        words = " ".join(re.sub(r"=/tmp/[^ ]*/", "=LONG_ROWS/", w) for w in entry["words"])
        notes.append(f"- `{name}`: {entry['date']}, torch {entry['torch']}: `{entry['command']}` "
                     f"(recipe words: `{words}`)")
    return rows, notes


def activation_table() -> list[str]:
    data = json.loads(ACTIVATIONS.read_text()) if ACTIVATIONS.exists() else {}
    rows = ["| setup | dtype | micro batch x length | plan (MiB) | measured (MiB) | ratio |",
            "| --- | --- | --- | --- | --- | --- |"]
    for case in data.values():
        rows.append(f"| {' '.join(case['words'])} | {case['autocast']} | {case['rows']} x {case['length']} | "
                    f"{case['planned'] / MiB:.1f} | {case['measured'] / MiB:.1f} | "
                    f"{case['planned'] / case['measured']:.3f} |")
    return rows


def report() -> str:
    import torch

    rows, notes = recipe_table()
    parts = [
        "# `tunefleet plan`: estimates against measurements on CPU\n",
        f"Produced by `.venv/bin/python benchmarks/plan_memory.py report > benchmarks/plan_memory.md` (torch "
        f"{torch.__version__}); the measurements it reads are in `benchmarks/results/plan-memory-cpu.json` and "
        "`plan-activations-cpu.json`, each with the command that made it (see the list below and the docstring of "
        "`benchmarks/plan_memory.py`). The plan columns are recomputed from the current planner.\n",
        "## The peak of every shipped recipe (CPU, 3 steps, every row max_seq_len long)\n",
        "The error compares the planner's per-device estimate without its fixed runtime overhead (0.5 GiB on a "
        "CPU) with the peak of bytes in live tensors, loading or training, whichever is larger: what the planner "
        "estimates. The resident-memory columns show what the process paid above its resident memory before "
        "loading, allocator slack included; the last column is the runtime the overhead line stands for.\n",
        *rows, "", "Measured:", *notes, "",
        "What the fit found (each now in the planner: launcher/planning/activations.py and memory.py):",
        "- LoRA dropout keeps, per adapted map, the dropped input and the dropout's mask; on a CPU the mask is "
        "the float noise tensor torch multiplies by (a bool per element on a GPU). The recipes' 0.05 costs "
        "SmolLM2 6 x hidden per token and block (+44% over dropout off).",
        "- Under DeepSpeed ZeRO-3 (defaults: stage3_max_live_parameters and stage3_max_reuse_distance 1e9) every "
        "parameter gathered in forward stays gathered until backward: a model smaller than 1e9 parameters is "
        "whole on every rank during the step; and its linear function keeps every map's input, frozen or not.",
        "- A frozen model's forward still holds one block's working set (classify_head: the attention scores "
        "through dropout).",
        "- Loading: a float32 checkpoint loaded in float32 is memory-mapped, not copied; FSDP2's rank 0 holds the "
        "whole model and its shard until every rank is filled; ZeRO-3 on a CPU reads the whole model on every "
        "rank.", "",
        "## What one micro batch keeps for backward (saved-tensor hooks, SmolLM2-135M and MiniLM-L6, CPU)\n",
        "Dropout on, as the recipes train; `bf16` is CPU autocast with the frozen weights in bfloat16 (what "
        "model.dtype=auto loads under bf16), except full fine-tuning, whose float32 weights autocast copies. "
        "`flock /tmp/tunefleet-cpu.lock .venv/bin/python benchmarks/plan_memory.py activations`.\n",
        *activation_table(), "",
        "## Model states (full fine-tuning, bf16, AdamW) vs DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs`\n",
        *deepspeed_table(), "",
    ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("measure", help="run recipes and record their peaks")
    m.add_argument("recipes", nargs="+", choices=SHIPPED)
    sub.add_parser("activations", help="what a forward keeps for backward, planned and measured")
    sub.add_parser("report", help="the markdown tables, estimates recomputed")
    args = parser.parse_args()
    if args.what == "measure":
        for name in args.recipes:
            _save(RESULTS, name, measure(name))
            print(f"{name}: recorded in {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    elif args.what == "activations":
        for words in ACTIVATION_CASES:
            for autocast in (False, True):
                case = activation_case(words, autocast)
                _save(ACTIVATIONS, f"{' '.join(words)} {case['autocast']}", case)
    else:
        # DeepSpeed's estimators are imported for the last table; named, the accelerator is not announced on
        # standard output (which is the report).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        print(report())


if __name__ == "__main__":
    if os.environ.get(PROBE_ENV):
        sys.exit(probe(sys.argv[1:]))
    main()
