"""Runs: what ``dvcray run``, ``queue start``, ``runs``, ``logs``, ``stop`` and ``pull`` do,
one module per operation (as DVC's ``dvc/repo/experiments/``).

- ``model``: the records (RunState, RunId, ExpRef, Manifest, RunStatus, RunResult, RunRecord).
- ``project``: the user's git + DVC repository; ``snapshot``: the workspace packed to travel;
  ``placement``: where runners go (``--cpus-per-exp``).
- ``backends``: how a run executes on its cluster (a Ray Job of its own, or the cluster's
  runner service), behind one interface; chosen once per run and named in its record.
- ``submit``: preflight and submission; ``run``: one run followed to its end; ``sweep``:
  many experiments followed by one client; ``queue``: DVC's own queue; ``finish``: a run
  brought home; ``live``/``studio``: live updates relayed home and to DVC Studio.
- ``lookup``: runs found again by id or name; ``listing`` (``dvcray runs``), ``logs``,
  ``stop``, ``pull``.

Clusters are reached through ``dvcray_cli.clusters`` only. Nothing heavy is imported here.
"""
