"""Work redone after a machine is lost mid-run, and how soon the run goes on, on the on-prem bed.

Runs ``tests/func/test_onprem.py -k killed_machine_mid_stage`` (machines made of namespaces:
Ray's on-prem launcher over SSH, head n0 and workers n1, n2, an S3 store on a moto server on the
bed's bridge) ``-n`` times. Each time a three-stage pipeline runs with ``--cpus-per-exp 1``; its middle stage
checkpoints every 2 s epoch in the store; after its second epoch the machine it runs on is
killed (every process at once). The test writes what it measured (``DVCRAY_BENCH_OUT``):

- stages rerun: finished stages run again by the retry (goal 0);
- epochs redone: epochs finished before the loss minus the epoch the retry resumed after
  (goal: at most one checkpoint interval, here one epoch);
- seconds from the loss to the "machine lost" line, to the retry's first line, and to the
  resumed stage's first line, as the following ``dvcray run`` printed them.

Beside it, what the same loss costs without retries (``--retries 0``: the run ends LOST and is
run again by hand): every finished stage and every finished epoch again; those figures are the
same run's counts before the loss, not a second measurement.

    python benchmarks/retry_onprem.py [-n 1]     # root, with openssh-server and rsync (as CI)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import load, write_result

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1, help="rounds (each builds a bed and a cluster: ~5 min)")
    args = parser.parse_args()
    rounds = []
    before = load()
    for i in range(args.n):
        with tempfile.TemporaryDirectory(prefix="dvcray-retry-bench-") as tmp:
            out = Path(tmp) / "measured.json"
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   str(REPO / "tests/func/test_onprem.py"), "-k",
                                   "killed_machine_mid_stage"], cwd=REPO,
                                  env={**os.environ, "DVCRAY_BENCH_OUT": str(out)}, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                raise SystemExit(f"round {i + 1} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
            rounds.append(json.loads(out.read_text()))
    after = load()

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    rows = [
        "| | dvcray (retries on, the default) | retries off, run again by hand |",
        "| --- | --- | --- |",
        f"| finished stages run again | {median('stages_rerun'):.0f} | 1 (every stage finished before the loss) |",
        f"| epochs redone | {median('epochs_redone'):.0f} (resumed after epoch {median('resumed_after_epoch'):.0f} of "
        f"{median('epochs_before_loss'):.0f} done) | {median('epochs_before_loss'):.0f} (from epoch 1) |",
        f"| loss -> \"machine lost\" line | {median('loss_to_lost_line_s'):.1f} s | (the run ends LOST, exit 3) |",
        f"| loss -> the retry's first line | {median('loss_to_retry_first_line_s'):.1f} s | by hand |",
        f"| loss -> the resumed stage's first line | {median('loss_to_stage_resumed_s'):.1f} s | by hand |",
    ]
    stages_ok = median("stages_rerun") == 0
    epochs_ok = median("epochs_redone") <= 1
    text = "\n".join([
        f"On-prem test bed (namespaces, Ray's on-prem launcher over SSH, S3 on moto), a 3-stage pipeline, "
        f"the middle stage checkpointing each 2 s epoch, its machine killed after epoch 2; "
        f"{datetime.date.today()}, {os.cpu_count()} cores, n={args.n} (medians); load average {before} before, "
        f"{after} after:",
        "",
        *rows,
        "",
        f"Goals: stages rerun 0: {'met' if stages_ok else 'NOT met'}; epochs redone at most one checkpoint "
        f"interval: {'met' if epochs_ok else 'NOT met'}.",
        "Rounds: " + "; ".join(json.dumps(r) for r in rounds),
    ])
    write_result("retry_onprem.md", text)


if __name__ == "__main__":
    main()
