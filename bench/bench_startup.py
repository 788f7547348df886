"""How long light `csm` commands take to start: `csm voice list`, `csm --help`, `import csm`, and a refused
`csm say` (a missing --voice), for one or more source trees, alternating per round (the machine is shared).

    flock /tmp/csm-bench.lock python bench/bench_startup.py --trees /work/main/src src --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "voice list": ["-m", "csm", "voice", "list"],
    "--help": ["-m", "csm", "--help"],
    "import csm": ["-c", "import csm"],
    "say --voice nobody": ["-m", "csm", "say", "Hi.", "-o", "x.wav", "--voice", "nobody", "--model", "none"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", nargs="+", default=["src"], help="PYTHONPATH of each variant (its src folder)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as voices:
        for _ in range(args.rounds):
            for tree in args.trees:
                env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "CSM_VOICES_DIR": voices}
                for name, argv in COMMANDS.items():
                    start = time.perf_counter()
                    subprocess.run([sys.executable, *argv], env=env, capture_output=True, cwd=voices)
                    times.setdefault((tree, name), []).append(time.perf_counter() - start)
    first = args.trees[0]
    for name in COMMANDS:
        row = []
        for tree in args.trees:
            median = statistics.median(times[(tree, name)])
            ratio = statistics.median(times[(first, name)]) / median
            row.append(f"{tree}: {median:.2f} s ({ratio:.1f}x)")
        print(f"{name:20s} " + "  ".join(row))


if __name__ == "__main__":
    main()
