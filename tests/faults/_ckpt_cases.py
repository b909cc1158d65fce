"""Per-rank bodies of the checkpoint fault tests (one gloo rank each)."""
from pathlib import Path


def write_checkpoint(rank, world, root, poison: bool = False):
    """A tr1 checkpoint of the tiny model saved through ``convert.weights.save_weights`` (checksums included), with
    one tensor set to NaN first when ``poison``; also its HF folder."""
    import torch

    from megatron_tr1.convert.weights import load_weights, save_weights
    from megatron_tr1.demo import build_tiny_tokenizer, tiny_hf_model
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    init_parallel(1, 1)
    hf = tiny_hf_model(0)
    hf_dir = Path(root, "hf")
    hf.save_pretrained(hf_dir)
    build_tiny_tokenizer(hf_dir)
    model = Qwen2_5_VLModel(hf.config, layer_spec="local", cpu_init=True)
    load_weights(model, hf_dir)
    if poison:
        with torch.no_grad():
            model.language_model.decoder.final_layernorm.weight[0] = float("nan")
    save_weights(model, Path(root, "ckpt"), hf_dir)
    return str(Path(root, "ckpt"))


def load_checkpoint(rank, world, ckpt):
    """Load ``ckpt`` into a fresh tiny model; the error message, or None."""
    from megatron_tr1.convert.weights import load_weights
    from megatron_tr1.demo import tiny_hf_config
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.errors import CheckpointError
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    init_parallel(1, 1)
    model = Qwen2_5_VLModel(tiny_hf_config(), layer_spec="local", cpu_init=True)
    try:
        load_weights(model, ckpt)
    except CheckpointError as e:
        return str(e)
    return None
