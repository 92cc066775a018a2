"""Named network namespaces and ways into them: create, remove and list them (with
pyroute2.netns, which also makes /run/netns a shared mount as iproute2 does), move the
calling thread into one for a `with` block, run a function in a forked child inside one,
or start a command inside one.

* `entered(ns)` moves *the calling thread* into the namespace and back (setns(2) on the
  thread; pyroute2's pushns/popns keep one process-wide stack, which threads would
  share). Sockets, netlink sockets and BPF syscalls that resolve an ifindex
  (bpf_xdp_attach, devmap updates) made inside the block stay bound to that namespace.
* `run_in(ns, fn)` forks, enters the namespace in the child and returns fn's (picklable)
  result; `spawn_in(ns, argv)` starts a command under `nsenter --net=...`. Unlike
  `ip netns exec`, neither remounts /sys, so bpffs stays visible.

Every failure raises NetnsError (an OSError: .errno set) saying what failed.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import pickle
import select
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

if TYPE_CHECKING:
    from .netns import Netns

NETNS_DIR = "/run/netns"
_THREAD_NS = "/proc/thread-self/ns/net"


class NetnsError(OSError):
    """A namespace operation failed; str() names the operation and the cause."""

    def __init__(self, err: int, what: str):
        super().__init__(err, os.strerror(err) if err else "failed")
        self.what = what

    def __str__(self) -> str:
        return f"{self.what}: {self.strerror}"


NsLike = Union["Netns", str, None]  # None: the namespace the caller runs in


def ns_name(ns: NsLike) -> Optional[str]:
    return ns if ns is None or isinstance(ns, str) else ns.name


def ns_path(name: str) -> str:
    return name if "/" in name else os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.ismount(ns_path(name))


def list_namespaces() -> list[str]:
    return sorted(n for n in pyroute2_netns.listnetns(NETNS_DIR) if exists(n))


def _setns(target: Union[int, str], what: str) -> None:
    try:
        pyroute2_netns.setns(target, flags=0)
    except OSError as e:
        raise NetnsError(e.errno or _errno.EIO, what) from None


class nl_errors:
    """`with nl_errors("doing X"):` turns pyroute2 / OS errors into NetnsError naming X."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, tp, exc, tb):
        if exc is None or isinstance(exc, NetnsError):
            return False
        if isinstance(exc, NetlinkError):
            raise NetnsError(exc.code, self.what) from None
        if isinstance(exc, OSError):
            raise NetnsError(exc.errno or _errno.EIO, self.what) from None
        return False


def create(name: str) -> bool:
    """Create the named namespace (with lo up) unless it exists. True if created."""
    if exists(name):
        return False
    if "/" in name or not name:
        raise NetnsError(_errno.EINVAL, f"creating netns {name!r}: not a plain name")
    path = ns_path(name)
    if os.path.islink(path):
        raise NetnsError(_errno.EEXIST, f"creating netns {name}: {path} is a symlink")
    if os.path.exists(path):  # an unmounted mount point left by an interrupted run
        os.unlink(path)
    try:
        pyroute2_netns.create(path)
    except OSError as e:
        if os.path.lexists(path) and not exists(name):
            os.unlink(path)
        raise NetnsError(e.errno or _errno.EIO, f"creating netns {name}") from None
    with ipr_in(name) as ipr, nl_errors(f"bringing lo up in netns {name}"):
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return True


def remove(name: str) -> bool:
    """Unmount and delete the named namespace if it exists; its interfaces go away with
    it once nothing else holds it. True if it existed."""
    path = ns_path(name)
    if not os.path.lexists(path):
        return False
    try:
        pyroute2_netns.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise NetnsError(e.errno or _errno.EIO, f"removing netns {name} ({path})") from None
    return True


@contextlib.contextmanager
def entered(ns: NsLike) -> Iterator[None]:
    """Run the block with the calling thread in namespace `ns` (None: stay)."""
    name = ns_name(ns)
    if name is None:
        yield
        return
    try:
        target = os.open(ns_path(name), os.O_RDONLY)
    except OSError as e:
        raise NetnsError(e.errno, f"opening netns {name}") from None
    back = os.open(_THREAD_NS, os.O_RDONLY)
    try:
        _setns(target, f"entering netns {name}")
        try:
            yield
        finally:
            _setns(back, f"leaving netns {name}")
    finally:
        os.close(target)
        os.close(back)


@contextlib.contextmanager
def ipr_in(name: Optional[str]) -> Iterator[IPRoute]:
    """An rtnetlink socket (pyroute2 IPRoute) bound to namespace `name`."""
    with entered(name):
        with nl_errors(f"opening rtnetlink in netns {name or 'current'}"):
            ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def run_in(ns: NsLike, fn: Callable[..., Any], *args: Any, timeout: float = 30.0,
           **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a forked child whose network namespace is `ns`. The
    result (or the exception) comes back pickled; a hung child is killed after
    `timeout` seconds."""
    name = ns_name(ns)
    fname = getattr(fn, "__name__", repr(fn))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        code = 0
        try:
            os.close(rfd)
            if name is not None:
                _setns(ns_path(name), f"entering netns {name}")
            try:
                ok, value = True, fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - shipped to the parent
                ok, value = False, e
            try:
                payload = pickle.dumps((ok, value))
            except Exception as e:  # noqa: BLE001
                what = "result" if ok else f"exception {value!r}"
                payload = pickle.dumps((False, NetnsError(
                    _errno.EIO, f"{fname} in netns {name}: its {what} cannot be sent back "
                    f"({e})")))
            view = memoryview(payload)
            while view:
                view = view[os.write(wfd, view):]
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise NetnsError(_errno.ETIMEDOUT, f"{fname} in netns {name} ran over "
                                 f"{timeout}s")
            ready, _, _ = select.select([rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        raise NetnsError(_errno.EIO, f"{fname} in netns {name}: child died (wait status "
                         f"{status:#x})")
    ok, value = pickle.loads(data)
    if ok:
        return value
    raise value


def spawn_in(ns: NsLike, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen(argv) inside `ns` through nsenter --net (no /sys remount)."""
    name = ns_name(ns)
    cmd = list(argv) if name is None else ["nsenter", f"--net={ns_path(name)}", "--",
                                            *argv]
    try:
        return subprocess.Popen(cmd, **popen_kwargs)
    except OSError as e:
        raise NetnsError(e.errno, f"starting {argv[0]} in netns {name}") from None


def unique_name(prefix: str) -> str:
    """A namespace name unused right now: prefix + pid + counter (<= 15 chars keeps
    derived interface names legal)."""
    n = 0
    while True:
        name = f"{prefix}{os.getpid() % 100000}{n}"
        if not os.path.exists(ns_path(name)):
            return name
        n += 1
