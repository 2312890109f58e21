"""One submitted run, to its end: its live updates relayed home (and to DVC Studio where
the project posts there), its log followed, the experiment brought home.

``dvcray run`` submits (``submit.submit``) and calls ``follow``; many experiments at
once (a sweep, DVC's queue) go through ``sweep.Sweep``, which does the same for each.
"""

from __future__ import annotations

from typing import Callable

from dvcray_cli.errors import Interrupted
from dvcray_cli.runs import live
from dvcray_cli.runs.finish import finish
from dvcray_cli.runs.model import Outcome
from dvcray_cli.runs.submit import Submitted


def follow(sub: Submitted, emit: Callable[[str], None],
           on_progress: Callable[[str, live.Progress], None] | None = None, apply: bool = False,
           force: bool = False, say: Callable[[str], None] = lambda m: None) -> Outcome:
    """Follow run ``sub`` to its end and bring it home.

    Args:
        emit: the run's log, as it comes.
        on_progress: ``(run_id, progress)``: its latest DVCLive step.
        apply: also fetch its outputs and ``dvc exp apply`` it.
        force: replace an experiment of the same name here.
        say: a message for the person (how to find the run when following it failed).

    Returns:
        How it ended (``finish.raise_for`` gives the error its exit code comes from).

    Raises:
        Interrupted: Ctrl-C (or SIGTERM): the run was stopped once it had saved its work.
        ClusterError, StoreError: following or bringing it home failed; the run goes on.
    """
    try:
        with live.relayed(sub.store, sub.project, {sub.run_id: (sub.baseline, sub.exp_name)}, on_progress):
            state = sub.backend.follow(sub.run_id, emit)
        outcome = finish(sub, state, apply=apply, force=force)
        sub.backend.tidy(sub.store)
    except (KeyboardInterrupt, Interrupted):
        raise
    except Exception:
        # Whatever went wrong here, the run is the cluster's: say how to find it and bring it home.
        say(f"Run {sub.run_id} is not lost: dvcray logs {sub.run_id} --follow shows it; once it has "
            f"ended, dvcray pull {sub.run_id} brings it home.")
        raise
    return outcome
