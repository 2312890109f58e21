"""Runs: what ``dvcray run``, ``runs``, ``logs``, ``stop`` and ``pull`` do.

- ``model``: the records (RunState, ExpRef, Manifest, RunStatus, RunResult, RunRecord).
- ``project``: the user's git + DVC repository.
- ``snapshot``: the workspace packed to travel.
- ``placement``: where runners go (``--cpus-per-exp``).
- ``submit``: preflight and submission; ``follow``: logs, state, stop, bringing home;
  ``sweep``: many experiments followed by one client; ``history``: runs after the fact.

Clusters are reached through ``dvcray_cli.clusters`` only. Nothing heavy is imported here.
"""
