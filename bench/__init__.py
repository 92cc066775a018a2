"""xdplb benchmarks, run as ``python -m bench <command>`` from the repository root.

Commands (see ``python -m bench --help``):

* ``cost``   per-packet cost of the data path with BPF_PROG_TEST_RUN, as a ratio to the
             cheapest forwarding program measured the same way (bench/cost.py)
             -> results/cost.json
* ``maglev`` Maglev table quality: balance, disruption on removal, build time
             (bench/maglev.py) -> results/maglev.json, results/maglev.png
* ``reload`` reload latency and memory (bench/reload.py) -> results/reload.json
* ``pktgen`` packet rates through veths in namespaces: offered / forwarded Mpps, loss and
             Mpps per core for hit, new-flow, non-VIP, IPv6, GUE and redirect traffic,
             each against the floor of the same run (bench/pktgen.py)
             -> results/pktgen.json, results/pktgen.png
* ``iptables`` xdplb vs kube-proxy-style iptables DNAT over 1..10,000 services, and
             xdplb's cost against its VIP count (bench/iptables.py)
             -> results/iptables.json, results/iptables.png
* ``vipscale`` per-packet cost with 10,000 VIPs against 1 VIP, same flow count, measured
             like ``cost`` (bench/vipscale.py) -> results/vipscale.json
* ``fleet``  three xdplb nodes behind a BIRD router (ECMP, BFD): connections broken by a
             node's death, rejoin, graceful and health-driven withdraw, convergence time,
             spread over nodes (bench/fleet.py) -> results/fleet.json, results/fleet.png
* ``summary`` headline figures with their targets (bench/summary.py)
             -> results/summary.json, results/summary.md
* ``all``    every benchmark above, then the summary.

Everything loads real BPF programs, so it runs as root, like the tests.
"""

import json
import os
from pathlib import Path
from typing import Callable, Optional

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir(out=None) -> Path:
    """The output directory (created): `out`, or bench/results."""
    d = Path(out) if out else RESULTS_DIR
    os.makedirs(d, exist_ok=True)
    return d


def publish(doc: dict, out, name: str, plot: Optional[Callable] = None,
            show: Optional[Callable] = None) -> Path:
    """Writes `doc` to <out>/<name>.json; then plot(doc, <out>/<name>.png), whose path
    goes into doc["plot"] (not into the file), and show(doc, json path) to print it."""
    d = results_dir(out)
    path = d / f"{name}.json"
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    if plot is not None:
        doc["plot"] = str(plot(doc, d / f"{name}.png"))
    if show is not None:
        show(doc, path)
    return path


def subplots(*args, **kwargs):
    """matplotlib's (figure, axes), drawn off-screen (no display on the test machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def log_x_axes(axes, xlabel: str, legend_size: int, log_y: bool = False) -> None:
    """Axes over counts that span decades (services, backends)."""
    for a in axes:
        a.set_xscale("log")
        if log_y:
            a.set_yscale("log")
        a.set_xlabel(xlabel)
        a.grid(True, which="both" if log_y else "major", alpha=0.3)
        a.legend(fontsize=legend_size)


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
