"""What installing finmerge costs every Python start (the .pth import hook).

Measures, in one run on the same interpreter: `python -c pass` with the hook's .pth file in place
and with it moved aside (restored afterwards), as the median of N alternating runs; and the import
time of the hook itself from `python -X importtime`.

    .venv/bin/python benchmarks/bench_startup.py [--runs 40]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import time


def _wall(runs_env):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=runs_env)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    pth = os.path.join(sysconfig.get_paths()["purelib"], "finmerge-autoload.pth")
    aside = pth + ".bench-aside"
    if not os.path.isfile(pth):
        sys.exit(f"{pth} not found: install finmerge into this interpreter first")

    env = dict(os.environ)
    with_hook, without_hook = [], []
    try:
        for _ in range(args.runs):  # alternate so drift on a shared machine hits both sides
            with_hook.append(_wall(env))
            os.rename(pth, aside)
            try:
                without_hook.append(_wall(env))
            finally:
                os.rename(aside, pth)
    finally:
        if os.path.exists(aside):
            os.rename(aside, pth)

    trace = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
    hook_us = sum(int(m.group(1)) for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \|\s+finmerge\.plugins\.autoload$", trace, re.M))
    a, b = statistics.median(with_hook) * 1000, statistics.median(without_hook) * 1000
    print(f"python -c pass, median of {args.runs}: with hook {a:.1f} ms, without {b:.1f} ms, difference {a - b:+.1f} ms")
    print(f"import time of finmerge.plugins.autoload (cumulative, -X importtime): {hook_us / 1000:.2f} ms")


if __name__ == "__main__":
    main()
