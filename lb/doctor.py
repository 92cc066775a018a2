"""`xdplb doctor [--config PATH]`: this node against the known XDP traps, as a table of
check, ok/warn/fail and what to do. Run it where the daemon runs (its network namespace).
Exit 1 when a check fails (XDP would not work, or would work wrongly); warnings are
slower or riskier set-ups that still forward.

Each check is a function of a `Node` (what it reads of the kernel, so tests can point it
elsewhere, lb/doctornode.py) returning Findings; one that cannot read what it needs says so
as a warning. The checks of interfaces are lb/linkchecks.py, the rest lb/hostchecks.py."""

from __future__ import annotations

from .config import Config
from .doctornode import FAIL, Finding, Node
from .hostchecks import (check_announce, check_bpffs, check_caps, check_clock, check_jit,
                         check_memlock, check_nexthops, check_pin_path)
from .linkchecks import (check_mtu, check_offloads, check_rx_queues, check_veth_checksum,
                         check_veth_peer, check_xdp_mode)

CHECKS = (check_caps, check_xdp_mode, check_offloads, check_mtu, check_veth_peer,
          check_veth_checksum, check_rx_queues, check_bpffs, check_pin_path, check_jit,
          check_nexthops, check_clock, check_memlock, check_announce)


def run_checks(node: Node) -> list[Finding]:
    return [f for check in CHECKS for f in check(node)]


def render(findings: list[Finding]) -> str:
    width = max(len(f.check) for f in findings)
    return "\n".join(f"{f.check:<{width}}  {f.status:<4}  {f.detail}" for f in findings)


def main(cfg: Config) -> int:
    findings = run_checks(Node(cfg))
    print(render(findings))
    return 1 if any(f.status == FAIL for f in findings) else 0
