"""The runner service's protocol, without a service: who may talk to it, and where it listens."""

from __future__ import annotations

from dvcray_cli import service_api
from dvcray_cli.service.server import _resources


def test_only_the_clusters_token_is_authorized():
    assert service_api.authorized("Bearer s3cret", "s3cret")
    assert not service_api.authorized("Bearer other", "s3cret")
    assert not service_api.authorized("s3cret", "s3cret")
    assert not service_api.authorized(None, "s3cret") and not service_api.authorized("", "s3cret")


def test_the_proof_depends_on_the_token_the_nonce_and_the_service():
    proof = service_api.proof("tok", "nonce-1", "dvcray-service-1")
    assert proof == service_api.proof("tok", "nonce-1", "dvcray-service-1")
    assert proof != service_api.proof("other", "nonce-1", "dvcray-service-1")
    assert proof != service_api.proof("tok", "nonce-2", "dvcray-service-1")
    assert proof != service_api.proof("tok", "nonce-1", "dvcray-service-2")
    assert "tok" not in proof


def test_the_port_comes_from_the_services_job_log():
    log = ("Running entrypoint for job dvcray-service-ab12: python -m dvcray_cli.service --id dvcray-service-ab12\n"
           "dvcray-service: listening on 127.0.0.1:40123 as dvcray-service-ab12 (dvcray 0.1.0, pid 7)\n"
           "dvcray-service: run r1 (a) started on host, pid 9\n")
    assert service_api.listening_port(log) == (40123, "dvcray-service-ab12")
    assert service_api.listening_port("dvcray-service: listening on 0.0.0.0:40123 as x\n") is None
    assert service_api.listening_port("") is None


def test_a_service_elsewhere_is_never_asked_with_the_token():
    log = "dvcray-service: listening on 127.0.0.1:40123 as dvcray-service-ab12 (dvcray 0.1.0, pid 7)\n"
    # The job API of a cluster on another machine: its service's 127.0.0.1 is not this one's.
    assert service_api.active_runs("http://10.0.0.5:8265", "tok", "dvcray-service-ab12", log) is None
    assert service_api.active_runs("http://127.0.0.1:8265", None, "dvcray-service-ab12", log) is None


def test_what_a_placed_experiment_may_reserve():
    assert _resources("CPU=1,GPU=0.5") == {"CPU": 1.0, "GPU": 0.5}
    assert _resources("CPU=1,node:__internal_head__=0.001") == {"CPU": 1.0, "node:__internal_head__": 0.001}
    assert _resources("CPU=0") == {} and _resources("") == {} and _resources(None) == {}
    assert _resources("CPU=-1,memory=9,GPU=x") == {}

