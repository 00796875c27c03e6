"""`blocktune demo`."""

from __future__ import annotations

import argparse

__all__ = ["register_demo"]


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(a.out, a.steps)
    return 0


def register_demo(sub) -> None:
    p = sub.add_parser("demo", help="make a small model, fine-tune it, generate, export (a few minutes on a laptop)")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--steps", type=int, default=150)
    p.set_defaults(func=cmd_demo)
