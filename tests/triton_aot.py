"""Compiles every Triton kernel of datarater for sm_90 (Hopper) without a GPU; run by
tests/test_triton_sources.py in a process of its own (the test suite's Triton interpreter
replaces compiled kernels by interpreted ones). Prints one line per kernel family; exits
non-zero on the first failure."""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the kernels must be compiled, not interpreted")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from datarater.kernels import triton_attention as A  # noqa: E402
from datarater.kernels import triton_ce as CE  # noqa: E402
from datarater.kernels import triton_tangent as TT  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
SMEM_PER_BLOCK = 227 * 1024  # the most shared memory a Hopper block may opt into


def _compile(fn, sig: dict, const: dict, warps: int = 4, stages: int = 3):
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn  # through @triton.heuristics / @triton.autotune
    sig = {**sig, **{k: "constexpr" for k in const}}
    kernel = triton.compile(
        ASTSource(fn, sig, constexprs=const),
        target=HOPPER,
        options={"num_warps": warps, "num_stages": stages},
    )
    if kernel.metadata.shared > SMEM_PER_BLOCK:
        raise RuntimeError(
            f"{fn.__name__} {const}: {kernel.metadata.shared} bytes of shared memory"
        )
    return kernel


def _att_sig(dtype: str, ptrs: str, rows: str, ints: str) -> dict:
    sig = {p: f"*{dtype}" for p in ptrs.split()} | {p: "*fp32" for p in rows.split()}
    return sig | {"keep_ptr": "*u8"} | {i: "i32" for i in ints.split()} | {"scale": "fp32"}


FWD_SIG = ("q_ptr k_ptr v_ptr tq_ptr tk_ptr tv_ptr o_ptr to_ptr", "lse_ptr tlse_ptr",
           "sqb sqh sql skb skh skl svb svh svl stqb stqh stql stkb stkh stkl stvb stvh stvl "
           "sob soh sol s_keep H G L")  # fmt: skip
BWD_INTS = ("sqb sqh sql skb skh skl svb svh svl sgb sgh sgl stqb stqh stql stkb stkh stkl "
            "stvb stvh stvl stgb stgh stgl s_keep H G L")  # fmt: skip
BWD_ROWS = "lse_ptr delta_ptr tlse_ptr tdelta_ptr"
BWD_IN = "q_ptr k_ptr v_ptr go_ptr tq_ptr tk_ptr tv_ptr tgo_ptr "
KV_SIG = (BWD_IN + "gk_ptr gv_ptr tgk_ptr tgv_ptr", BWD_ROWS, BWD_INTS)
Q_SIG = (BWD_IN + "gq_ptr tgq_ptr", BWD_ROWS, BWD_INTS)
MASKS = [(False, False, True), (True, True, False)]  # (keep, causal, even)


def _checked(kernel, what: str, dtype: str) -> None:
    if dtype != "fp32" and "wgmma" not in kernel.asm["ptx"]:
        raise RuntimeError(f"attention {what} {dtype}: no wgmma (Hopper's matrix unit)")


def _registers(kernel) -> tuple[int, int]:
    """(registers, local-memory bytes: spills) of a compiled kernel, read from its cubin by
    cuobjdump (Triton's own, else the toolkit's; (0, 0) with neither)."""
    import re
    import shutil
    import subprocess
    import tempfile

    own = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = own if os.path.exists(own) else shutil.which("cuobjdump")
    if tool is None:
        return 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    regs = max(int(r) for r in re.findall(r"REG:(\d+)", out))
    local = max(int(b) for b in re.findall(r"LOCAL:(\d+)", out))
    return regs, local


def attention(dtype: str, d: int) -> None:
    """The forward as scoring runs it (no log-sum-exp, no tangent), every block shape."""
    configs = A.FORWARD_32 if dtype == "fp32" else A.FORWARD_16
    variants = list(MASKS)
    if (dtype, d) == ("bf16", 128):  # the scoring case: every mask combination
        variants += [(True, False, True), (False, True, False)]
    for bm, bn, warps, stages in configs:
        for keep, causal, even in variants:
            const = dict(D=d, HAS_KEEP=keep, CAUSAL=causal, DOT_F32=dtype == "fp32",
                         TANGENT=False, WRITE_LSE=False, BLOCK_M=bm, BLOCK_N=bn,
                         EVEN=even)  # fmt: skip
            kernel = _compile(A._forward_kernel, _att_sig(dtype, *FWD_SIG), const, warps, stages)
            _checked(kernel, "forward", dtype)
    shapes = f"{len(configs)} block shapes x {len(variants)} variants"
    print(f"attention {dtype} head size {d}: {shapes}")


