"""Distributed backends: DDP, FSDP2 and DeepSpeed ZeRO, chosen by `distributed.backend`."""
