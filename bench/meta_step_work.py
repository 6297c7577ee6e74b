"""Count the work of one meta_step, mixed vs reverse: dispatched ops, operand bytes, matmul FLOPs.

Counts, not timings: they do not depend on the machine, so a CPU can say whether a mode's GPU
time could come from its FLOPs, its memory traffic or its number of kernel launches.
Operand bytes are the sizes of every non-view op's inputs and outputs (an upper bound on the
traffic: caches and fusion only lower it). Usage:

    python bench/meta_step_work.py            # the GPU bench's 17M GPT, 16 x 256, T = 1 and 2
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import datarater as dr
from datarater.models import CausalLM, Rater, preset

VIEWS = {
    "view", "t", "transpose", "permute", "_unsafe_view", "expand", "detach", "alias",
    "as_strided", "unsqueeze", "squeeze", "slice", "select", "split", "unbind", "reshape",
    "split_with_sizes", "_reshape_alias",
}  # fmt: skip
MATMULS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addmm_": (1, 2),
           "baddbmm_": (1, 2)}  # fmt: skip


class Work(TorchDispatchMode):
    """Ops, operand bytes and matmul FLOPs of everything dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.bytes, self.flops = 0, 0, 0
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops += 1
        if name in VIEWS:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        size = sum(t.numel() * t.element_size() for t in tensors)
        self.bytes += size
        self.by_op[name] += size
        if name in MATMULS:
            a, b = (args[i] for i in MATMULS[name])
            self.flops += 2 * a.numel() * b.shape[-1]
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="17m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = preset(args.size, max_seq_len=args.length)
    lm = CausalLM(cfg)
    rater = Rater(preset("toy", vocab_size=cfg.vocab_size, max_seq_len=args.length))
    opt = dr.optim.Adam(1e-3, weight_decay=0.1, clip_norm=1.0)
    state = dr.InnerState.init(lm, opt)

    def batch():
        return {"input_ids": torch.randint(0, cfg.vocab_size, (args.batch, args.length))}

    outer, work = batch(), {}
    for steps in (1, 2):
        inner = [batch() for _ in range(steps)]
        for mode in ("reverse", "mixed"):
            with Work() as w:
                dr.meta_step(rater, lm, state, inner, outer, optimizer=opt, mode=mode)
            work[mode, steps] = w
    print(f"{args.size}, {args.batch} x {args.length} tokens, per inner step (T=2 minus T=1):")
    print("| mode | ops | operand GB | matmul TFLOP |\n|---|---|---|---|")
    for mode in ("reverse", "mixed"):
        a, b = work[mode, 1], work[mode, 2]
        print(
            f"| {mode} | {b.ops - a.ops} | {(b.bytes - a.bytes) / 1e9:.1f} | "
            f"{(b.flops - a.flops) / 1e12:.3f} |"
        )


if __name__ == "__main__":
    main()
