"""Where a case's time goes, by instruction and source line: `python -m bench profile`.

One case runs in a loop (a `bench cost` case through BPF_PROG_TEST_RUN, or a live-frames
case of `bench pktgen`) while `perf record -e cpu-clock` samples the CPU it runs on
(cpu-clock: this VM has no hardware counters). The loaded xdplb program's JIT image,
functions and BTF line records are read while it is loaded (bench/proginfo.py); each
sample inside it is charged to one instruction and that instruction's source line.

Which instruction. A cpu-clock sample's IP is where the CPU resumes after the timer
interrupt: the instruction after the one that was executing (or stalled), so a sample
blames the instruction that ends at its IP. Samples outside the program (helpers such as
bpf_xdp_adjust_head, the bench wrapper, the kernel's XDP path) are counted per kernel
symbol, apart.

Not part of `make bench`: a diagnostic, its numbers are sample shares, not costs.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Callable, Optional

from . import publish
from .cost import CostBench, machine_info, make_cases, pick_cpu
from .proginfo import ProfileError, ProgImage, read_prog

FREQ = 20_000                 # samples per second (cpu-clock)
# A SYN case makes a new flow per run: as many as bench cost's default run makes (7 rounds
# of 100,000 + 10,000 to warm up), into a table of its size (four slots per flow), so the
# profile sees the table as that run does; the case stops when they are used (~0.5 s).
SYN_FLOWS = 7 * 100_000 + 10_000


# --- perf --------------------------------------------------------------------------------
class Perf:
    """`perf record -e cpu-clock` on some CPUs for up to `seconds` (or until stop())."""

    def __init__(self, cpus: list, seconds: float, path: str):
        self.path, self.seconds = path, seconds
        if shutil.which("perf") is None:
            raise ProfileError("bench profile: perf not found: install linux-perf "
                               "(make deps)")
        cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQ),
               "-C", ",".join(map(str, cpus)), "-o", path, "--", "sleep", str(seconds)]
        # perf itself on the other CPUs (the caller may be pinned to a profiled one)
        others = set(range(os.cpu_count() or 1)) - set(cpus)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=(lambda: os.sched_setaffinity(
                                         0, others)) if others else None)
        self.t0 = time.monotonic()

    def wait_started(self, timeout: float = 30.0) -> None:
        """Until perf runs its workload (`sleep`): it samples from then on. Its setup
        (reading every process's maps) takes a second or more here."""
        kids = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        end = time.monotonic() + timeout
        while self.running() and time.monotonic() < end:
            try:
                with open(kids) as f:
                    for pid in f.read().split():
                        with open(f"/proc/{pid}/comm") as c:
                            if c.read().strip() == "sleep":
                                self.t0 = time.monotonic()
                                return
            except OSError:
                return  # no children file: go on, the first samples may be missed
            time.sleep(0.02)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> float:
        """Ends the recording (early if still running); seconds recorded."""
        seconds = min(time.monotonic() - self.t0, self.seconds)
        stopped = self.running()
        if stopped:  # perf ends its workload and writes its file (its exit status varies)
            self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate()
        written = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if not written or (self.proc.returncode and not stopped):
            line = next((x for x in err.splitlines() if x.strip()), "no output")
            if "paranoid" in err or "ermission" in err or "not permitted" in err:
                raise ProfileError("bench profile: perf may not sample the CPU: run as "
                                   "root or lower kernel.perf_event_paranoid (sysctl)")
            raise ProfileError(f"bench profile: perf record failed: {line.strip()}; "
                               f"check `perf record -e cpu-clock -a -- sleep 1` works here")
        return seconds

    def samples(self) -> list:
        """[(ip, symbol)] of every sample, symbol as perf names it ('' if unknown)."""
        out = subprocess.run(["perf", "script", "-i", self.path, "-F", "ip,sym"],
                             capture_output=True, text=True).stdout
        rows = []
        for row in out.splitlines():
            parts = row.split(None, 1)
            try:
                ip = int(parts[0], 16)
            except (IndexError, ValueError):
                continue
            rows.append((ip, parts[1].strip() if len(parts) > 1 else ""))
        return rows


def _outside_name(sym: str) -> str:
    """perf's bpf_prog_<tag>_<name> -> '<name> (bpf)'; kernel symbols as they are."""
    if sym.startswith("bpf_prog_") and sym.count("_") >= 3:
        return sym.split("_", 3)[3] + " (bpf)"
    return sym or "[unknown]"


# --- attribution ------------------------------------------------------------------------
def _line_text(prog: ProgImage, func, line) -> str:
    """A record's source text; line 0 (code the compiler made, no source line of its
    own) names the closest real line before it instead."""
    if line.line:
        return line.text
    near = prog.known_line_before(func, line.addr)
    return f"(no source line; after {near.where}: {near.text})" if near else "(no source line)"


def attribute(prog: ProgImage, samples: list, top: int) -> dict:
    """Samples -> rows per blamed instruction, per source line, and outside the program."""
    by_insn: collections.Counter = collections.Counter()
    by_line: collections.Counter = collections.Counter()
    by_func: collections.Counter = collections.Counter()
    outside: collections.Counter = collections.Counter()
    detail: dict = {}
    texts: dict = {}
    in_prog = resolved = 0
    for ip, sym in samples:
        hit = prog.locate(ip)
        if hit is None:
            outside[_outside_name(sym)] += 1
            continue
        func, off = hit
        in_prog += 1
        by_func[func.name] += 1
        insn = func.insn_before(off)
        at = insn.off if insn is not None else off
        line = prog.line_at(func, func.addr + at)
        key = (func.name, at)
        by_insn[key] += 1
        if key not in detail:
            text = insn.text if insn is not None else f"(entry: the call into {func.name})"
            detail[key] = (text, line)
        if line is not None:
            resolved += 1
            by_line[line.where] += 1
            texts[line.where] = _line_text(prog, func, line)

    def pct(n: int) -> float:
        return round(100.0 * n / in_prog, 2) if in_prog else 0.0

    func_of = {f.name: f for f in prog.funcs}
    insn_rows = []
    for (fname, at), n in by_insn.most_common(top):
        text, line = detail[(fname, at)]
        insn_rows.append({"pct": pct(n), "samples": n, "func": fname, "offset": at,
                          "insn": text, "source": line.where if line else None,
                          "line": _line_text(prog, func_of[fname], line) if line else None})
    line_rows = [{"pct": pct(n), "samples": n, "source": w, "line": texts[w]}
                 for w, n in by_line.most_common(top)]
    total = len(samples)
    return {"samples_total": total, "samples_in_program": in_prog,
            "samples_with_source_line": resolved,
            "program_share_pct": round(100.0 * in_prog / total, 2) if total else 0.0,
            "by_function": [{"func": f, "samples": n, "pct": pct(n)}
                            for f, n in by_func.most_common()],
            "by_instruction": insn_rows, "by_line": line_rows,
            "outside": [{"symbol": s, "samples": n,
                         "pct_of_all": round(100.0 * n / total, 2)}
                        for s, n in outside.most_common(top)]}


# --- running a case -----------------------------------------------------------------------
def _record(cpus: list, seconds: float, prog_fd: int, step: Callable[[], bool]) -> tuple:
    """Program info, then perf while step() runs the case; step() -> False: stop early.
    Returns (ProgImage, samples, seconds recorded)."""
    prog = read_prog(prog_fd)  # before anything can unload it
    with tempfile.TemporaryDirectory(prefix="xdplb-prof-") as tmp:
        perf = Perf(cpus, seconds, os.path.join(tmp, "perf.data"))
        try:
            perf.wait_started()
            while perf.running() and step():
                pass
        finally:
            recorded = perf.stop()
        return prog, perf.samples(), recorded


def profile_cost_case(name: str, seconds: float, cpu: Optional[int]) -> dict:
    """A `bench cost` case in a loop on its CPU (bench cost's default: the last one)."""
    case = next((c for c in make_cases() if c.name == name), None)
    if case is None:
        raise ProfileError(f"bench profile: unknown case {name!r}: one of "
                           f"{', '.join(c.name for c in make_cases())}")
    cpu = pick_cpu(cpu)
    warm = 10_000
    budget = SYN_FLOWS - warm if case.syn else 0
    table = 4 * (SYN_FLOWS + 1024)  # every case: as in a default `bench cost` run
    chunk = 20_000 if case.syn else 100_000
    done = {"runs": 0}
    old_aff = os.sched_getaffinity(0)
    with CostBench(flow_table_size=table) as cb:
        cb.set_encap(case.encap, case.insert_limit, case.mtu)
        if case.warm:
            cb.set_template(case.warm)
            cb.run("lb", case.warm, 1)
        frame = case.frame  # a new bench object: its run counter, so its flows, are new
        cb.set_template(frame, case.syn)
        if case.prewarm:
            cb.run("lb", frame, 1)

        def step() -> bool:
            if case.syn and done["runs"] + chunk > budget:
                return False
            _, d, _ = cb.run("lb", frame, chunk)
            for k, v in d.items():
                done[k] = done.get(k, 0) + v
            return True

        os.sched_setaffinity(0, {cpu})
        try:
            cb.run("lb", frame, warm)  # JIT image and caches warm
            prog, samples, recorded = _record([cpu], seconds, cb.dp.prog_fd, step)
        finally:
            os.sched_setaffinity(0, old_aff)
    runs, short = done["runs"], case.slack * (done["runs"] // chunk)
    ok = runs > 0 and all(runs - short <= done.get(k, 0) <= runs for k in case.expect) \
        and not any(done.get(k, 0) for k in case.zero)
    return {"case": name, "kind": "cost", "cpus": [cpu], "prog": prog,
            "samples": samples, "seconds": recorded, "runs": runs,
            "path_ok": ok, "machine": machine_info(cpu)}


def profile_pktgen_case(name: str, seconds: float) -> dict:
    """A live-frames case of `bench pktgen` (its namespaces: hold the test lock)."""
    from .pktgen import make_cases as pktgen_cases
    from .pktlab import PktLab
    from .runner import LbSetup, Runner, lb_vips, pick_cpus

    ncpu = len(os.sched_getaffinity(0))
    case = next((c for c in pktgen_cases(all_cores=ncpu) if c.name == name), None)
    if case is None:
        raise ProfileError(f"bench profile: unknown pktgen case {name!r}: one of "
                           f"{', '.join(c.name for c in pktgen_cases(all_cores=ncpu))}")
    cpus = pick_cpus(case.threads)
    with PktLab() as lab:
        lbs = LbSetup(lab)
        try:
            runner = Runner(lab, lbs.dp, cpus, duration=0.5)
            lbs.configure(case.encap, case.tx_mode)
            lbs.apply(lb_vips(), case.tx_mode)
            if case.traffic.new_flows:
                lbs.fill_flow_table(runner)  # as bench pktgen: every insert evicts
            fd = lbs.dp.prog_fd
            runner.warm("xdplb", fd, case.traffic)
            got: list = []

            def step() -> bool:
                got.append(runner.measure("xdplb", fd, case.traffic))
                return True

            prog, samples, recorded = _record(cpus, seconds, fd, step)
        finally:
            lbs.close()
    rx = sum(s.counts.get("rx", 0) for s in got)
    ok = rx > 0 and all(sum(s.counts.get(k, 0) for s in got) == rx for k in case.expect)
    return {"case": name, "kind": "pktgen", "cpus": cpus, "prog": prog,
            "samples": samples, "seconds": recorded, "runs": rx, "path_ok": ok,
            "machine": machine_info(cpus[0])}


def run_profile(out: Optional[str] = None, case: Optional[str] = None,
                pktgen_case: Optional[str] = None, seconds: float = 4.0,
                top: int = 15, cpu: Optional[int] = None, quiet: bool = False) -> dict:
    """Profile one case -> profile-<case>.json (pktgen cases: profile-pktgen-<case>)."""
    if (case is None) == (pktgen_case is None):
        raise ProfileError("bench profile: name one case: --case NAME (bench cost) or "
                           "--pktgen-case NAME (live frames)")
    if pktgen_case is not None:
        run = profile_pktgen_case(pktgen_case, seconds)
        label = f"pktgen-{pktgen_case}"
    else:
        run = profile_cost_case(case, seconds, cpu)
        label = case
    prog: ProgImage = run["prog"]
    doc = {"case": run["case"], "kind": run["kind"], "cpus": run["cpus"],
           "seconds": round(run["seconds"], 2), "frequency_hz": FREQ,
           "event": "cpu-clock", "packets": run["runs"], "path_ok": run["path_ok"],
           "program": {"name": prog.name, "tag": prog.tag,
                       "functions": {f.name: len(f.code) for f in prog.funcs},
                       "line_records": len(prog.lines)},
           "blame": "each sample's IP is the instruction after the one executing: the "
                    "instruction ending at the IP is charged",
           **attribute(prog, run["samples"], top),
           "machine": run["machine"]}
    publish(doc, out, f"profile-{label}", show=None if quiet else print_profile)
    return doc


def print_profile(doc: dict, path="") -> None:
    print(f"profile of {doc['kind']} case {doc['case']}: {doc['samples_total']} samples in "
          f"{doc['seconds']:.1f} s on CPU {','.join(map(str, doc['cpus']))} "
          f"({doc['event']}, {doc['frequency_hz']} Hz), {doc['packets']} packets"
          f"{'' if doc['path_ok'] else ' (PATH CHECK FAILED)'}")
    n = doc["samples_in_program"]
    print(f"in {doc['program']['name']}: {n} ({doc['program_share_pct']:.1f}%), "
          f"{doc['samples_with_source_line']} with a source line; by function: "
          + ", ".join(f"{r['func']} {r['pct']:.1f}%" for r in doc["by_function"]))
    print("\n% of the program's samples per blamed instruction (the one before the "
          "sampled IP)")
    for r in doc["by_instruction"]:
        where = f"{r['func']}+0x{r['offset']:x}"
        print(f"{r['pct']:5.1f}%  {where:18} {r['insn'][:34]:34} {r['source'] or '?':24} "
              f"{(r['line'] or '')[:60]}")
    print("\n% per source line")
    for r in doc["by_line"]:
        print(f"{r['pct']:5.1f}%  {r['source']:24} {r['line'][:80]}")
    print("\noutside the program (% of all samples)")
    for r in doc["outside"]:
        print(f"{r['pct_of_all']:5.1f}%  {r['symbol']}")
    if path:
        print(f"-> {path}")
