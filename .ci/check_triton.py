#!/usr/bin/env python3
"""Ahead-of-time compile check of every Triton kernel fastgen launches (no GPU needed).

Each kernel is compiled through the full Triton pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled
ptxas) for sm_90 (and sm_80 for a subset) with the constexprs / num_warps / num_stages its launcher uses on a GPU
(see each op's ``_configs`` / ``_fwd_config`` / ``_blocks`` heuristics). The interpreter (TRITON_INTERPRET=1)
accepts code the compiler rejects; this catches that, plus shared-memory overflows at the GPU block sizes.

    python .ci/check_triton.py              # every op
    python .ci/check_triton.py attention vq # some ops (module names under fastgen/ops)

One line per (kernel, config): OK with registers / spill bytes / shared memory, or FAIL with the error.
Exit status 1 on any failure.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# max dynamic shared memory per block (bytes)
SMEM_LIMIT = {90: 232448, 80: 166912}
ARCHS_ALL = (90,)
ARCHS_BOTH = (90, 80)


@dataclass
class Case:
    module: str
    kernel: str
    label: str
    ptrs: dict  # arg name -> element type ("fp16", "i32", ...)
    constexprs: dict
    fp: tuple = ()  # float scalar args
    i64: tuple = ()  # int64 scalar args (everything else not listed: i32)
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple = ARCHS_ALL
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------


def _attn_configs(d, dt, kind, heavy=False):
    """Mirror of fastgen.ops.attention._configs (GPU branch)."""
    from fastgen.ops import attention

    orig = attention._backend.triton_interpret
    attention._backend.triton_interpret = lambda: False
    try:
        import torch

        return attention._configs(
            d, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt], kind, heavy
        )
    finally:
        attention._backend.triton_interpret = orig


def _pow2(n):
    return max(16, 1 << (n - 1).bit_length())


def _attn_archs(dt, name):
    return ARCHS_BOTH if dt == "fp16" and name == "causal+bias+mask+drop" else ARCHS_ALL


def attention_cases():
    out = []
    fwd_ptr = lambda dt: dict(Q=dt, K=dt, V=dt, Out=dt, Lse="fp32", Bias=dt, Mask="u8", CuQ="i32", CuK="i32")
    bwd_common = lambda dt: dict(
        Q=dt,
        K=dt,
        V=dt,
        DO=dt,
        DBias="fp32",
        Lse="fp32",
        Delta="fp32",
        Bias=dt,
        Mask="u8",
        CuQ="i32",
        CuK="i32",
    )
    flag_sets = {
        "plain": dict(CAUSAL=0, HAS_BIAS=False, HAS_MASK=False, VARLEN=False, DROPOUT=False),
        "causal+bias+mask+drop": dict(CAUSAL=1, HAS_BIAS=True, HAS_MASK=True, VARLEN=False, DROPOUT=True),
        "causal2+varlen": dict(CAUSAL=2, HAS_BIAS=False, HAS_MASK=False, VARLEN=True, DROPOUT=False),
    }
    for dt in ("fp16", "bf16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        for d in (64, 128, 256):
            sets = ["causal+bias+mask+drop"] + (["plain", "causal2+varlen"] if dt == "fp16" else [])
            for name in sets:
                bm, bn, w, s = _attn_configs(d, dt, "fwd", heavy=name == "causal+bias+mask+drop")
                cx = dict(D=d, DV=d, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(d), BLOCK_M=bm, BLOCK_N=bn, PRECISION=prec,
                          **flag_sets[name])  # fmt: skip
                out.append(Case("attention", "_attn_fwd_kernel", f"{dt} D={d} {name}", fwd_ptr(dt), cx,
                                fp=("qk_scale", "dropout_p"), i64=("seed",), num_warps=w, num_stages=s,
                                archs=_attn_archs(dt, name)))  # fmt: skip
            bm, bn, w, s = _attn_configs(d, dt, "bwd")
            base = dict(
                D=d, DV=d, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(d), BLOCK_M=bm, BLOCK_N=bn, PRECISION=prec
            )
            if dt == "fp16":
                out.append(Case("attention", "_bwd_delta_kernel", f"{dt} D={d}",
                                dict(Out=dt, DO=dt, Delta="fp32", CuQ="i32"),
                                dict(DV=d, BLOCK_DV=_pow2(d), BLOCK_M=bm, VARLEN=False), num_warps=w,
                                num_stages=s))  # fmt: skip
            for name in ("causal+bias+mask+drop",) + (("plain", "causal2+varlen") if dt == "bf16" else ()):
                for atomic in (True, False):
                    bias_grad = flag_sets[name]["HAS_BIAS"]
                    cx = dict(base, ATOMIC_DQ=atomic, BIAS_GRAD=bias_grad and atomic, **flag_sets[name])
                    ptrs = dict(bwd_common(dt), DK=dt, DV_=dt, DQacc="fp32" if atomic else dt)
                    out.append(Case("attention", "_attn_bwd_dkdv_kernel",
                                    f"{dt} D={d} {name} ATOMIC_DQ={int(atomic)}", ptrs, cx,
                                    fp=("scale", "qk_scale", "dropout_p"), i64=("seed",), num_warps=w,
                                    num_stages=s, archs=_attn_archs(dt, name)))  # fmt: skip
                cx = dict(base, BIAS_GRAD=flag_sets[name]["HAS_BIAS"], **flag_sets[name])
                out.append(Case("attention", "_attn_bwd_dq_kernel", f"{dt} D={d} {name}", dict(bwd_common(dt), DQ=dt),
                                cx, fp=("scale", "qk_scale", "dropout_p"), i64=("seed",), num_warps=w,
                                num_stages=s, archs=_attn_archs(dt, name)))  # fmt: skip
    # fp32 with TF32 allowed
    bm, bn, w, s = _attn_configs(128, "fp32", "fwd")
    cx = dict(D=128, DV=128, BLOCK_D=128, BLOCK_DV=128, BLOCK_M=bm, BLOCK_N=bn, PRECISION="tf32",
              **flag_sets["plain"])  # fmt: skip
    out.append(Case("attention", "_attn_fwd_kernel", "fp32 D=128 plain tf32", fwd_ptr("fp32"), cx,
                    fp=("qk_scale", "dropout_p"), i64=("seed",), num_warps=w, num_stages=s))  # fmt: skip
    # odd head dim (D < BLOCK_D)
    bm, bn, w, s = _attn_configs(96, "bf16", "fwd")
    cx = dict(
        D=96, DV=80, BLOCK_D=128, BLOCK_DV=128, BLOCK_M=bm, BLOCK_N=bn, PRECISION="tf32", **flag_sets["plain"]
    )
    out.append(Case("attention", "_attn_fwd_kernel", "bf16 D=96 DV=80 plain", fwd_ptr("bf16"), cx,
                    fp=("qk_scale", "dropout_p"), i64=("seed",), num_warps=w, num_stages=s))  # fmt: skip
    out.append(Case("attention", "_dropout_keep_kernel", "16x64", dict(Keep="i8"), dict(BLOCK_M=16, BLOCK_N=64),
                    fp=("dropout_p",), i64=("seed",), archs=ARCHS_BOTH))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# grouped_mm
# ---------------------------------------------------------------------------------------------------------

ACTS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "swiglu": 5}


def _gmm_fwd_config(dt, mean_rows, swiglu):
    bm = 64 if mean_rows < 128 else 128
    if dt == "fp32":
        return bm, 32 if swiglu else 64, 32, 8 if bm == 128 else 4, 3
    return bm, 64 if swiglu else 128, 64, 8 if bm == 128 else 4, 3 if swiglu else 4


def _gmm_wgrad_config(dt):
    return (32, 64, 64, 4, 3) if dt == "fp32" else (64, 128, 128, 8, 3)


def grouped_mm_cases():
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        for act, aid in ACTS.items():
            if dt != "bf16" and act not in ("none", "swiglu"):
                continue
            for mean_rows in (64, 256):
                bm, bn, bk, w, s = _gmm_fwd_config(dt, mean_rows, act == "swiglu")
                cx = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=64, GROUP_M=8, ACT=aid, HAS_BIAS=act != "none",
                          STORE_H=act != "none", EVEN_K=mean_rows == 64, PRECISION=prec)  # fmt: skip
                ptrs = dict(X=dt, W=dt, Bias=dt, Out=dt, H=dt, Offs="i32", TileStart="i32")
                out.append(Case("grouped_mm", "_gmm_fwd_kernel", f"{dt} {act} rows/expert={mean_rows}", ptrs, cx,
                                num_warps=w, num_stages=s, archs=ARCHS_BOTH if act == "swiglu" else ARCHS_ALL))  # fmt: skip
            if act != "none":
                out.append(Case("grouped_mm", "_act_bwd_kernel", f"{dt} {act}",
                                dict(DOut=dt, H=dt, DH=dt, Offs="i32"), dict(BLOCK_M=64, BLOCK_N=64, ACT=aid)))  # fmt: skip
        bm, bk, bn, w, s = _gmm_wgrad_config(dt)
        for has_db in (False, True):
            out.append(Case("grouped_mm", "_gmm_wgrad_kernel", f"{dt} HAS_DB={int(has_db)}",
                            dict(X=dt, DH=dt, DW=dt, DB=dt, Offs="i32"),
                            dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, HAS_DB=has_db, PRECISION=prec),
                            num_warps=w, num_stages=s, archs=ARCHS_BOTH))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# moe_gating / moe_permute
# ---------------------------------------------------------------------------------------------------------


def moe_gating_cases():
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        for e in (8, 64, 1024, 8192):
            if dt != "fp32" and e not in (64, 8192):
                continue
            be = max(16, _pow2(e))
            bt = max(1, min(64, 4096 // be))
            out.append(Case("moe_gating", "_top2_fwd_kernel", f"{dt} E={e}",
                            dict(X=dt, Idx="i32", Top="fp32", Lse="fp32", Part="fp32", CntPart="i32"),
                            dict(BLOCK_T=bt, BLOCK_E=be), archs=ARCHS_BOTH))  # fmt: skip
    return out


def moe_permute_cases():
    out = []
    for idx_t in ("i32", "i64"):
        for k in (1, 2):
            for has_valid in (False, True):
                if idx_t == "i64" and (k, has_valid) != (2, True):
                    continue
                for e in (8, 4095):
                    out.append(Case("moe_permute", "_route_hist_kernel", f"idx={idx_t} K={k} valid={has_valid} E={e}",
                                    dict(idx_ptr=idx_t, valid_ptr="i1" if has_valid else idx_t, chunk_ptr="i32"),
                                    dict(K=k, HAS_VALID=has_valid, BLOCK=1024, NBINS=_pow2(e + 1)),
                                    archs=ARCHS_BOTH))  # fmt: skip
                out.append(Case("moe_permute", "_route_rank_kernel", f"idx={idx_t} K={k} valid={has_valid}",
                                dict(idx_ptr=idx_t, valid_ptr="i1" if has_valid else idx_t, base_ptr="i32",
                                     offsets_ptr="i32", dest_ptr="i32", src_ptr="i32"),
                                dict(K=k, HAS_VALID=has_valid, BLOCK=1024), archs=ARCHS_BOTH))  # fmt: skip
    for dt in ("fp16", "bf16", "fp32"):
        for d in (64, 4096):
            bd = min(_pow2(d), 1024)
            br = max(1, 4096 // bd)
            for flag in (False, True):
                out.append(Case("moe_permute", "_gather_kernel", f"{dt} D={d} scale={flag}",
                                dict(x_ptr=dt, src_ptr="i32", scale_ptr="fp32" if flag else dt, out_ptr=dt),
                                dict(K=2, HAS_SCALE=flag, BLOCK_R=br, BLOCK_D=bd)))  # fmt: skip
                out.append(Case("moe_permute", "_combine_kernel", f"{dt} D={d} gates={flag}",
                                dict(buf_ptr=dt, dest_ptr="i32", gates_ptr="fp32" if flag else dt, out_ptr=dt),
                                dict(K=2, HAS_GATES=flag, BLOCK_T=br, BLOCK_D=bd)))  # fmt: skip
            bd = min(_pow2(d), 256)
            out.append(Case("moe_permute", "_gate_grad_kernel", f"{dt} D={d}",
                            dict(dy_ptr=dt, buf_ptr=dt, dest_ptr="i32", out_ptr="fp32"),
                            dict(K=2, BLOCK_A=max(1, 4096 // bd), BLOCK_D=bd)))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# vq / vq_ema / ssim / diffusion_step
# ---------------------------------------------------------------------------------------------------------


def _vq_config(dt, d, mode):
    """fastgen.ops.vq._config's GPU branch."""
    import torch

    from fastgen.ops import vq

    orig = vq._backend.triton_interpret
    vq._backend.triton_interpret = lambda: False
    try:
        return vq._config({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt], d, mode)
    finally:
        vq._backend.triton_interpret = orig


