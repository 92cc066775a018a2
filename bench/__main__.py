"""python -m bench {cost,maglev,reload,all} [options]: see bench/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--out", help="output directory (default bench/results)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def cost_args(sp):
        sp.add_argument("--repeat", type=int, default=500_000,
                        help="runs per BPF_PROG_TEST_RUN (hit and pass cases, floor)")
        sp.add_argument("--syn-repeat", type=int, default=100_000,
                        help="runs per BPF_PROG_TEST_RUN for tcp_syn (each a new flow)")
        sp.add_argument("--rounds", type=int, default=7,
                        help="interleaved floor/case rounds; medians are reported")
        sp.add_argument("--cpu", type=int, help="CPU to pin to (default: the last one)")
        sp.add_argument("--backends", type=int, default=100)
        sp.add_argument("--ring-size", type=int, default=65537)
        sp.add_argument("--case", action="append", dest="cases",
                        help="only this case (repeatable)")
        sp.add_argument("--calib-repeat", type=int, default=100_000,
                        help="runs per primitive-cost measurement (0: skip)")

    def maglev_args(sp):
        sp.add_argument("--trials", type=int, default=3, help="random removals per setting")
        sp.add_argument("--builds", type=int, default=5, help="timed builds per setting")
        sp.add_argument("--no-plot", action="store_true")

    cost_args(sub.add_parser("cost", help="per-packet cost vs the floor -> cost.json"))
    maglev_args(sub.add_parser("maglev", help="Maglev table quality -> maglev.json, .png"))
    sub.add_parser("reload", help="reload latency and memory -> reload.json")
    a = sub.add_parser("all", help="every benchmark")
    cost_args(a)
    maglev_args(a)
    for sp in sub.choices.values():
        sp.add_argument("--out", dest="out_sub", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = args.out_sub or args.out

    if os.geteuid() != 0 and args.cmd in ("cost", "all"):
        print("bench: loads BPF programs: run as root", file=sys.stderr)
        return 2
    if args.cmd in ("cost", "all"):
        from .cost import run_cost

        r = run_cost(out, args.repeat, args.syn_repeat, args.rounds, args.cpu, args.backends,
                     args.ring_size, cases=args.cases, calib_repeat=args.calib_repeat)
        if not all(c["ok"] for c in r["cases"].values()) or not r["floor"]["ok"]:
            print("bench: a case did not take the path it names (see verdicts)", file=sys.stderr)
            return 1
    if args.cmd in ("maglev", "all"):
        from .maglev import run_maglev

        if args.cmd == "all":
            print()
        run_maglev(out, trials=args.trials, builds=args.builds, plot=not args.no_plot)
    if args.cmd in ("reload", "all"):
        from .reload import run_reload

        run_reload(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
