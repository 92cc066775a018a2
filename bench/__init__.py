"""xdplb benchmarks, run as ``python -m bench <command>`` from the repository root.

Commands (see ``python -m bench --help``):

* ``cost``   per-packet cost of the data path with BPF_PROG_TEST_RUN, as a ratio to the
             cheapest forwarding program measured the same way (bench/cost.py)
             -> results/cost.json
* ``maglev`` Maglev table quality: balance, disruption on removal, build time
             (bench/maglev.py) -> results/maglev.json, results/maglev.png
* ``all``    every benchmark above.

Everything loads real BPF programs, so it runs as root, like the tests.
"""

import os
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir(out=None) -> Path:
    """The output directory (created): `out`, or bench/results."""
    d = Path(out) if out else RESULTS_DIR
    os.makedirs(d, exist_ok=True)
    return d