def vq_cases():
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        for mode in ("exact", "fast"):
            for d in (8, 64, 1024):
                if d != 64 and dt == "bf16":
                    continue
                bn, bk, bd, w, s = _vq_config(dt, d, mode)
                prec = "tf32" if dt != "fp32" else ("tf32x3" if mode == "exact" else "tf32")
                for cos, counts in ((False, True), (True, False)):
                    cx = dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, R=4 if mode == "exact" else 1, COSINE=cos,
                              RERANK=mode == "exact", COUNTS=counts, PRECISION=prec)  # fmt: skip
                    out.append(Case("vq", "_vq_kernel", f"{dt} {mode} D={d} cosine={cos} counts={counts}",
                                    dict(X=dt, C=dt, CN="fp32", Idx="i64", Dist="fp32", Counts="i32" if counts else "i64"),
                                    cx, num_warps=w, num_stages=s, archs=ARCHS_BOTH if d == 64 and dt == "fp16" else ARCHS_ALL))  # fmt: skip
    return out


def vq_ema_cases():
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        for d in (8, 256):
            bd = min(128, 1 << (d - 1).bit_length())
            out.append(Case("vq_ema", "_ema_atomic_kernel", f"{dt} D={d}", dict(X=dt, Idx="i64", CS="fp32", ES="fp32"),
                            dict(BLOCK_N=32, BLOCK_D=bd), fp=("w",), archs=ARCHS_BOTH))  # fmt: skip
            out.append(Case("vq_ema", "_ema_segment_kernel", f"{dt} D={d}",
                            dict(X=dt, Order="i64", Offs="i64", CS="fp32", ES="fp32"),
                            dict(BLOCK_R=16, BLOCK_D=bd), fp=("decay", "w"), archs=ARCHS_BOTH))  # fmt: skip
    return out


