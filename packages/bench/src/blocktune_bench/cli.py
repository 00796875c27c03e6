"""`blocktune demo`."""

from __future__ import annotations

import argparse

__all__ = ["register_demo"]


def cmd_demo(a: argparse.Namespace) -> int:
    if a.random:
        from .demo import run_demo

        run_demo(a.out, a.steps or 150)
    else:
        from .demo_real import run_demo

        run_demo(a.out, a.steps or 24)
    return 0


def register_demo(sub) -> None:
    p = sub.add_parser("demo", help="a real model (SmolLM2-135M-Instruct, GGUF) learns made-up facts: ask, "
                                     "fine-tune, ask again, export (a few minutes on a laptop's CPU)")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default: 24; 150 with --random)")
    p.add_argument("--random", action="store_true",
                   help="offline: a small random Llama-2 made on the spot instead of SmolLM2 (no download)")
    p.set_defaults(func=cmd_demo)
