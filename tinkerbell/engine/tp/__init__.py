"""Tensor parallelism: one replica's base model sharded over T ranks (Megatron-style)."""
