"""The Triton kernels compile for an H100 (sm_90) ahead of time, down to a cubin: the interpreter is more lenient
than the compiler (types of loop-carried values, constexpr branches), and CI has no GPU. Needs no GPU, only the
ptxas that ships in the triton wheel. Runs in a fresh process: the interpreter leaves ``triton.language``
patched for interpretation once it has run, which breaks later compilation in the same process."""
import inspect
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
F32 = "*fp32"


def compile_sm90(kernel, types: dict, constexprs: dict) -> dict:
    """``triton.compile`` of ``kernel`` (a ``kernels._dispatch.triton_kernel``) for sm_90; returns its ``asm``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: types.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    src = ASTSource(fn=kernel.jitted(), signature=signature,
                    constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm


def compile_all() -> None:
    """Every kernel in the variants the library launches (both logit dtypes, every KL type, with/without dual
    clip and entropy, every loss type and rollout correction); raises on the first that fails."""
    from kernels.grpo_loss import _grpo_kernel
    from kernels.grpo_rows import _rows_kernel
    from kernels.logprobs import _grad_kernel, _stats_kernel

    for dtype in ("bf16", "fp32"):
        logits = {"z_ptr": f"*{dtype}", "labels_ptr": "*i64", "inv_temp": "fp32"}
        assert "cubin" in compile_sm90(_stats_kernel, {**logits, "out_ptr": F32}, {"BLOCK": 4096})
        for has_ent in (True, False):
            types = {**logits, "grad_ptr": f"*{dtype}", "lse_ptr": F32, "ent_ptr": F32, "g_lp_ptr": F32,
                     "g_ent_ptr": F32}
            assert "cubin" in compile_sm90(_grad_kernel, types, {"HAS_ENT": has_ent, "BLOCK": 4096})
    pointers = ["lp_ptr", "old_ptr", "adv_ptr", "mask_ptr", "scale_ptr", "ref_ptr", "ent_ptr", "grad_lp_ptr",
                "grad_ent_ptr", "sums_ptr", "roll_ptr", "rows_ptr", "pg_scale_ptr"]
    types = {**{p: F32 for p in pointers},
             **{f: "fp32" for f in ["clip_low", "clip_high", "clip_dual", "kl_coef", "ent_coef", "cap", "log_cap"]}}
    plain = {"LOSS": 0, "RC": 0, "SPLIT": False}
    for kl in (0, 1, 2, 3):
        for dual, has_ent in ((True, True), (False, False)):
            consts = {"DUAL": dual, "KL": kl, "HAS_ENT": has_ent, "BLOCK": 1024, **plain}
            assert "cubin" in compile_sm90(_grpo_kernel, types, consts)
    # GSPO (its own policy-term weights, or agg's) / CISPO, each rollout correction
    variants = [(loss, rc, loss == 1) for loss in (0, 1, 2) for rc in (0, 1, 2, 3)] + [(1, 0, False)]
    for loss, rc, split in variants:
        consts = {"DUAL": False, "KL": 3, "HAS_ENT": True, "BLOCK": 1024, "LOSS": loss, "RC": rc, "SPLIT": split}
        assert "cubin" in compile_sm90(_grpo_kernel, types, consts)
    row_types = {**{p: F32 for p in ("lp_ptr", "old_ptr", "roll_ptr", "mask_ptr", "rows_ptr")}, "log_cap": "fp32"}
    for rc in (0, 2, 3):
        assert "cubin" in compile_sm90(_rows_kernel, row_types, {"RC": rc, "BLOCK": 1024})
    print("compiled")


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",  # really compile; 3.9's default
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parents[1]), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", "import test_kernel_compile as t; t.compile_all()"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-4000:]
