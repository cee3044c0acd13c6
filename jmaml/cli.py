"""The ``jmaml`` command: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import sys

from jmaml import walkthrough


def _cmd_seed(args: argparse.Namespace) -> int:
    tasks = conventional = None
    if args.tasks is not None:
        tasks, conventional = walkthrough.load_tasks_json(args.tasks)
    result = walkthrough.run_walkthrough(alpha=args.alpha, beta=args.beta, theta0=args.theta0,
                                         k_max=args.k, tasks=tasks, conventional=conventional)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(walkthrough.format_walkthrough(result))
        if args.tasks is None:
            print("\nNote: the seed's prose quotes -295.32 for this meta-step; its own Eq. 20 "
                  "gives -1515.48, the value reproduced above.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jmaml", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("seed", help="the seed document's single-neuron MAML walk-through",
                       description="Reproduces the seed's worked example (float64) with the "
                                   "library and checks it against the closed forms.")
    p.add_argument("--alpha", type=float, default=0.1, help="inner rate alpha (default 0.1)")
    p.add_argument("--beta", type=float, default=0.5, help="meta rate beta (default 0.5)")
    p.add_argument("--theta0", type=float, default=1.0, help="initial theta (default 1)")
    p.add_argument("--k", type=int, default=5, help="rows k = 1..K of the dW/dtheta table (default 5)")
    p.add_argument("--tasks", metavar="FILE", default=None,
                   help='JSON file of your own tasks: {"tasks": [{"support": {"x": [...], '
                        '"y": [...]}, "query": {"x": [...], "y": [...]}}, ...], '
                        '"conventional": {"x": [...], "y": [...]} (optional)}')
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_seed)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"jmaml {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jmaml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