def ssim_cases():
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        for win in (7, 11, 33):
            if dt != "fp32" and win != 11:
                continue
            br = max(64, _pow2(win))
            out.append(Case("ssim", "_ssim_fwd_kernel", f"{dt} WIN={win}",
                            dict(X=dt, Y=dt, Win="fp32", Scratch="fp32", Part="fp32"),
                            dict(WIN=win, BLOCK_R=br, BLOCK_C=64), fp=("c1", "c2"), num_warps=8,
                            archs=ARCHS_BOTH))  # fmt: skip
    return out


def diffusion_step_cases():
    out = []
    variants = [
        dict(HAS_UNCOND=False, HAS_RESCALE=False, CLIP_MODE=0, HAS_PREV=False, NOISE_MODE=0, VAR_MODE=0,
             WANT_X0=False, X0_ONLY=False, HAS_KNOWN=False, HAS_GRAD=False),
        dict(HAS_UNCOND=True, HAS_RESCALE=True, CLIP_MODE=1, HAS_PREV=True, NOISE_MODE=1, VAR_MODE=1,
             WANT_X0=True, X0_ONLY=False, HAS_KNOWN=True, HAS_GRAD=True),
        dict(HAS_UNCOND=True, HAS_RESCALE=False, CLIP_MODE=2, HAS_PREV=False, NOISE_MODE=2, VAR_MODE=2,
             WANT_X0=False, X0_ONLY=False, HAS_KNOWN=True, HAS_GRAD=False),
        dict(HAS_UNCOND=True, HAS_RESCALE=True, CLIP_MODE=2, HAS_PREV=False, NOISE_MODE=0, VAR_MODE=0,
             WANT_X0=False, X0_ONLY=True, HAS_KNOWN=True, HAS_GRAD=False),
    ]  # fmt: skip
    for dt in ("fp16", "bf16", "fp32"):
        for i, v in enumerate(variants):
            if dt != "fp32" and i in (2, 3):
                continue
            for seed_t in ("i32", "i64"):
                if seed_t == "i64" and v["NOISE_MODE"] == 0:
                    continue
                x0 = "fp32" if v["X0_ONLY"] else dt
                ptrs = dict(x_ptr=dt, cond_ptr=dt, uncond_ptr=dt, coef_ptr="fp32", prev_ptr=dt, noise_ptr=dt,
                            rscale_ptr="fp32", thresh_ptr="fp32", out_ptr=dt, x0_ptr=x0, known_ptr=dt,
                            keep_ptr=dt, grad_ptr=dt)  # fmt: skip
                i64 = ("seed_lo", "seed_hi", "sample_offset") if seed_t == "i64" else ()
                out.append(Case("diffusion_step", "_sampler_step_kernel", f"{dt} variant{i} seeds={seed_t}", ptrs,
                                dict(v, BLOCK=1024), fp=("g", "clip", "grad_scale"), i64=i64,
                                archs=ARCHS_BOTH if i == 1 else ARCHS_ALL))  # fmt: skip
    return out


