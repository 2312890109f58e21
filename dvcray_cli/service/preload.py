"""Imported once by the forkserver the runner service forks experiments from (``forks.py``).

The forkserver ignores SIGTERM: when Ray stops the service's job it sends SIGTERM to
the whole process group, and the forkserver must stay to report how each experiment
ended while they save their work. It leaves when the service does (multiprocessing's
``alive`` pipe), and its experiments then get SIGTERM (``forks.die_with_parent``).
"""

import signal

import dvc.repo  # noqa: F401 - imported once here, shared by every fork
import dvc.repo.experiments  # noqa: F401
import dvc.repo.experiments.run  # noqa: F401

import dvcray_cli.runner  # noqa: F401

signal.signal(signal.SIGTERM, signal.SIG_IGN)
