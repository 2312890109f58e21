"""Imported once by the forkserver the runner service forks experiments from (``forks.py``).

Everything an experiment's runner imports, imported here once: a fork of a process
that has it costs nothing, while importing it in each fork costs seconds of CPU
(measured: 870 modules, DVC's experiment executor and queue, hydra's override
parser, networkx, pygit2, celery, ...; 1.3 s for hydra alone on this project's
2-core machine).

The forkserver ignores SIGTERM: when Ray stops the service's job it sends SIGTERM to
the whole process group, and the forkserver must stay to report how each experiment
ended while they save their work. It leaves when the service does (multiprocessing's
``alive`` pipe), and its experiments then get SIGTERM (``forks.die_with_parent``).
"""

import importlib
import signal

# Entry points of what `dvc exp run -S ...`, `dvc push` and the runner's own save
# import lazily; each pulls in the rest of its package.
MODULES = (
    "dvc.repo", "dvc.repo.experiments", "dvc.repo.experiments.run", "dvc.repo.experiments.executor.local",
    "dvc.repo.experiments.queue.workspace", "dvc.repo.experiments.queue.celery", "dvc.repo.experiments.queue.tasks",
    "dvc.repo.reproduce", "dvc.repo.push", "dvc.repo.fetch", "dvc.repo.pull", "dvc.repo.plots", "dvc.repo.metrics.show",
    "dvc.repo.params.show", "dvc.repo.index", "dvc.repo.graph", "dvc.repo.worktree", "dvc.repo.artifacts",
    "dvc.repo.datasets", "dvc.repo.brancher", "dvc.repo.stage", "dvc.cachemgr", "dvc.data_cloud", "dvc.daemon",
    "dvc.utils.hydra", "dvc.utils.studio", "dvc.utils.strictyaml", "dvc.stage.cache", "dvc.output",
    "dvc_data.index.checkout", "dvc_data.index.push", "dvc_data.index.fetch", "dvc_data.hashfile.status",
    "dvc_data.hashfile.db.local", "dvc_render.html", "dvc_render.vega", "dvc_render.plotly", "dvc_render.image",
    "dvc_studio_client.post_live_metrics", "dvc_task.proc.manager", "scmrepo.git.backend.pygit2",
    "scmrepo.git.backend.pygit2.filter", "scmrepo.git.backend.dulwich", "hydra.core.override_parser.overrides_parser",
    "hydra._internal.config_loader_impl", "hydra.compose", "hydra.initialize", "omegaconf", "networkx", "requests",
    "ruamel.yaml", "yaml", "celery", "kombu", "fsspec.implementations.memory", "flatten_dict", "shortuuid",
    "configobj", "http.server", "socketserver", "urllib.request", "logging.handlers", "logging.config",
    "dulwich.porcelain", "dvc.dirs", "dvc.repo.trie", "dvc_data.fs", "dvc_data.hashfile._progress", "netrc",
    "platformdirs", "antlr4.LL1Analyzer", "ruamel.yaml.mergevalue", "dvcray_cli.runner", "dvcray_cli.runs.live",
)

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001 - an optional part missing here is imported (or not) by the fork
        pass

signal.signal(signal.SIGTERM, signal.SIG_IGN)