def attention_training(dtype: str, d: int, masks: list) -> None:
    """The training passes at the blocks the launchers pick: forward with and without its
    tangent, both backward kernels plain, with tangents, and tangents alone. Reported, not
    required: how many use Hopper's wgmma (blocks of fewer than 64 rows take mma), their
    registers and spills (for the first GPU run to tune against)."""
    wide, spills, wgmma = dtype == "fp32", [], 0
    for keep, causal, even in masks:
        flags = dict(D=d, HAS_KEEP=keep, CAUSAL=causal, DOT_F32=wide, EVEN=even)
        for tangent in (False, True):
            bm, bn, warps, stages = (A.FORWARD_32 if wide else A.FORWARD_16)[0]
            if tangent:
                bm, stages = min(64, bm), 2
            const = flags | dict(TANGENT=tangent, WRITE_LSE=True, BLOCK_M=bm, BLOCK_N=bn)
            kernel = _compile(A._forward_kernel, _att_sig(dtype, *FWD_SIG), const, warps, stages)
            spills.append(_registers(kernel))
            wgmma += "wgmma" in kernel.asm["ptx"]
        for tangent, primal in ((False, True), (True, True), (True, False)):
            bm, bn, warps, stages = A.backward_config(d, wide, tangent)
            const = flags | dict(TANGENT=tangent, PRIMAL=primal, HAS_TLSE=tangent,
                                 BLOCK_M=bm, BLOCK_N=bn)  # fmt: skip
            for fn, sig in ((A._backward_kv_kernel, KV_SIG), (A._backward_q_kernel, Q_SIG)):
                kernel = _compile(fn, _att_sig(dtype, *sig), const, warps, stages)
                spills.append(_registers(kernel))
                wgmma += "wgmma" in kernel.asm["ptx"]
    regs = max(r for r, _ in spills)
    spilled = max(b for _, b in spills)
    print(f"attention training {dtype} head size {d}: {len(spills)} kernels ({wgmma} on wgmma), "
          f"at most {regs} registers, {spilled} bytes spilled at most")  # fmt: skip


def cross_entropy(dtype: str) -> None:
    z = f"*{dtype}"
    block = 8192
    warps = CE._warps(block)
    _compile(
        CE._ce_forward_kernel,
        {"z_ptr": z, "stride_z": "i64", "t_ptr": "*i64", "w_ptr": "*fp32", "loss_ptr": "*fp32",
         "lse_ptr": "*fp32", "nll_ptr": "*fp32", "V": "i32", "ignore_index": "i64"},
        {"HAS_W": True, "BLOCK": block}, warps,
    )  # fmt: skip
    _compile(
        CE._ce_directional_kernel,
        {"z_ptr": z, "stride_z": "i64", "t_ptr": "*i64", "lse_ptr": "*fp32", "d_ptr": z,
         "stride_d": "i64", "ch_ptr": "*fp32", "cg_ptr": "*fp32", "dot_ptr": "*fp32",
         "out_ptr": z, "stride_o": "i64", "V": "i32", "ignore_index": "i64"},
        {"HAS_D": True, "HAS_CH": True, "HAS_CG": True, "WANT_OUT": True, "BLOCK": block}, warps,
    )  # fmt: skip
    _compile(
        CE._ce_fused_kernel,
        {"z_ptr": z, "stride_z": "i64", "t_ptr": "*i64", "c_ptr": "*fp32", "loss_ptr": "*fp32",
         "lse_ptr": "*fp32", "nll_ptr": "*fp32", "g_ptr": z, "stride_g": "i64", "V": "i32",
         "ignore_index": "i64"},
        {"BLOCK": block}, warps,
    )  # fmt: skip


def tangents() -> None:
    ty = "*bf16"
    _compile(
        TT._gelu_fwd_kernel,
        {"u_ptr": ty, "du_ptr": ty, "act_ptr": ty, "dact_ptr": ty, "g1_ptr": ty, "g2_ptr": ty,
         "n": "i32"},
        {"BLOCK": 1024},
    )  # fmt: skip
    _compile(
        TT._gelu_bwd_kernel,
        {"ga_ptr": ty, "dga_ptr": ty, "g1_ptr": ty, "g2_ptr": ty, "du_ptr": ty, "gu_ptr": ty,
         "dgu_ptr": ty, "n": "i32"},
        {"BLOCK": 1024},
    )  # fmt: skip
    for block in (16, 2048):
        warps = TT._warps(block)
        _compile(
            TT._softmax_fwd_kernel,
            {"s_ptr": ty, "ds_ptr": ty, "a_ptr": ty, "da_ptr": ty, "L": "i32", "scale": "fp32"},
            {"CAUSAL": True, "BLOCK": block}, warps,
        )  # fmt: skip
        _compile(
            TT._softmax_bwd_kernel,
            {"a_ptr": ty, "da_ptr": ty, "ga_ptr": ty, "dga_ptr": ty, "gs_ptr": ty, "dgs_ptr": ty,
             "L": "i32", "scale": "fp32"},
            {"BLOCK": block}, warps,
        )  # fmt: skip
        names = "x_ptr dx_ptr g_ptr dg_ptr b_ptr db_ptr y_ptr dy_ptr xh_ptr dxh_ptr r_ptr m_ptr"
        _compile(
            TT._layer_norm_fwd_kernel,
            {n: ty for n in names.split()} | {"D": "i32", "eps": "fp32"},
            {"BLOCK": block}, warps,
        )  # fmt: skip
        names = "gy_ptr dgy_ptr xh_ptr dxh_ptr r_ptr m_ptr g_ptr dg_ptr gx_ptr dgx_ptr"
        _compile(
            TT._layer_norm_bwd_kernel,
            {n: ty for n in names.split()} | {"part_ptr": "*fp32", "N": "i32", "D": "i32",
                                              "ROWS": "i32"},
            {"BLOCK": block}, warps,
        )  # fmt: skip


if __name__ == "__main__":
    for dtype, d in (("bf16", 128), ("fp16", 64), ("bf16", 256), ("fp32", 128)):
        attention(dtype, d)
    attention_training("bf16", 64, MASKS)
    attention_training("bf16", 128, MASKS[1:])
    attention_training("fp32", 64, MASKS[1:])
    for dtype in ("fp32", "bf16"):
        cross_entropy(dtype)
        print(f"cross-entropy {dtype}: forward, directional, fused")
    tangents()
    print("tangent ops: GELU, softmax, LayerNorm (forward and backward)")
