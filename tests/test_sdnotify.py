"""systemd's notify protocol (lb.sdnotify) against real AF_UNIX datagram sockets: the
Notifier alone (path and abstract sockets, no-op without systemd, watchdog), then the real
daemon in a lab with NOTIFY_SOCKET pointing at the test's socket: READY=1 only once the
program is attached and the first health round is in the maps, watchdog pings, the
RELOADING=1 / READY=1 sequence of a SIGHUP, STOPPING=1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest

from lb import sdnotify
from lb.lab import topology
from lb.lab.instance import Instance, RunFiles

import daemonctl

LAB = topology.Lab(prefix="xn-")
FILES = RunFiles("sdnotify")


class Recorder:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict] = []

    def next(self, timeout: float = 20.0) -> dict:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        msg = dict(line.split("=", 1) for line in data.split("\n"))
        self.messages.append(msg)
        return msg

    def until(self, key: str, timeout: float = 20.0, skip_watchdog: bool = True) -> list[dict]:
        """Messages up to and including the first one carrying `key`, watchdog pings left
        out unless asked for."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(deadline - time.monotonic(), 0.01))
            if not (skip_watchdog and set(msg) == {"WATCHDOG"}):
                got.append(msg)
            if key in msg:
                return got

    def close(self):
        self.sock.close()


def test_status_line():
    states = {("web", "a"): "active", ("web", "b"): "down", ("dns", "a"): "active"}
    assert sdnotify.status_line(2, states) == "2 VIPs, 2/3 backends active"
    assert sdnotify.status_line(1, {}, announced=1) == "1 VIP, 0/0 backends active, 1 announced"


def test_noop_without_systemd():
    n = sdnotify.Notifier(Recorder(), lambda: "s", env={})
    assert not n.enabled and not n.send("READY=1")
    asyncio.run(asyncio.wait_for(n.serve(lambda: True), 1))  # returns at once


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_status_watchdog_reload_stopping(tmp_path, abstract):
    name = f"@xdplb-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    listener = Listener("\0" + name[1:] if abstract else name)
    log = Recorder()
    ready = {"now": False}
    n = sdnotify.Notifier(log, lambda: "1 VIP", env={"NOTIFY_SOCKET": name,
                                                      "WATCHDOG_USEC": "40000"})
    assert n.watchdog_s == 0.02

    async def main():
        task = asyncio.get_running_loop().create_task(n.serve(lambda: ready["now"]))
        await asyncio.sleep(0)
        # pings start before READY: a slow start must not be killed by the watchdog
        assert await asyncio.to_thread(listener.next) == {"WATCHDOG": "1"}
        ready["now"] = True
        msgs = await asyncio.to_thread(listener.until, "READY")
        assert msgs == [{"READY": "1", "STATUS": "1 VIP"}]
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        with n.reloading():
            pass
        msgs = await asyncio.to_thread(listener.until, "READY")
        assert [set(m) for m in msgs] == [{"RELOADING", "MONOTONIC_USEC"}, {"READY", "STATUS"}]
        assert int(msgs[0]["MONOTONIC_USEC"]) >= before
        pings = [m for m in await asyncio.to_thread(lambda: [listener.next() for _ in range(3)])]
        assert pings == [{"WATCHDOG": "1"}] * 3
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert (await asyncio.to_thread(listener.until, "STOPPING"))[-1] == {"STOPPING": "1"}

    try:
        asyncio.run(asyncio.wait_for(main(), 20))
    finally:
        listener.close()
    assert log.lines == []


def test_watchdog_for_another_pid_and_unreachable_socket(tmp_path):
    log = Recorder()
    n = sdnotify.Notifier(log, lambda: "", env={"NOTIFY_SOCKET": str(tmp_path / "gone"),
                                                 "WATCHDOG_USEC": "1000000",
                                                 "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_s is None  # the pings are for another process
    assert not n.send("READY=1") and not n.send("STATUS=x")
    assert [(lvl, ev) for lvl, ev, _ in log.lines] == [("warning", "sd_notify_failed")]


# --- the real daemon ---------------------------------------------------------------------
@pytest.fixture
def lab(tmp_path):
    FILES.clean()
    LAB.up()
    try:
        yield tmp_path
    finally:
        LAB.down()
        FILES.clean()


def test_daemon_notifies_systemd(lab):
    cfg = lab / "lb.toml"
    cfg.write_text(daemonctl.lab_config(FILES))
    listener = Listener(str(lab / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=str(lab / "notify"), WATCHDOG_USEC="200000")
    d = Instance(LAB.lb, str(cfg), str(lab / "daemon.log"), env=env)
    try:
        msgs = listener.until("READY")
        # READY comes alone (pings aside), after the attach, with the first health
        # round in the maps: every backend active (rise = 1)
        assert msgs == [{"READY": "1", "STATUS": "1 VIP, 3/3 backends active"}]
        assert d.events("datapath_attached")
        assert all(b["checks"] >= 1 and b["state"] == "active"
                   for b in d.stats()["vips"][0]["backends"])
        pings = [listener.next() for _ in range(3)]
        assert pings == [{"WATCHDOG": "1"}] * 3

        cfg.write_text(daemonctl.lab_config(FILES, backends=("10.200.0.11", "10.200.0.12")))
        mark = d.mark()
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        d.proc.send_signal(signal.SIGHUP)
        msgs = listener.until("READY")
        assert [sorted(m) for m in msgs] == [["MONOTONIC_USEC", "RELOADING"],
                                             ["READY", "STATUS"]]
        assert int(msgs[0]["MONOTONIC_USEC"]) >= before
        assert msgs[1]["STATUS"] == "1 VIP, 2/2 backends active"
        assert d.events("config_reloaded", after=mark)  # logged before READY=1 came

        d.proc.send_signal(signal.SIGTERM)
        assert listener.until("STOPPING")[-1] == {"STOPPING": "1"}
        assert d.proc.wait(10) == 0
    finally:
        d.stop()
        listener.close()
