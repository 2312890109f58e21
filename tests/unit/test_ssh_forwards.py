"""The SSH port-forwards of launcher clusters: one command builder for the job API's and
the runner service's, and which processes are a cluster's forwards (stopped with it)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from dvcray_cli.clusters.launcher import ssh


def _record(**extra):
    return SimpleNamespace(head_ip="10.0.0.10", ssh_user="ubuntu", key_path="/k", forward_port=41000,
                           forward_pid=0, known_hosts="/h/lab.known_hosts", **extra)


def test_one_command_forwards_the_job_api_or_the_service_and_pins_the_host_key():
    job = ssh.forward_command("10.0.0.10", "ubuntu", "/k", 41000, Path("/h/lab.known_hosts"))
    service = ssh.forward_command("10.0.0.10", "ubuntu", "/k", 41001, Path("/h/lab.known_hosts"), remote_port=39769)
    assert job[job.index("-L") + 1] == "127.0.0.1:41000:127.0.0.1:8265"
    assert service[service.index("-L") + 1] == "127.0.0.1:41001:127.0.0.1:39769"
    for cmd in (job, service):
        assert "StrictHostKeyChecking=accept-new" in cmd and "UserKnownHostsFile=/h/lab.known_hosts" in cmd
        assert cmd[-1] == "ubuntu@10.0.0.10" and cmd[:2] == ["ssh", "-N"]


def test_a_record_without_a_service_forward_has_none_alive():
    assert not ssh.service_forward_alive(_record())
    assert not ssh.service_forward_alive(_record(service_port=39769, service_forward_port=0, service_forward_pid=1))


def test_stopping_a_cluster_forwards_stops_those_to_its_head_with_its_pinned_key(monkeypatch):
    """A forward whose pid the record lost (two clients wrote it at once) is stopped
    too; another cluster's forward to the same head, or one to another head, is not."""
    def proc(pid, cmd):
        return SimpleNamespace(pid=pid, info={"cmdline": cmd})

    mine = ssh.forward_command("10.0.0.10", "ubuntu", "/k", 41001, Path("/h/lab.known_hosts"), remote_port=39769)
    other_cluster = ssh.forward_command("10.0.0.10", "ubuntu", "/k", 41002, Path("/h/other.known_hosts"))
    other_head = ssh.forward_command("10.0.0.11", "ubuntu", "/k", 41003, Path("/h/lab.known_hosts"))
    monkeypatch.setattr(ssh.procs, "process_iter", lambda: [
        proc(11, mine), proc(12, other_cluster), proc(13, other_head), proc(14, ["ssh", "ubuntu@10.0.0.10"]),
        proc(15, None)])
    stopped = []
    # The processes above are descriptions, not processes: record what would be stopped.
    monkeypatch.setattr(ssh.procs, "stop_pid", lambda pid, marker, timeout=5.0: stopped.append((pid, marker)))
    ssh.stop_forward(_record())
    assert stopped == [(11, "UserKnownHostsFile=/h/lab.known_hosts")]
