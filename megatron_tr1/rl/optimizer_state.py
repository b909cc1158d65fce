"""Each rank's optimizer state in a checkpoint: its shard of megatron's distributed optimizer, as it is.

A rank writes ``optim_tpTT_ppPPP_dpDDD.pt`` holding, per megatron optimizer (a ``ChainedOptimizer`` holds one per
dtype / group), the inner torch optimizer's state dict (Adam moments and step of this rank's shard) and the fp32
main parameters it updates, plus the rank's RNG states. Loading needs the same TP x PP x DP layout: the shards are
slices of megatron's flat per-rank buffers, which do not map onto another layout (the weights do: they reshard
through ``convert/``). Megatron's own DP-zero gather (``get_parameter_state_dp_zero``) was tried first: on reload
its per-parameter ``step`` key is missing and the moments stay uninitialised (NaN on the first step).
"""
from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from megatron_tr1.convert import integrity
from megatron_tr1.errors import CheckpointError
from megatron_tr1.rl.checkpoint import capture_rng, restore_rng


def optimizers(optimizer) -> list:
    """The megatron optimizers inside ``optimizer`` (a ``ChainedOptimizer`` holds one per dtype / group)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _inner(optimizer):
    """The torch optimizer doing the update (megatron wraps one; its state is this rank's shard)."""
    return getattr(optimizer, "optimizer", optimizer)


def _main_params(optimizer) -> list[torch.Tensor]:
    """The parameters the torch optimizer updates on this rank (fp32 main shards with the distributed optimizer)."""
    return [p for group in _inner(optimizer).param_groups for p in group["params"]]


def layout() -> list[int]:
    """This run's ``[TP, PP, DP]``."""
    return [ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_data_parallel_world_size()]


def saved_layout(checkpoint: Path, tp: int, pp: int) -> list[int]:
    """``[TP, PP, DP]`` of a checkpoint whose model was saved at TP x PP (DP from its optimizer files)."""
    return [tp, pp, len(list(checkpoint.glob("optim_*.pt"))) // (tp * pp)]


def _file() -> str:
    return (f"optim_tp{ps.get_tensor_model_parallel_rank():02d}_pp{ps.get_pipeline_model_parallel_rank():03d}_"
            f"dp{ps.get_data_parallel_rank():03d}.pt")


def save_optimizer_state(optimizer, folder: Path) -> None:
    """Write this rank's optimizer shard and RNG states into ``folder``, with its checksum."""
    torch.save({"optimizers": [_inner(o).state_dict() for o in optimizers(optimizer)],
                "main_params": [[p.detach().cpu().clone() for p in _main_params(o)] for o in optimizers(optimizer)],
                "rng": capture_rng(), "layout": layout()}, folder / _file())
    integrity.write_checksum(folder / _file())


def load_optimizer_state(optimizer, folder: Path) -> None:
    """Undo ``save_optimizer_state`` (same layout; ``weights_only`` load), RNG states included. The file is checked
    against its checksum first (required when the checkpoint has checksums: its trainer state has one)."""
    path = folder / _file()
    integrity.verify_checksum(path, required=integrity.sidecar(folder / "trainer_state.json").is_file())
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable optimizer state ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              f"resume from another checkpoint, or pass checkpoint.reset_optimizer=true to keep "
                              f"the weights with fresh Adam moments") from None
    with torch.no_grad():
        for part, inner, main in zip(optimizers(optimizer), blob["optimizers"], blob["main_params"], strict=True):
            for param, value in zip(_main_params(part), main, strict=True):
                param.copy_(value)
            _inner(part).load_state_dict(inner)
    restore_rng(blob["rng"])
