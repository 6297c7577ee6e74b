"""The ``datarater`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    """Meta-train a small rater on a synthetic corpus where half the sequences are noise.

    Clean sequences follow simple rules a language model can learn (counting with a random
    stride, repeated motifs); noisy ones are uniform random tokens. The held-out (outer) set is
    clean. A rater that learns anything true puts more weight on clean sequences.
    """
    import torch
    from tqdm import tqdm

    import datarater as dr
    from datarater.models import CausalLM, Rater, TransformerConfig

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    vocab, length = 64, 32
    gen = torch.Generator().manual_seed(args.seed)

    def clean(n: int) -> torch.Tensor:
        start = torch.randint(0, vocab, (n, 1), generator=gen)
        stride = torch.randint(1, 4, (n, 1), generator=gen)
        return (start + stride * torch.arange(length)) % vocab

    def noisy(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (n, length), generator=gen)

    def mixed_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        is_clean = torch.rand(n, generator=gen) < 0.5
        ids = torch.where(is_clean[:, None], clean(n), noisy(n))
        return ids, is_clean

    lm_cfg = TransformerConfig(
        vocab_size=vocab, max_seq_len=length, d_model=32, n_layers=1, n_heads=2
    )
    lm = CausalLM(lm_cfg)
    rater = Rater(
        TransformerConfig(vocab_size=vocab, max_seq_len=length, d_model=32, n_layers=1, n_heads=2)
    )
    inner_opt = dr.optim.Adam(3e-3)
    meta_opt = torch.optim.AdamW(rater.parameters(), lr=3e-3, weight_decay=0.1)
    state = dr.InnerState.init(lm, inner_opt)
    history = []
    t0 = time.time()
    for step in tqdm(range(args.steps), desc="meta-training", disable=args.quiet):
        if step % args.reset_every == 0:  # re-initialise the inner model periodically
            state = dr.InnerState.init(CausalLM(lm_cfg), inner_opt)
        inner = [{"input_ids": mixed_batch(32)[0]} for _ in range(args.inner_steps)]
        outer = {"input_ids": clean(32)}
        meta_opt.zero_grad()
        res = dr.meta_step(rater, lm, state, inner, outer, optimizer=inner_opt)
        torch.nn.utils.clip_grad_norm_(rater.parameters(), 1.0)
        meta_opt.step()
        state = res.state
        history.append(
            {"step": step, "outer_loss": res.outer_loss, "meta_grad_norm": res.meta_grad_norm}
        )

    ids, is_clean = mixed_batch(512)
    with torch.no_grad():
        scores = rater(ids)
    clean_s, noisy_s = scores[is_clean], scores[~is_clean]
    # Probability that a random clean sequence outscores a random noisy one (AUC).
    auc = float((clean_s[:, None] > noisy_s[None, :]).float().mean())
    w = torch.softmax(scores, 0)
    report = {
        "meta_steps": args.steps,
        "auc_clean_vs_noise": auc,
        "mean_weight_clean_x_batch": float(w[is_clean].mean() * len(w)),
        "mean_weight_noise_x_batch": float(w[~is_clean].mean() * len(w)),
        "first_outer_loss": history[0]["outer_loss"],
        "last_outer_loss": history[-1]["outer_loss"],
        "seconds": time.time() - t0,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "history.json").write_text(json.dumps(history))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="datarater", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="meta-train a small rater on a built-in synthetic corpus")
    demo.add_argument("--steps", type=int, default=150, help="meta-steps (default 150)")
    demo.add_argument("--inner-steps", type=int, default=2, help="inner steps T per meta-step")
    demo.add_argument("--reset-every", type=int, default=50, help="re-initialise the LM every N")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="folder for report.json and history.json")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    for name in ("steps", "inner_steps", "reset_every"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
