"""Batch-1 kernels compiled for sm_90 on a machine without a GPU: registers, stack and local
memory of each (cuobjdump), its whole shared memory (static, pipelined loads' buffers, Gluon's
allocations: what must be free on a multiprocessor for a program to be resident), and the
SASS written next to ``--sass DIR`` for reading what sits after the PDL wait (``ACQBULK``): the
rule in docs/persistent-decode.md.

    .venv/bin/python scripts/sm90_resources.py [--sass /tmp/sass]

Triton's wheel carries ptxas, cuobjdump and nvdisasm; ``triton.compile`` with a CUDA target
needs no device. Integer arguments other than counts are marked divisible by 16 as a real
launch specialises them (without it the loads compile scalar and the figures are wrong).
Qwen3-30B-A3B's batch-1 shapes and tiles (triton_moe._tiles(8)); add a kernel as ``KERNELS``
shows.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moebius.model import (  # noqa: E402
    gluon_gemv,
    triton_attention,
    triton_gemv,
    triton_moe,
    triton_norm,
)

NOT_DIVISIBLE = {"M", "T", "R", "t", "eps"}
BIN = glob.glob(os.path.dirname(triton.__file__) + "/backends/nvidia/bin")[0]


def compile_sm90(fn, types: dict, consts: dict, warps: int, stages: int):
    """Compile ``fn``: ``types`` the pointer/float arguments' Triton types (the rest i32),
    ``consts`` its constexprs."""
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] not in ("constexpr", "fp32") and n not in NOT_DIVISIBLE
             and not sig[n].startswith("tensordesc")
             and not n.startswith("stride_t")}
    source = GluonASTSource if getattr(fn, "is_gluon", lambda: False)() else ASTSource
    src = source(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def _w13(fold: bool):
    types = {n: "*bf16" for n in ("X", "W", "A", "O", "norm_w", "Xres", "X_in", "route_w")}
    types.update(sorted_rows="*i32", block_piece="*i32", ids="*i64", eps="fp32",
                 logits="*fp32" if fold else "*bf16", share="*fp32")
    consts = dict(TOPK=8, BM=16, BN=64, BK=128, ONE=True, K_PAD=8, E_PAD=128, RENORM=True,
                  ROWS=triton_moe.TOPK_ROWS, FOLD=fold, BLOCK_H=2048,
                  SHARE_ROWS=4 if fold else 1, PDL=True)
    return triton_moe._w13_kernel, types, consts, 4, 4


def _w2():
    types = dict(A="*bf16", W="*bf16", Y="*bf16", sorted_rows="*i32", block_piece="*i32",
                 ids="*i64", route_w="*fp32")
    return triton_moe._w2_kernel, types, dict(BM=16, BN=64, BK=128, ONE=True, PDL=True), 4, 4


def _attention_split():
    types = dict(Q="*bf16", K="*bf16", V="*bf16", Mid="*fp32", Lse="*fp32", O="*bf16",
                 tables="*i64", ctx_lens="*i64", scale="fp32")
    consts = dict(GROUP=8, GROUP_PAD=16, BS=16, D=128, TILE_N=triton_attention.TILE, S=64,
                  IEEE=False, PDL=True)
    return triton_attention._decode_split_kernel, types, consts, 4, 3


def _attention_merge():
    types = dict(Mid="*fp32", Lse="*fp32", O="*bf16", ctx_lens="*i64")
    consts = dict(S=64, S_PAD=64, UNIT=triton_attention.TILE, DT=128, PDL=True)
    return triton_attention._merge_kernel, types, consts, 4, 3


def _gemv(split: int):
    types = dict(X="*bf16", W="*bf16", Y="*bf16", Extra="*bf16", YExtra="*fp32")
    consts = dict(BN=4, BK=4096, SPLIT=split, BKE=1024, PDL=True)
    return triton_gemv._gemv_kernel, types, consts, triton_gemv.WARPS, 3


def _norm_route(on_residual: bool):
    types = {n: "*bf16" for n in ("X", "Parts", "RowW", "W", "Xout", "Out", "Router")}
    types.update(Index="*i32", Logits="*fp32" if on_residual else "*bf16", eps="fp32")
    consts = dict(HAS_PARTS=True, GATHER=False, R_PAD=8 if on_residual else 1, BLOCK_H=2048,
                  BE=8, ON_RESIDUAL=on_residual, PDL=True)
    return triton_norm._add_rms_norm_route_kernel, types, consts, 8, 3


def _gemv_smem(nr: int, nc: int, tokens: int = 1):
    box = f"tensordesc<bf16[{gluon_gemv.BR}, {gluon_gemv.BC}],{gluon_gemv._box_layout()!r}>"
    types = dict(w_desc=box, X="*bf16", Y="*bf16")
    consts = dict(NR=nr, NC=nc, TP=tokens, PDL=True)
    return gluon_gemv._gemv_smem_kernel, types, consts, gluon_gemv.WARPS, 1


KERNELS = {
    "gate/up, one token": _w13(False),
    "gate/up, one token, router fold": _w13(True),
    "down, one token": _w2(),
    "attention split (64 splits)": _attention_split(),
    "attention merge": _attention_merge(),
    "o GEMV": _gemv(0),
    "o GEMV + split router share": _gemv(4),
    "q/k/v GEMV, shared memory (40 x 2048)": _gemv_smem(5, 8),
    "o GEMV, shared memory (16 x 4096)": _gemv_smem(2, 16),
    "q/k/v GEMV, shared memory, 8 tokens": _gemv_smem(5, 8, 8),
    "add + norm + router": _norm_route(False),
    "input add + norm + residual share": _norm_route(True),
}


def resources(name: str, sass_dir: str | None = None) -> dict:
    """KERNELS[name] compiled for sm_90: registers, stack, local memory (cuobjdump), whole
    shared memory; its SASS written to ``sass_dir`` if given."""
    fn, types, consts, warps, stages = KERNELS[name]
    k = compile_sm90(fn, types, consts, warps, stages)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(k.asm["cubin"])
        usage = subprocess.run([BIN + "/cuobjdump", "--dump-resource-usage", cubin],
                               capture_output=True, text=True).stdout
        if sass_dir:
            os.makedirs(sass_dir, exist_ok=True)
            sass = subprocess.run([BIN + "/nvdisasm", "-c", cubin], capture_output=True,
                                  text=True).stdout
            Path(sass_dir, re.sub(r"\W+", "_", name).strip("_") + ".sass").write_text(sass)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert m, usage[-300:]
    return dict(warps=warps, registers=int(m[1]), stack=int(m[2]), local=int(m[3]),
                shared=k.metadata.shared)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sass", help="a folder for each kernel's SASS")
    args = ap.parse_args()
    for name in KERNELS:
        r = resources(name, args.sass)
        print(f"{name:38s} {r['warps']:2d} warps  {r['registers']:3d} registers  stack "
              f"{r['stack']}  local {r['local']}  shared {r['shared']}")


if __name__ == "__main__":
    main()
