"""The environment of a local cluster's processes, built on purpose (DESIGN.md, "The stage's environment").

Every process of a Ray cluster inherits the head's environment: the raylet passes it to
job drivers and workers, so a run's stage and its Ray workers see it. A local head is
started from whatever shell ran ``dvcray cluster up`` (or the first ``dvcray run``);
copied whole, that shell's ``PYTHONPATH``, virtualenv, ``CUDA_VISIBLE_DEVICES`` or
``OMP_NUM_THREADS`` would reach every later run, from any shell or clone (issue 17: a
stage imported another folder's ``src`` that way). So the head takes, by name, what a
node of this machine needs, and nothing else:

- the machine and its user: ``HOME`` (and with it ``~/.aws``, ``~/.gitconfig``, DVC's
  global config), ``USER``, ``LOGNAME``, ``SHELL``, the locale (``LANG``, ``LANGUAGE``,
  ``LC_*``), ``TZ``, the temp folder (``TMPDIR``, ``TMP``, ``TEMP``), ``XDG_*`` (where
  HOME's config and caches live), ``LD_LIBRARY_PATH`` (this machine's shared libraries,
  e.g. a CUDA install);
- ``PATH``, with the bin folder of the Python dvcray runs in first, and ``VIRTUAL_ENV``
  set to that Python's environment when it is one (jobs run ``python`` from the head's
  ``PATH``: it must be the interpreter that has dvcray and Ray);
- how this machine reaches the network: proxies (``HTTP(S)_PROXY``, ``NO_PROXY``,
  ``ALL_PROXY``, either case) and certificate bundles (``SSL_CERT_FILE``,
  ``SSL_CERT_DIR``, ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``);
- the tools' settings for this machine: Ray's own (``RAY_*``, but never an address or a
  token: the cluster's own are set), dvcray's (``DVCRAY_*``, but never the variables it
  sets for each run), DVC's machine-level ones (``DVC_NO_ANALYTICS``, its config and
  site-cache folders; never ``DVC_STUDIO_*``: the client relays Studio updates itself),
  and where git reads its config (``GIT_CONFIG_NOSYSTEM``, ``GIT_CONFIG_GLOBAL``,
  ``GIT_CONFIG_SYSTEM``; never ``GIT_AUTHOR_*``: an experiment's author comes from the
  run's manifest);
- this machine's credentials: ``AWS_*``. A cluster on this machine *is* this machine,
  run by the person who started it; its nodes' credentials are that person's (the
  ``AWS_*`` variables of the shell that started it, and ``~/.aws`` through ``HOME``), as
  an AWS node's are its instance profile. They never travel in a run (``dvcray run
  --env`` refuses them).

Anything else a run needs, it names: ``dvcray run --env NAME``, or ``env`` in
``[tool.dvcray]`` of the project's ``pyproject.toml``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

KEPT = frozenset({
    "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "DVC_NO_ANALYTICS", "DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_SITE_CACHE_DIR",
    "GIT_CONFIG_NOSYSTEM", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM",
})
KEPT_PREFIXES = ("LC_", "XDG_", "RAY_", "DVCRAY_", "AWS_")
# Of those prefixes: what names another cluster, what dvcray sets for each run itself, and
# Ray's fake-multinode switch (set for ``local-multinode`` only).
NEVER = frozenset({
    "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
    "RAY_RUNTIME_ENV_HOOK", "RAY_OVERRIDE_JOB_RUNTIME_ENV", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_FAKE_CLUSTER",
    "DVCRAY_WORKSPACE", "DVCRAY_ENV", "DVCRAY_PYTHONPATH", "DVCRAY_STORAGE_PATH", "DVCRAY_RAY_NODE",
})


def kept(name: str) -> bool:
    """Whether a variable of the starting shell is one a local node keeps."""
    return name not in NEVER and (name in KEPT or name.startswith(KEPT_PREFIXES))


def head_environment(environ: Mapping[str, str], token_file: Path, extra: Mapping[str, str] | None = None,
                     python: str = sys.executable) -> dict[str, str]:
    """The environment of a local head's processes (and so of every run's stage there).

    Args:
        environ: the starting shell's environment (``os.environ``); only what ``kept``
            names is taken.
        token_file: this cluster's auth token file.
        extra: variables set on purpose by the caller (a test's isolated ``HOME``, a
            node's own credentials); they win over ``environ``.
        python: the interpreter dvcray runs in: its bin folder goes first on ``PATH``.
    """
    env = {k: v for k, v in environ.items() if kept(k)}
    env.update(extra or {})
    bindir = str(Path(python).parent)
    env["PATH"] = os.pathsep.join(p for p in (bindir, env.get("PATH") or environ.get("PATH") or os.defpath) if p)
    if python == sys.executable and sys.prefix != sys.base_prefix:
        env.setdefault("VIRTUAL_ENV", sys.prefix)
    # Token auth on, explicitly, with this cluster's token file. Every process of the
    # cluster inherits both, drivers inside Ray Jobs included, so their plain
    # `ray.init()` authenticates. A RAY_AUTH_TOKEN meant for another cluster must not
    # override the file.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    # A DVC Studio token stays with the client, which relays runs' live updates itself
    # (runs/studio.py): no process of the cluster, runners included, ever has it.
    for var in ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN"):
        env.pop(var, None)
    return env
