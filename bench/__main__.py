"""python -m bench {cost,maglev,reload,health,pktgen,iptables,fleet,summary,all,profile} [options]:
see bench/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--out", help="output directory (default bench/results)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def rounds_arg(sp, prefix=""):
        sp.add_argument(f"--{prefix}rounds", type=int, default=7,
                        help="interleaved floor/case rounds; medians are reported")

    def cost_args(sp):
        sp.add_argument("--repeat", type=int, default=500_000,
                        help="runs per BPF_PROG_TEST_RUN (hit and pass cases, floor)")
        sp.add_argument("--syn-repeat", type=int, default=100_000,
                        help="runs per BPF_PROG_TEST_RUN for tcp_syn (each a new flow)")
        rounds_arg(sp)
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

    def pktgen_args(sp, prefix=""):
        rounds_arg(sp, prefix)
        sp.add_argument(f"--{prefix}duration", type=float, default=0.5,
                        help="seconds of traffic per measurement (sizes the count)")
        sp.add_argument("--size", type=int, default=64, help="frame bytes (IPv6: >= 80)")
        sp.add_argument("--flows", type=int, default=1024, help="flows of the hit cases")
        sp.add_argument("--threads", type=int, default=1,
                        help="generator threads, one per CPU (the data path follows them)")
        sp.add_argument("--rate", type=float, default=0.0,
                        help="offered packets per second in total (0: as fast as it goes)")
        sp.add_argument("--count", type=int, default=0,
                        help="frames per measurement per thread (0: from --duration)")
        sp.add_argument("--pktgen-case", action="append", dest="pktgen_cases",
                        help="only this pktgen case (repeatable)")
        sp.add_argument("--generator", choices=("auto", "live", "pktgen"), default="auto",
                        help="kernel pktgen (/proc/net/pktgen) or live frames")

    def sweep_args(sp, prefix=""):
        sp.add_argument(f"--{prefix}services", default="1,10,100,1000,10000",
                        help="comma-separated service counts")
        sp.add_argument(f"--{prefix}rounds", type=int, default=5)
        sp.add_argument(f"--{prefix}duration", type=float, default=0.4)
        sp.add_argument("--endpoints", type=int, default=2, help="endpoints per service")
        sp.add_argument("--iptables", choices=("nft", "legacy"), default="nft",
                        help="preferred iptables backend (the other if it fails)")
        sp.add_argument("--scaling-rounds", type=int, default=11,
                        help="rounds of the side-by-side 1 vs max-services VIP scaling")

    cost_args(sub.add_parser("cost", help="per-packet cost vs the floor -> cost.json"))
    maglev_args(sub.add_parser("maglev", help="Maglev table quality -> maglev.json, .png"))
    sub.add_parser("reload", help="reload latency and memory -> reload.json")
    h = sub.add_parser("health", help="1,000 backends checked every second -> health.json")
    h.add_argument("--backends", dest="health_backends", type=int, default=1000)
    h.add_argument("--window", type=float, default=8.0,
                   help="seconds per CPU measurement window")
    h.add_argument("--rounds", dest="health_rounds", type=int, default=3,
                   help="windows per daemon run (the median is reported)")
    h.add_argument("--type", dest="health_types", action="append", choices=["tcp", "http"],
                   help="check type (repeatable; default both)")
    pktgen_args(sub.add_parser("pktgen", help="packet rates through veths vs the floor "
                               "-> pktgen.json, .png"))
    sweep_args(sub.add_parser("iptables", help="xdplb vs kube-proxy-style iptables DNAT "
                              "over 1..10,000 services -> iptables.json, .png"))
    v = sub.add_parser("vipscale", help="per-packet cost at 10,000 VIPs vs 1 -> vipscale.json")
    v.add_argument("--vip-rounds", type=int, default=5)
    f = sub.add_parser("fleet", help="3 nodes behind a BIRD router: node death, rejoin, "
                       "withdraw -> fleet.json, .png")
    f.add_argument("--fleet-rounds", type=int, default=3, help="node deaths (and rejoins)")
    sub.add_parser("summary", help="headline figures from the JSON files -> summary.json, "
                   "summary.md")
    pr = sub.add_parser("profile", help="perf samples of one case by instruction and source "
                        "line -> profile-<case>.json (not part of all)")
    pr.add_argument("--case", dest="profile_case", help="a `cost` case (e.g. tcp_syn)")
    pr.add_argument("--pktgen-case", dest="profile_pktgen_case",
                    help="a live-frames `pktgen` case (e.g. syn; hold the test lock)")
    pr.add_argument("--seconds", type=float, default=4.0, help="seconds sampled")
    pr.add_argument("--top", type=int, default=15, help="rows per table")
    pr.add_argument("--cpu", dest="profile_cpu", type=int,
                    help="CPU of a cost case (default: the last one, as cost)")
    a = sub.add_parser("all", help="every benchmark, then the summary")
    cost_args(a)
    maglev_args(a)
    pktgen_args(a, "pktgen-")
    sweep_args(a, "sweep-")
    for sp in sub.choices.values():
        sp.add_argument("--out", dest="out_sub", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = args.out_sub or args.out

    if os.geteuid() != 0 and args.cmd in ("cost", "health", "pktgen", "iptables", "vipscale",
                                          "fleet", "profile", "all"):
        print("bench: loads BPF programs: run as root", file=sys.stderr)
        return 2

    def runs(cmd: str, gap: bool = True) -> bool:
        """Whether `cmd` runs; under `all`, a blank line before its output (gap)."""
        if args.cmd not in (cmd, "all"):
            return False
        if gap and args.cmd == "all":
            print()
        return True

    def opt(prefix: str, name: str):
        """An option that `all` takes with a prefix (--pktgen-rounds), the command without."""
        return getattr(args, f"{prefix}_{name}" if args.cmd == "all" else name)

    if runs("cost", gap=False):
        from .cost import run_cost

        r = run_cost(out, args.repeat, args.syn_repeat, args.rounds, args.cpu, args.backends,
                     args.ring_size, cases=args.cases, calib_repeat=args.calib_repeat)
        if not all(c["ok"] for c in r["cases"].values()) or not r["floor"]["ok"]:
            print("bench: a case did not take the path it names (see verdicts)", file=sys.stderr)
            return 1
    if runs("vipscale"):
        from .vipscale import run_vipscale

        r = run_vipscale(out, rounds=getattr(args, "vip_rounds", 5))
        if not r["ok"]:
            print("bench: a VIP-scaling run did not take the flow-hit path", file=sys.stderr)
            return 1
    if runs("maglev"):
        from .maglev import run_maglev

        run_maglev(out, trials=args.trials, builds=args.builds, plot=not args.no_plot)
    if runs("reload", gap=False):
        from .reload import run_reload

        run_reload(out)
    rc = 0
    if runs("health"):
        from .health import run_health

        doc = run_health(out, n=getattr(args, "health_backends", 1000),
                         window=getattr(args, "window", 8.0),
                         rounds=getattr(args, "health_rounds", 3),
                         kinds=tuple(getattr(args, "health_types", None) or ("tcp", "http")))
        if not doc["every_backend_probed_within_interval"]:
            print("bench: some backend was not probed within its interval", file=sys.stderr)
            rc = 1
    if runs("pktgen"):
        from .pktgen import run_pktgen

        r = run_pktgen(out, rounds=opt("pktgen", "rounds"),
                       duration=opt("pktgen", "duration"), size=args.size,
                       flows=args.flows, threads=args.threads, rate=args.rate,
                       count=args.count, cases=args.pktgen_cases, generator=args.generator)
        if not all(c["ok"] and c["floor_ok"] for c in r["cases"].values()):
            print("bench: a pktgen case did not take the path it names", file=sys.stderr)
            rc = 1
    if runs("iptables"):
        from .iptables import run_sweep

        services = opt("sweep", "services")
        try:
            counts = tuple(int(x) for x in services.split(","))
        except ValueError:
            print(f"bench: --services {services!r}: comma-separated integers",
                  file=sys.stderr)
            return 2
        run_sweep(out, services=counts,
                  rounds=opt("sweep", "rounds"), duration=opt("sweep", "duration"),
                  endpoints=args.endpoints, variant=args.iptables,
                  scaling_rounds=args.scaling_rounds)
    if runs("fleet"):
        from .fleet import run_fleet

        doc = run_fleet(out, rounds=getattr(args, "fleet_rounds", 3))
        if not all(doc["meets_target"].values()):
            print("bench: the fleet missed a target (see fleet.json)", file=sys.stderr)
            rc = 1
    if args.cmd == "profile":
        from lb.errors import XdplbError

        from .profile import run_profile

        try:
            run_profile(out, case=args.profile_case, pktgen_case=args.profile_pktgen_case,
                        seconds=args.seconds, top=args.top, cpu=args.profile_cpu)
        except XdplbError as e:
            print(e, file=sys.stderr)
            return e.exit_code
    if runs("summary"):
        from .summary import run_summary

        run_summary(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