def adaptive_pool_cases():
    """fastgen.ops.adaptive_pool._blocks: NCHW (wide over output columns) and token grids (wide over channels)."""
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        for mode in (0, 1, 2):
            for label, bj, bc in (
                ("nchw", 64, 8 if mode == 1 else 16),
                ("tokens", 4 if mode == 1 else 8, 128),
            ):
                if dt != "fp32" and label == "tokens" and mode == 2:
                    continue
                out.append(Case("adaptive_pool", "_grid_pool_kernel", f"{dt} MODE={mode} {label}",
                                dict(Src=dt, Dst=dt, Idx="i64" if mode == 1 else dt),
                                dict(MODE=mode, BLOCK_J=bj, BLOCK_C=bc), archs=ARCHS_BOTH))  # fmt: skip
    return out


MODULES = {
    "attention": attention_cases,
    "grouped_mm": grouped_mm_cases,
    "moe_gating": moe_gating_cases,
    "moe_permute": moe_permute_cases,
    "vq": vq_cases,
    "vq_ema": vq_ema_cases,
    "ssim": ssim_cases,
    "diffusion_step": diffusion_step_cases,
    "adaptive_pool": adaptive_pool_cases,
}


# ---------------------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------------------


def _cuobjdump():
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(p) if p.exists() else shutil.which("cuobjdump")


