"""A reload whose apply fails with an unexpected error: the old config stays in force (cfg
and egress), one `config_rejected` line says why, and stats still covers every pair."""

from __future__ import annotations

import asyncio
import pathlib

import lb.reload
from lb import daemon
from lb.config import load_config
from lb.nexthop import Nexthops

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "config" / "lb.toml"


class Log:
    def __init__(self):
        self.lines = []

    def _add(self, level, event, **kw):
        self.lines.append((level, event, kw))

    def info(self, event, **kw):
        self._add("info", event, **kw)

    def warning(self, event, **kw):
        self._add("warning", event, **kw)

    def error(self, event, **kw):
        self._add("error", event, **kw)


class BrokenProgrammer:
    """Its first apply fails; the rollback's (the old config again) succeeds."""

    def __init__(self):
        self.failed = False

    def apply(self, *a, **kw):
        if not self.failed:
            self.failed = True
            raise RuntimeError("out of backend ids: raise the limit")

    def checkpoint(self):
        return None

    def release(self, cp):
        pass

    def rollback(self, cp):
        pass


def test_reload_that_raises_keeps_the_old_config(tmp_path, monkeypatch):
    text = CONFIG.read_text().replace('"/var/lib/xdplb/state.json"',
                                      f'"{tmp_path / "state.json"}"')
    path = tmp_path / "lb.toml"
    path.write_text(text)
    log = Log()
    d = daemon.Daemon(str(path), load_config(str(path)), log)
    old = d.cfg
    d.egress_cfg = old_egress = object()
    d.programmer = BrokenProgrammer()
    monkeypatch.setattr(d, "resolve", lambda cfg, nl=None: Nexthops())
    monkeypatch.setattr(lb.reload, "egress_config", lambda cfg, eg, ingress: object())
    monkeypatch.setattr(d.health, "configure", lambda vips: None)
    d.egress = None
    # the new file renames a VIP: its pairs are in the new cfg, not in `applied`
    path.write_text(text.replace('name = "web"', 'name = "www"'))

    async def reload():
        d._reload_lock = asyncio.Lock()
        await d.reload_async()
    asyncio.run(reload())
    assert d.cfg is old and d.egress_cfg is old_egress
    assert [(lvl, ev) for lvl, ev, _ in log.lines] == [("error", "config_rejected")]
    assert "out of backend ids" in log.lines[0][2]["error"]
    view = d.backend_view()  # nothing applied yet: every pair of cfg still shows
    assert set(view) == {(v.name, str(b.address)) for v in old.vips for b in v.backends}
