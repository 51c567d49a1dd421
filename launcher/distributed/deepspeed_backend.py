"""DeepSpeed ZeRO-1/2/3 (and offload) through accelerate's DeepSpeed plugin.

accelerate builds the engine from the JSON the recipe resolves (launcher.distributed.deepspeed_config);
after that the loop drives the engine directly: `set_gradient_accumulation_boundary` before each
micro batch says whether it is the step's last (so the engine's own micro-step counter is never
what decides), `backward(scale_wrt_gas=False)` because the loss is already normalised over the
global batch, and one `engine.step()` per optimizer step, which clips (gradient_clipping in the
JSON), steps and zeroes the gradients.
"""

from __future__ import annotations

import os

import torch

from launcher.distributed import deepspeed_config


class DeepSpeedBackend:
    def __init__(self, recipe, accumulation: int, precision: str, settings=None):
        self.settings = settings  # launcher.distributed.device_settings.DeviceSettings; None: a CPU's defaults
        self.recipe = recipe
        self.accumulation = accumulation
        self.precision = precision
        source = deepspeed_config.find_ds_config(recipe.distributed.config)
        raw = deepspeed_config.read_ds_config(recipe.distributed.config)
        self.ds_config = deepspeed_config.resolve(raw, recipe, accumulation, precision, source=str(source),
                                                  settings=settings)
        self.stage = deepspeed_config.zero_stage(self.ds_config)

    @property
    def name(self) -> str:
        return f"deepspeed ZeRO-{self.stage}"

    @property
    def sharded_state(self) -> bool:
        """Optimizer state split over ranks: a checkpoint resumes only at the same world size."""
        return self.stage >= 1

    @property
    def params_sharded(self) -> bool:
        return self.stage == 3

    def prepare_environment(self) -> None:
        # ACCELERATE_USE_CPU silently turns DeepSpeed off (plain DDP trains instead); DeepSpeed finds
        # the CPU by itself.
        os.environ.pop("ACCELERATE_USE_CPU", None)
        if "WORLD_SIZE" not in os.environ:
            # Without a rendezvous DeepSpeed looks for MPI to find its (one) peer.
            from launcher.distributed.rendezvous import free_port

            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})

    def accelerator_kwargs(self) -> dict:
        from accelerate.utils import DeepSpeedPlugin

        # DeepSpeed refuses accelerate's cpu flag; it finds the CPU accelerator by itself.
        return {"cpu": False, "deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=self.ds_config),
                "gradient_accumulation_steps": self.accumulation}

    def check_accelerator(self, accelerator) -> None:
        if accelerator.distributed_type.value != "DEEPSPEED":
            raise RuntimeError(f"accelerate set up {accelerator.distributed_type.value}, not DeepSpeed: refusing to "
                               "train with a different backend than the recipe names")

    def optimizer_class(self):
        """ZeRO-Offload runs the optimizer step on the CPU with DeepSpeed's vectorised Adam (the recipe's
        optimizer must then be adamw: launcher.config.compat refuses adamw_8bit with offload)."""
        if not deepspeed_config.offloads_optimizer(self.ds_config):
            return None
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return lambda groups, lr, betas: DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)

    def build_model(self, accelerator, build):
        # Every rank loads; under ZeRO-3 from_pretrained partitions while loading (zero.Init, switched
        # on by accelerate's DeepSpeed plugin), so no rank holds the whole model.
        return build(False)

    def prepare(self, accelerator, model, make_optimizer):
        return accelerator.prepare(model, make_optimizer(model, self.optimizer_class()))

    def sync_gradients(self, accelerator, model, sync: bool) -> None:
        model.set_gradient_accumulation_boundary(sync)  # the prepared model is DeepSpeed's engine

    def backward(self, accelerator, loss: torch.Tensor) -> None:
        accelerator.deepspeed_engine_wrapped.engine.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self, accelerator, model, optimizer, max_grad_norm: float | None) -> float | None:
        model.set_gradient_accumulation_boundary(True)
        model.step()  # clips per gradient_clipping (= train.max_grad_norm), steps, zeroes gradients
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def full_state_dict(self, accelerator, model, names: set[str] | None = None) -> dict:
        if names is None or self.stage != 3:
            state = accelerator.get_state_dict(model)  # ZeRO-3 gathers every tensor (a collective)
            return state if names is None else {k: v for k, v in state.items() if k in names}
        # ZeRO-3, only the named tensors (an adapter's): gather them alone rather than the whole model.
        import deepspeed

        module = accelerator.unwrap_model(model)
        params = dict(module.named_parameters(remove_duplicate=False))  # tied aliases too
        whole = {}
        for key, value in module.state_dict().items():  # buffers are not partitioned
            if key not in names:
                continue
            param = params.get(key)
            if param is None:
                whole[key] = value.detach().to("cpu", copy=True)
                continue
            with deepspeed.zero.GatheredParameters([param]):  # a collective: every rank, same order
                if accelerator.is_main_process:
                    whole[key] = param.detach().to("cpu", copy=True)
        return whole if accelerator.is_main_process else {}

    def whole_parameters(self, accelerator, model):
        """ZeRO-3 gathers the trainable parameters on every rank, so the main process alone may run
        code that reads them (peft computes prompt embeddings to save)."""
        import contextlib

        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad])

    def gathered_for_inference(self, accelerator, model):
        """ZeRO-3: every partition gathered once, with the engine's per-module gather hooks off
        (launcher.distributed.inference_weights decides when it fits)."""
        from launcher.distributed.inference_weights import deepspeed_gathered

        return deepspeed_gathered(model)

    def save_state(self, accelerator, folder: str, model, optimizer, scheduler) -> None:
        accelerator.save_state(folder, exclude_frozen_parameters=True)

    def load_state(self, accelerator, folder: str, model, optimizer, scheduler) -> None:
        accelerator.load_state(folder, load_module_strict=False)

    def resolved_config(self, accelerator) -> dict:
        """The JSON the engine was built from, after accelerate filled the model-size entries."""
        plugin = accelerator.state.deepspeed_plugin
        used = plugin.deepspeed_config if plugin is not None else self.ds_config
        return {"backend": self.name, "deepspeed": used}

    def resume_fingerprint(self) -> dict:
        """The JSON minus what the recipe may change on resume (micro batch, and with it accumulation)."""
        kept = {k: v for k, v in self.ds_config.items()
                if k not in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")}
        return {"backend": self.name, "deepspeed": kept}
