"""Argument checks shared by the omni ops (run eagerly; fake kernels skip them)."""

from __future__ import annotations

import torch


def check_layer_rows(op: str, table: torch.Tensor, layer: int) -> None:
    if not 0 <= layer < table.shape[0]:
        raise IndexError(f"omni::{op}: layer {layer} out of range for a table of {table.shape[0]} MoE layers")


def check_layer(op: str, replica_slots: torch.Tensor, replica_count: torch.Tensor, layer: int) -> None:
    check_layer_rows(op, replica_slots, layer)
    if replica_slots.dim() != 3 or replica_count.shape != replica_slots.shape[:2]:
        raise ValueError(
            f"omni::{op}: replica_slots must be [L, E, M] and replica_count [L, E]; got "
            f"{tuple(replica_slots.shape)} and {tuple(replica_count.shape)}"
        )
