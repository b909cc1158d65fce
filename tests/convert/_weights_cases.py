"""Per-rank bodies of the loader tests (one gloo rank each): ``convert.weights`` loads and saves either spelling."""
import torch

from megatron_tr1.convert.mapping import mcore_spec_name


class TESpelled(torch.nn.Module):
    """A local-spec model seen through transformer-engine's names (what a ``te`` model's state dict looks like on
    CPU, where transformer-engine cannot run): ``state_dict`` renames the fused norms, tensors are shared."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def state_dict(self, *args, **kwargs):
        return {mcore_spec_name(k, "te"): v for k, v in self.inner.state_dict().items()}


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def spelling_case(rank, world, root):
    import json
    from pathlib import Path

    from megatron_tr1.convert.checkpoint import read_meta
    from megatron_tr1.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_tr1.convert.weights import load_weights, save_weights
    from megatron_tr1.demo import build_tiny_tokenizer, tiny_hf_model
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.errors import CheckpointError
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel
    from safetensors import safe_open

    init_parallel(1, 1)
    hf = tiny_hf_model(3)
    hf_dir = Path(root, "hf")
    hf.save_pretrained(hf_dir)
    build_tiny_tokenizer(hf_dir)

    def fresh():
        torch.manual_seed(7)
        return Qwen2_5_VLModel(hf.config, layer_spec="local", cpu_init=True)

    reference = fresh()
    load_weights(reference, hf.state_dict(), hf.config)
    want = _weights(reference)
    out = {}
    te_model = fresh()
    out["te_from_hf_folder"] = load_weights(TESpelled(te_model), hf_dir)
    out["te_from_hf_equal"] = all(torch.equal(want[k], v) for k, v in _weights(te_model).items())
    save_weights(TESpelled(te_model), Path(root, "saved_te"), hf_dir)
    out["saved_spec"] = read_meta(Path(root, "saved_te")).spec
    with safe_open(str(Path(root, "saved_te/mp_rank_00_000/model.safetensors")), "pt") as f:
        out["saved_te_names"] = sum(k.endswith("linear_qkv.layer_norm_weight") for k in f.keys())
    back = fresh()
    load_weights(back, Path(root, "saved_te"))  # a te checkpoint into a local model
    out["local_from_te_equal"] = all(torch.equal(want[k], v) for k, v in _weights(back).items())
    convert_hf_to_mcore(hf_dir, Path(root, "conv_local"), 1, 1, progress=False)
    te_again = fresh()
    load_weights(TESpelled(te_again), Path(root, "conv_local"))  # a local checkpoint into a te model
    out["te_from_local_equal"] = all(torch.equal(want[k], v) for k, v in _weights(te_again).items())
    save_weights(reference, Path(root, "saved_local"), hf_dir)
    out["saved_local_spec"] = json.loads(Path(root, "saved_local/tr1_mcore.json").read_text())["spec"]

    errors = {}
    state = dict(hf.state_dict())
    for label, bad in (("extra", {**state, "model.layers.0.mlp.bogus.weight": torch.zeros(1)}),
                       ("missing", {k: v for k, v in state.items() if "visual.blocks.0.norm1" not in k}),
                       ("shape", {**state, "model.norm.weight": torch.zeros(3)})):
        try:
            load_weights(fresh(), bad, hf.config)
        except CheckpointError as e:
            errors[label] = str(e)
    wrong = fresh().state_dict()
    wrong["language_model.decoder.final_layernorm.weight"] = torch.zeros(3)
    from megatron_tr1.convert.weights import load_state
    try:
        load_state(fresh(), wrong, "a state")
    except CheckpointError as e:
        errors["model_shape"] = str(e)
    out["errors"] = errors
    return out
