"""``plan`` of a launcher cluster: read the YAML, check it with Ray's own schema, name
the cluster (``<cluster_name>-<first commit[:8]>``, the same in every clone), add
dvcray's additions (``config.with_additions``) and, for on-prem machines, log in to
each one and check its Ray version (``ssh.probe``). Creates nothing: ``--dry-run``
stops here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvcray_cli.clusters.launcher import config as cfg, records, ssh
from dvcray_cli.errors import ClusterError, UsageError

# Ray's provider type for machines of your own, reached over SSH.
ON_PREM = "local"
# Your own machines cost nothing idle; a cloud's do (as on AWS).
DEFAULT_IDLE_TIMEOUT_S = {ON_PREM: 0.0}
CLOUD_IDLE_TIMEOUT_S = 3600.0


@dataclass
class Check:
    """One check of the plan."""

    name: str
    ok: bool
    detail: str


@dataclass
class LauncherPlan:
    """What ``up`` would do. Nothing in it has been created."""

    config_label: str          # what the user typed (the YAML's path)
    source: str                # the YAML file
    cluster_name: str          # <cluster_name>-<first commit[:8]>
    provider: str              # provider.type
    project: str               # the project's first commit
    repo_root: str
    head_ip: str               # on-prem: the head's address ("" when the provider makes machines)
    worker_ips: list[str]
    ssh_user: str
    key_path: str
    idle_timeout_s: float
    token_path: str
    wheel_path: str
    ray_version: str
    min_workers: int
    max_workers: int
    additions: list[str]
    checks: list[Check]
    config: dict[str, Any] = field(repr=False)   # the config as it will be launched
    kind: str = "launcher"

    @property
    def on_prem(self) -> bool:
        return self.provider == ON_PREM


def plan(config: str, cwd: Path, idle_timeout_s: float | None = None, probe: bool = True) -> LauncherPlan:
    """Everything ``up`` would do, checked. Creates nothing; for on-prem machines it
    logs in to each one (read-only) unless ``probe`` is False.

    Raises:
        UsageError: the file, its YAML or Ray's schema refuse it, the key file is
            missing, or ``cwd`` is not in a git repository with a commit.
        ClusterError: a machine cannot be reached, refuses the key, or runs
            another Ray version than this client.
    """
    from importlib.metadata import version

    from dvcray_cli import __version__
    from dvcray_cli.clusters.launcher import wheel

    source = Path(config.strip()).expanduser()
    if not source.is_file():
        raise UsageError(f"No cluster config at {source}.", "Pass the path of a Ray cluster YAML.")
    raw = cfg.read_yaml(source)
    provider = cfg.provider_type(raw)
    if provider == "fake_multinode":
        raise UsageError(f"{source}: the fake_multinode provider runs only as the built-in cluster.",
                         "Use: dvcray cluster up local-multinode")
    repo_root, project = _project(cwd)
    name = cfg.check_name(f"{str(raw.get('cluster_name') or 'default')[:51]}-{project[:8]}")
    raw = {**raw, "cluster_name": name}
    prepared = cfg.validate_with_ray(raw, source)
    auth = prepared.get("auth") or {}
    key = str(auth.get("ssh_private_key") or "")
    if not key:
        raise UsageError(f"{source}: auth.ssh_private_key is not set.",
                         "dvcray reaches the head over SSH with that key: name it in the config's auth section.")
    if not Path(key).expanduser().is_file():
        raise UsageError(f"{source}: the SSH key {key} (auth.ssh_private_key) does not exist.",
                         "Point auth.ssh_private_key at the private key the machines accept.")
    idle = DEFAULT_IDLE_TIMEOUT_S.get(provider, CLOUD_IDLE_TIMEOUT_S) if idle_timeout_s is None \
        else float(idle_timeout_s)
    ray_version = version("ray")
    # dvcray's additions go into the config as written (Ray merges setup_commands into the
    # head's and workers' own when it prepares a config), with Ray's default start commands
    # filled in where the config has none, so that they get token auth too.
    base = {**raw, **{key: prepared[key] for key in ("head_start_ray_commands", "worker_start_ray_commands")}}
    launched = cfg.with_additions(base, token_path=str(records.token_path(name)),
                                  wheel_path=str(wheel.default_path()), ray_version=ray_version,
                                  dvcray_version=__version__, idle_timeout_s=idle)
    cfg.validate_with_ray(launched, source)
    provider_config = prepared["provider"]
    head_ip = str(provider_config.get("head_ip") or "") if provider == ON_PREM else ""
    workers = [str(ip) for ip in provider_config.get("worker_ips") or []] if provider == ON_PREM else []
    types = prepared.get("available_node_types") or {}
    head_type = prepared.get("head_node_type")
    # On-prem, Ray's one node type serves the head and the workers alike.
    min_workers = sum(int(t.get("min_workers") or 0) for n, t in types.items()
                      if n != head_type or provider == ON_PREM)
    p = LauncherPlan(config_label=config.strip(), source=str(source.resolve()), cluster_name=name,
                     provider=provider, project=project, repo_root=str(repo_root), head_ip=head_ip,
                     worker_ips=workers, ssh_user=str(auth.get("ssh_user") or ""), key_path=key,
                     idle_timeout_s=idle, token_path=str(records.token_path(name)),
                     wheel_path=str(wheel.default_path()), ray_version=ray_version, min_workers=min_workers,
                     max_workers=int(prepared.get("max_workers") or 0), additions=cfg.additions_summary(launched),
                     checks=[], config=launched)
    if probe and p.on_prem:
        p.checks = check_machines(p)
    return p


def _project(cwd: Path) -> tuple[Path, str]:
    from dvcray_cli.gitutil import git_root, root_commit

    root = git_root(Path(cwd))
    if root is None:
        raise UsageError(f"{cwd} is not inside a git repository.",
                         "Run `dvcray cluster up` from inside your project: the cluster belongs to it.")
    first = root_commit(root)
    if not first:
        raise UsageError(f"The git repository at {root} has no commit yet.",
                         "Commit once (git commit): clusters are named after the project's first commit.")
    return root, first


def check_machines(p: LauncherPlan) -> list[Check]:
    """Log in to every machine (read-only) and check the Ray version its login shell has.

    Raises:
        ClusterError: a machine is unreachable, refuses the key, or runs another Ray.
    """
    nodes = [(p.head_ip, "head")] + [(ip, "worker") for ip in p.worker_ips]
    # Every node's host key is pinned in the cluster's own file on first contact, and checked after.
    found = ssh.probe_all(nodes, p.ssh_user, p.key_path, records.known_hosts_path(p.cluster_name))
    checks = []
    for probe in found:
        where = f"{probe.role} {probe.host}"
        if probe.auth_refused:
            raise ClusterError(f"The {where} refused the SSH key {p.key_path} for user {p.ssh_user!r}: "
                               f"{probe.error}", "Fix auth.ssh_user / auth.ssh_private_key, or add the key's public "
                               "half to that machine's ~/.ssh/authorized_keys. Nothing was started.")
        if not probe.reachable:
            raise ClusterError(f"Cannot reach the {where} over SSH: {probe.error}",
                               "Check the address in the config, that the machine is on and that sshd runs "
                               "there. Nothing was started.")
        if probe.ray_version and probe.ray_version != p.ray_version:
            raise ClusterError(f"The {where} runs Ray {probe.ray_version} (Python {probe.python_version}); this "
                               f"client runs Ray {p.ray_version}. Ray needs the same version on every node and "
                               "the client.", f"Install ray=={p.ray_version} there (or in setup_commands), or "
                               f"use Ray {probe.ray_version} here. Nothing was started.")
        if probe.ray_version:
            checks.append(Check(where, True, f"SSH ok, Ray {probe.ray_version}, Python {probe.python_version}"))
        else:
            checks.append(Check(where, False, "SSH ok, no Python with Ray in its login shell yet: the config's "
                                              f"setup_commands must install ray=={p.ray_version}"))
    return checks