def _resources(cubin: bytes):
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", r.stdout)}


def compile_case(case: Case, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget

    mod = importlib.import_module(f"fastgen.ops.{case.module}")
    fn = getattr(mod, case.kernel)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in case.constexprs:
            sig[name] = "constexpr"
        elif name in case.ptrs:
            sig[name] = "*" + case.ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in case.fp:
            sig[name] = "fp32"
        elif name in case.i64:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    unknown = set(case.constexprs) - set(fn.arg_names)
    if unknown:
        raise KeyError(f"unknown constexpr {sorted(unknown)}")
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(case.constexprs), attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=case.num_warps, num_stages=case.num_stages))  # fmt: skip
    shared = ck.metadata.shared
    res = _resources(ck.asm["cubin"])
    return shared, res


def run_one(args):
    case, arch = args
    tag = f"{case.module}.{case.kernel} [{case.label}] sm{arch} w{case.num_warps} s{case.num_stages}"
    t0 = time.time()
    try:
        shared, res = compile_case(case, arch)
    except Exception as e:
        msg = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
        short = " | ".join(line for line in msg if line.strip())[-1500:]
        return False, f"FAIL {tag}: {short}", {}
    dt = time.time() - t0
    info = dict(regs=res.get("REG"), spill=res.get("STACK", 0) + res.get("LOCAL", 0), shared=shared)
    if shared > SMEM_LIMIT[arch]:
        return False, f"FAIL {tag}: shared memory {shared} B > {SMEM_LIMIT[arch]} B limit", info
    line = f"OK   {tag}: regs={info['regs']} spill={info['spill']} shared={shared} ({dt:.1f}s)"
    return True, line, info


def main(argv):
    names = argv or list(MODULES)
    bad = [n for n in names if n not in MODULES]
    if bad:
        print(f"unknown module(s) {bad}; choose from {list(MODULES)}", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("check_triton: triton not installed, skipped")
        return 0
    jobs = [(c, a) for n in names for c in MODULES[n]() for a in c.archs]
    t0 = time.time()
    nproc = max(1, min(len(jobs), os.cpu_count() or 1))
    fails, spills = 0, 0
    with ProcessPoolExecutor(nproc) as ex:
        for ok, line, info in ex.map(run_one, jobs):
            print(line, flush=True)
            fails += not ok
            spills += bool(info.get("spill"))
    print(
        f"check_triton: {len(jobs)} compiles, {fails} failed, {spills} with spills, {time.time() - t0:.0f}s"
    )
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
