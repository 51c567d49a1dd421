"""The benchmark probe: one measuring instrument loaded into every contender's processes.

benchmarks/compare_hf.py puts this folder first on PYTHONPATH and sets BENCH_PROBE_DIR, so
Python imports this file at start-up in each process of a contender (tunefleet's CLI and any
workers it starts, the transformers/TRL/accelerate scripts alike), and no contender needs code
of its own for the figures. Without BENCH_PROBE_DIR it does nothing.

When torch has been imported it adds three global hooks:
- a module-registration hook that puts a forward pre-hook on every module that owns an
  `embed_tokens` (the decoder stack of a Llama-style model: it sees input_ids and attention_mask
  whatever wrappers peft, accelerate or a trainer put around it);
- that pre-hook counts, for forwards in training mode with gradients on, the positions computed
  (batch x sequence) and the real tokens among them (see count_real: the attention mask's sum,
  or the pad-only segments of packed rows; flagged as inexact where it cannot tell);
- an optimizer-step post-hook that appends one JSON line per optimizer step to
  BENCH_PROBE_DIR/probe-PID.jsonl: wall-clock time (after a CUDA synchronize, so the step's work
  is done), cumulative counts, torch's thread count, peak CUDA memory allocated.
Counts stay on the device between steps, so the probe adds no synchronisation inside a step.
"""

from __future__ import annotations

import json
import os
import sys
import time

PROBE_ENV = "BENCH_PROBE_DIR"


def count_real(positions: int, attention_mask=None, input_ids=None, position_ids=None, pad_id=None):
    """Real (non-padding) tokens of one forward: (count, exact). The count may be a device tensor.

    - A 2-D 0/1 attention mask marks the padding: its sum.
    - No mask and no position_ids: one unpadded sequence per row, every position is real.
    - No mask but position_ids (packed rows, each example restarting at position 0): a segment
      that starts at position 0 and holds only pad tokens is padding (a real example always holds
      some other token, e.g. its chat-template markers); needs the model's pad_token_id.
    - Anything else (4-D or block masks, no pad id): every position is counted and `exact` is False.
    """
    if attention_mask is None and position_ids is None:
        return positions, True
    if attention_mask is not None:
        if getattr(attention_mask, "dim", None) is not None and attention_mask.dim() == 2:
            return attention_mask.sum(), True
        return positions, False
    if input_ids is None or pad_id is None:
        return positions, False
    rows, width = input_ids.shape
    segment = (position_ids == 0).long().cumsum(dim=1)  # 1, 1, ..., 2, 2, ... within each row
    index = (segment + (width + 1) * input_ids.new_tensor(range(rows)).unsqueeze(1)).flatten()
    size = input_ids.new_zeros(rows * (width + 1)).scatter_add_(0, index, input_ids.new_ones(index.shape))
    other = input_ids.new_zeros(rows * (width + 1)).scatter_add_(0, index, (input_ids != pad_id).long().flatten())
    padding = size[(size > 0) & (other == 0)].sum()
    return positions - padding, True


class Probe:
    def __init__(self, out_dir: str, torch):
        self.torch = torch
        self.path = os.path.join(out_dir, f"probe-{os.getpid()}.jsonl")
        self.file = None
        self.real = 0  # an int or a device tensor until the next step turns it into an int
        self.positions = 0
        self.exact = True
        self.steps = 0
        self.first_forward = None

    def write(self, record: dict) -> None:
        if self.file is None:
            self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - open for the process's life
        self.file.write(json.dumps({"pid": os.getpid(), **record}) + "\n")

    def on_forward(self, module, args, kwargs):
        if not (module.training and self.torch.is_grad_enabled()):
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
        positions = int(shape[0]) * int(shape[1])
        pad_id = getattr(getattr(module, "config", None), "pad_token_id", None)
        real, exact = count_real(positions, kwargs.get("attention_mask"), ids, kwargs.get("position_ids"), pad_id)
        self.positions += positions
        self.real = self.real + real
        self.exact = self.exact and exact
        if self.first_forward is None:
            self.first_forward = time.time()
            self.write({"event": "first_forward", "t": self.first_forward})
        return None

    def on_step(self, optimizer, args, kwargs) -> None:
        torch = self.torch
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
        now = time.time()
        self.steps += 1
        self.real = int(self.real)
        record = {
            "event": "step", "step": self.steps, "t": now, "real": self.real, "positions": self.positions,
            "real_exact": self.exact, "threads": torch.get_num_threads(),
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        }
        if self.steps == 1:
            record["device"] = torch.cuda.get_device_name() if cuda else "cpu"
        self.write(record)

    def on_register(self, module, name, submodule):
        if name == "embed_tokens" and not module.__dict__.get("_bench_probe"):
            module.__dict__["_bench_probe"] = True  # once per module, however often embed_tokens is replaced
            module.register_forward_pre_hook(self.on_forward, with_kwargs=True)
        return None


def install(torch) -> Probe:
    from torch.nn.modules.module import register_module_module_registration_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    probe = Probe(os.environ[PROBE_ENV], torch)
    register_module_module_registration_hook(probe.on_register)
    register_optimizer_step_post_hook(probe.on_step)
    probe.write({"event": "start", "t": time.time(), "argv": sys.argv[:3]})
    return probe


def _install_after_torch_import() -> None:
    """Hook the import of torch, so processes that never import it pay nothing."""
    import importlib.abc
    import importlib.machinery

    class AfterTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "torch":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                try:
                    install(module)
                except Exception as err:  # noqa: BLE001 - a broken probe must be visible, not fatal
                    print(f"[bench probe] not installed: {type(err).__name__}: {err}", file=sys.stderr)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, AfterTorch())


if os.environ.get(PROBE_ENV):
    _install_after_torch_import()
