"""xdplb command line. Errors a user can cause end in one line (cause and fix), with the
exit codes of the spec: 0 ok, 1 bad config / unknown VIP or backend, 2 environment,
3 no running instance."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from .errors import ConfigError, XdplbError
from .textsafe import escape

DEFAULT_CONFIGS = ("config/lb.toml", "/etc/xdplb/lb.toml")


def _default_config() -> str:
    return next((p for p in DEFAULT_CONFIGS if os.path.exists(p)), DEFAULT_CONFIGS[-1])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdplb", description="XDP layer-4 load balancer")
    p.add_argument("--config", help="config file (TOML)")
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("check", help="validate a config")
    c.add_argument("--config", dest="sub_config")
    s = sub.add_parser("stats", help="counters of the running instance")
    s.add_argument("--config", dest="sub_config")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", type=float, metavar="SECONDS")
    b = sub.add_parser("backend", help="set a backend's admin state")
    b.add_argument("action", choices=["drain", "maint", "activate"])
    b.add_argument("vip")
    b.add_argument("backend")
    b.add_argument("--config", dest="sub_config")
    e = sub.add_parser("explain", help="which backend a new flow gets")
    e.add_argument("--config", dest="sub_config")
    e.add_argument("proto", choices=["tcp", "udp"])
    e.add_argument("src")
    e.add_argument("sport", type=int)
    e.add_argument("dst")
    e.add_argument("dport", type=int)
    e.add_argument("--quic-cid", metavar="HEX", default="",
                   help="a QUIC short header's destination connection ID (quic VIPs)")
    an = sub.add_parser("announce", help="node-level maintenance of the VIP announcements")
    an.add_argument("action", choices=["status", "withdraw", "restore"])
    an.add_argument("--config", dest="sub_config")
    an.add_argument("--wait", action="store_true",
                    help="withdraw: return once no route is left and the last withdrawal "
                         "is withdraw_delay old (the routers have moved the traffic)")
    dr = sub.add_parser("doctor", help="check this node for known XDP traps")
    dr.add_argument("--config", dest="sub_config")
    lab = sub.add_parser("lab", help="demo topology of network namespaces")
    lab.add_argument("action", choices=["up", "down"])
    lab.add_argument("--variant", choices=["tx", "redirect", "fleet"], default="tx")
    return p


def _config_path(args) -> str:
    return getattr(args, "sub_config", None) or args.config or _default_config()


def _control_socket(path: str) -> str:
    from .config import load_config

    return load_config(path).lb.control_socket


def cmd_check(path: str) -> int:
    from .config import check

    ok, lines = check(path)
    for line in lines:
        print(line if ok or line.startswith(f"{path}:") else f"{escape(path)}: {line}")
    return 0 if ok else 1


def cmd_run(path: str) -> int:
    from . import log as logmod

    if logmod.peek_format(path) != "json":
        return _start(path)
    # JSON log: every line JSON, the errors that stop the start included
    log = logmod.setup("json")
    try:
        return _start(path)
    except ConfigError as e:
        for line in e.problems:
            log.error("config_invalid", error=line)
        return 1
    except XdplbError as e:
        log.error("start_failed", error=str(e))
        return e.exit_code
    except Exception:  # noqa: BLE001 - a bug, but still one JSON line
        log.exception("crashed")
        return 1


def _start(path: str) -> int:
    from . import daemon, log as logmod
    from .capacity import require_memory
    from .config import load_config

    cfg = load_config(path)
    require_memory(cfg)  # before any map is created
    return daemon.run(path, logmod.setup(cfg.lb.log_format))


def cmd_stats(path: str, as_json: bool, watch: Optional[float]) -> int:
    from .control import request
    from .stats import render_table

    sock = _control_socket(path)
    prev, prev_t = None, 0.0
    while True:
        reply = request(sock, {"cmd": "stats"})
        doc = reply["result"]
        now = time.monotonic()
        if as_json:
            print(json.dumps(doc), flush=True)
        else:
            rates = None
            if prev is not None:
                dt = now - prev_t
                old = {v["name"]: v["packets"] for v in prev["vips"]}
                rates = {v["name"]: (v["packets"] - old.get(v["name"], 0)) / dt
                         for v in doc["vips"]}
            if watch:
                print("\x1b[2J\x1b[H", end="")
            print(render_table(doc, rates), flush=True)
        if not watch:
            return 0
        prev, prev_t = doc, now
        time.sleep(watch)


def cmd_backend(path: str, action: str, vip: str, backend: str) -> int:
    from .control import request

    reply = request(_control_socket(path), {"cmd": "backend", "action": action, "vip": vip,
                                            "backend": backend})
    if not reply["ok"]:
        print(f"xdplb: {escape(reply['error'])}", file=sys.stderr)
        return reply.get("code", 1)
    print(f"{vip} {backend}: {reply['result']['state']}")
    return 0


def cmd_announce(path: str, action: str, wait: bool = False) -> int:
    from .control import request

    if wait and action != "withdraw":
        raise ConfigError([f"--wait goes with withdraw, not {action} "
                           f"(xdplb announce withdraw --wait)"])
    sock = _control_socket(path)
    reply = request(sock, {"cmd": "announce", "action": action})
    if not reply["ok"]:
        print(f"xdplb: {escape(reply['error'])}", file=sys.stderr)
        return reply.get("code", 1)
    r = reply["result"]
    if not r["configured"]:
        print("announce: not configured (no [announce] in the config)")
        return 0
    node = "withdrawn (xdplb announce restore to announce again)" if r["withdrawn"] else \
        "active"
    settling = (f"; last withdrawal settles in {r['settles_in']:.1f} s (withdraw_delay "
                f"{r['withdraw_delay']:g} s)" if r["settles_in"] > 0 else "")
    print(f"announce: {node}; routes in table {r['table']}" +
          (f"; rings held: {', '.join(r['held'])}" if r["held"] else "") + settling)
    for v in r["vips"]:
        state = "announced" if v["announced"] else f"withdrawn ({v['reason']})"
        print(f"{escape(v['name']):<16} {v['address']:<40} {escape(state)}")
    return _wait_withdrawn(sock, r) if wait else 0


def _wait_withdrawn(sock: str, r: dict) -> int:
    """`announce withdraw --wait`: until no route of ours is left and the last withdrawal
    is withdraw_delay old, saying once what it waits for. 1 when the node is announced
    again meanwhile (`announce restore`): it was not drained."""
    from .control import request

    said = ""
    while True:
        if not r["withdrawn"]:
            print("xdplb: the node was announced again (xdplb announce restore) while "
                  "waiting: not drained", file=sys.stderr)
            return 1
        left = sorted({v["address"] for v in r["vips"] if v["announced"]})
        delay, settles_in = r["withdraw_delay"], r["settles_in"]
        if left:
            kind, pause = "routes", 0.5
            what = (f"waiting for the routes of {', '.join(left)} to go (they could not "
                    f"be removed: see announce_failed in the log)")
        elif settles_in > 0:
            kind, pause = "delay", min(settles_in, 0.5)  # a restore is seen quickly
            what = (f"waiting {settles_in:.1f} s for the last withdrawal to reach the "
                    f"routers (withdraw_delay {delay:g} s)")
        else:
            print(f"drained: the last withdrawal is {delay:g} s old (withdraw_delay); the "
                  f"routers have had the time to move the traffic away")
            return 0
        if kind != said:
            print(what, flush=True)
            said = kind
        time.sleep(pause)
        r = request(sock, {"cmd": "announce", "action": "status"})["result"]


def _check_flow(a) -> None:
    """ConfigError (exit 1) naming the argument when the flow cannot exist."""
    import ipaddress

    problems, fams = [], set()
    for name in ("src", "dst"):
        try:
            fams.add(ipaddress.ip_address(getattr(a, name)).version)
        except ValueError:
            problems.append(f"{name} {escape(getattr(a, name))!s}: not an IP address")
    for name in ("sport", "dport"):
        if not 0 <= getattr(a, name) <= 65535:
            problems.append(f"{name} {getattr(a, name)}: not a port (0-65535)")
    if not problems and len(fams) > 1:
        problems.append("src and dst: one is IPv4, the other IPv6")
    if a.quic_cid:
        from .explain import parse_cid
        try:
            parse_cid(a.quic_cid)
        except ValueError as e:
            problems.append(escape(str(e)))
    if problems:
        raise ConfigError(problems)


def cmd_explain(path: str, a) -> int:
    from .adminstate import AdminStates, admin_lookup
    from .config import load_config
    from .control import NoInstance, request
    from .explain import explain_offline

    _check_flow(a)
    cfg = load_config(path)
    req = {"cmd": "explain", "proto": a.proto, "src": a.src, "sport": a.sport, "dst": a.dst,
           "dport": a.dport, "quic_cid": a.quic_cid}
    try:
        reply = request(cfg.lb.control_socket, req)
        if not reply["ok"]:
            print(f"xdplb: {escape(reply['error'])}", file=sys.stderr)
            return reply.get("code", 1)
        r = reply["result"]
    except (NoInstance, PermissionError):
        try:
            admin = AdminStates(cfg.lb.state_file)
        except XdplbError:
            admin = None
        try:
            r = explain_offline(cfg, admin_lookup(admin, cfg), a.proto, a.src, a.sport,
                                a.dst, a.dport, a.quic_cid)
        except KeyError as e:
            print(f"xdplb: {str(e).strip(chr(39))}", file=sys.stderr)
            return 1
    line = (f"{a.proto} {a.src}:{a.sport} -> {a.dst}:{a.dport}: vip {r['vip']} backend "
            f"{r['backend']} (slot {r['slot']} of {r['ring_size']}, hash {r['hash']} over "
            f"{r['hash_fields']})")
    q = r.get("quic")
    if q and q["routed_by_cid"]:
        line = (f"{a.proto} {a.src}:{a.sport} -> {a.dst}:{a.dport}: vip {r['vip']} backend "
                f"{r['backend']} (QUIC connection ID {q['cid']}: config id {q['config_id']}, "
                f"server_id {q['server_id']}; asked before the connection table)")
    elif q:
        line += f"; QUIC connection ID {q['cid']} not routed by it: {q['reason']}"
    if r.get("existing_flow_backend") and not (q and q["routed_by_cid"]):
        line += f"; an existing flow entry sends it to {r['existing_flow_backend']}"
    print(line)
    if r.get("note"):
        print(f"note: {r['note']}")
    return 0


def cmd_doctor(path: str) -> int:
    from . import doctor
    from .config import load_config

    return doctor.main(load_config(path))


def cmd_lab(action: str, variant: str) -> int:
    from .lab import topology as lab

    return lab.up(variant) if action == "up" else lab.down()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd is None:
            if not args.config:
                _parser().print_usage(sys.stderr)
                print("xdplb: give --config PATH to run the load balancer", file=sys.stderr)
                return 1
            return cmd_run(args.config)
        path = _config_path(args)
        if args.cmd == "check":
            return cmd_check(path)
        if args.cmd == "stats":
            return cmd_stats(path, args.json, args.watch)
        if args.cmd == "backend":
            return cmd_backend(path, args.action, args.vip, args.backend)
        if args.cmd == "explain":
            return cmd_explain(path, args)
        if args.cmd == "doctor":
            return cmd_doctor(path)
        if args.cmd == "announce":
            return cmd_announce(path, args.action, args.wait)
        if args.cmd == "lab":
            return cmd_lab(args.action, args.variant)
    except ConfigError as e:
        for line in e.problems:
            print(f"xdplb: {escape(line)}", file=sys.stderr)
        return 1
    except XdplbError as e:
        print(f"xdplb: {escape(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - last resort: still one line
        from .control import NoInstance

        if isinstance(e, NoInstance):
            print(f"xdplb: {e} (is `xdplb --config {_config_path(args)}` running?)",
                  file=sys.stderr)
            return 3
        if isinstance(e, PermissionError):
            print(f"xdplb: permission denied ({e.filename}): run as root", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
