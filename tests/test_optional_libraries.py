"""Which runs load bitsandbytes (launcher.optional_libraries): the ones that quantize, and only in a fresh process.

The launched runs of tests/test_backends.py check the rank records (`libraries`) of real runs: no
bitsandbytes under LoRA at any backend, bitsandbytes under QLoRA."""

import json
import subprocess
import sys
from pathlib import Path

from launcher.config.load import load_recipe
from launcher.optional_libraries import needs_bitsandbytes

ROOT = Path(__file__).resolve().parents[1]


def _recipe(*words):
    return load_recipe(list(words))[1]


def test_quantizing_runs_need_bitsandbytes_and_others_do_not(tiny_llama):
    assert needs_bitsandbytes(_recipe("recipe=qlora", f"model.name={tiny_llama}"))
    assert needs_bitsandbytes(_recipe("recipe=lora", f"model.name={tiny_llama}", "train.optimizer=adamw_8bit"))
    assert not needs_bitsandbytes(_recipe("recipe=lora", f"model.name={tiny_llama}"))
    assert not needs_bitsandbytes(_recipe("recipe=full", f"model.name={tiny_llama}"))


def test_a_model_saved_quantized_or_unreadable_keeps_bitsandbytes(tiny_llama, tmp_path):
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    assert needs_bitsandbytes(_recipe("recipe=lora", f"model.name={quantized}"))
    # A hub id not in the local cache: nothing to read before loading, so nothing is left out.
    assert needs_bitsandbytes(_recipe("recipe=lora", "model.name=someone/not-cached-here"))
    # A teacher saved quantized: the student's run loads it too.
    assert needs_bitsandbytes(_recipe("recipe=distill_lm", f"model.name={tiny_llama}", f"distill.teacher={quantized}"))


def _import_after(words: list[str], fresh: bool) -> str:
    """In a new process: leave out what the recipe does not need, then try to import bitsandbytes."""
    code = f"""
import importlib.util, sys
from launcher.config.load import load_recipe
from launcher.optional_libraries import in_a_fresh_process, leave_out_unneeded
if {fresh}:
    in_a_fresh_process()
leave_out_unneeded(load_recipe({words!r})[1])
found = importlib.util.find_spec("bitsandbytes") is not None
try:
    import bitsandbytes
    print("imported", found)
except ImportError:
    print("absent", found)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_only_a_fresh_process_leaves_bitsandbytes_out_and_only_when_unneeded(tiny_llama):
    lora = ["recipe=lora", f"model.name={tiny_llama}"]
    assert _import_after(lora, fresh=True) == "absent False"  # peft's and transformers' checks see it missing
    assert _import_after(lora, fresh=False) == "imported True"  # a test's process (main() called directly)
    assert _import_after(["recipe=qlora", f"model.name={tiny_llama}"], fresh=True) == "imported True"
