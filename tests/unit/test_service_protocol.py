"""The runner service's protocol, without a service: who may talk to it, where it listens,
what its messages carry, and when a run has ended."""

from __future__ import annotations

import json

from dvcray_cli.service import client, protocol
from dvcray_cli.service.protocol import Attempt, Hello, PollAnswer, PollRequest, RunState, ServiceRun


def test_only_the_clusters_token_is_authorized():
    assert protocol.authorized("Bearer s3cret", "s3cret")
    assert not protocol.authorized("Bearer other", "s3cret")
    assert not protocol.authorized("s3cret", "s3cret")
    assert not protocol.authorized(None, "s3cret") and not protocol.authorized("", "s3cret")


def test_the_proof_depends_on_the_token_the_nonce_and_the_service():
    proof = protocol.proof("tok", "nonce-1", "dvcray-service-1")
    assert proof == protocol.proof("tok", "nonce-1", "dvcray-service-1")
    assert proof != protocol.proof("other", "nonce-1", "dvcray-service-1")
    assert proof != protocol.proof("tok", "nonce-2", "dvcray-service-1")
    assert proof != protocol.proof("tok", "nonce-1", "dvcray-service-2")
    assert "tok" not in proof


def test_the_port_comes_from_the_services_job_log():
    log = ("Running entrypoint for job dvcray-service-ab12: python -m dvcray_cli.service --id dvcray-service-ab12\n"
           "dvcray-service: listening on 127.0.0.1:40123 as dvcray-service-ab12 (dvcray 0.1.0, pid 7)\n"
           "dvcray-service: run r1 (a) started on host, pid 9\n")
    assert protocol.listening_port(log) == (40123, "dvcray-service-ab12")
    assert protocol.listening_port("dvcray-service: listening on 0.0.0.0:40123 as x\n") is None
    assert protocol.listening_port("") is None


def test_a_service_elsewhere_is_never_asked_with_the_token():
    log = "dvcray-service: listening on 127.0.0.1:40123 as dvcray-service-ab12 (dvcray 0.1.0, pid 7)\n"
    # The job API of a cluster on another machine: its service's 127.0.0.1 is not this one's.
    assert client.active_runs("http://10.0.0.5:8265", "tok", "dvcray-service-ab12", log) is None
    assert client.active_runs("http://127.0.0.1:8265", None, "dvcray-service-ab12", log) is None


def test_what_a_placed_experiment_may_reserve():
    assert protocol.parse_placement("CPU=1,GPU=0.5") == {"CPU": 1.0, "GPU": 0.5}
    assert protocol.parse_placement("CPU=1,node:__internal_head__=0.001") == \
        {"CPU": 1.0, "node:__internal_head__": 0.001}
    assert protocol.parse_placement("CPU=0") == {} and protocol.parse_placement("") == {}
    assert protocol.parse_placement(None) == {}
    assert protocol.parse_placement("CPU=-1,memory=9,GPU=x") == {}
    # What a client sends is what the service reads back.
    sent = protocol.placement_text({"CPU": 2.0, "GPU": None, "node:__internal_head__": 0.001})
    assert sent == "CPU=2,node:__internal_head__=0.001"
    assert protocol.parse_placement(sent) == {"CPU": 2.0, "node:__internal_head__": 0.001}


def test_a_run_has_ended_when_its_state_is_terminal_lost_included():
    ended = {s for s in RunState if s.is_terminal()}
    assert ended == {RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED, RunState.LOST}
    # A run the service forgot is LOST: a client waiting for it to stop is done waiting.
    assert RunState.parse("LOST").is_terminal() and not RunState.LOST.has_outcome()
    assert not any(s.is_terminal() for s in (RunState.WAITING, RunState.PENDING, RunState.RUNNING))


def test_messages_keep_their_wire_format_both_ways():
    run = ServiceRun("r1", "j1", "exp", RunState.LOST, "head", 9, 1.5, 2.5, 1, True, "its node died",
                     [Attempt(1, "n1", 1.5, 2.5, RunState.LOST, "its node died")])
    wire = json.loads(json.dumps(run.to_json()))
    assert wire == {"run_id": "r1", "job_id": "j1", "exp_name": "exp", "state": "LOST", "node": "head",
                    "pid": 9, "started": 1.5, "ended": 2.5, "code": 1, "placed": True, "lost": "its node died",
                    "attempts": [{"number": 1, "node": "n1", "started": 1.5, "ended": 2.5, "state": "LOST",
                                  "lost": "its node died"}]}
    assert ServiceRun.from_json(wire) == run
    answer = PollAnswer(7, {"r1": run}, {"r1": (3, b"\xff line\n")}, ["gone"])
    assert PollAnswer.from_json(json.loads(json.dumps(answer.to_json()))) == answer
    request = PollRequest(7, ["r1"], {"r1": 3}, 5.0)
    assert PollRequest.from_json(json.loads(json.dumps(request.to_json()))) == request
    hello = Hello("dvcray-service-1", "0.1.0", "p", "head", True)
    assert Hello.from_json(hello.to_json()) == hello


def test_messages_from_the_wire_are_read_tolerantly():
    assert ServiceRun.from_json({"state": "RUNNING"}) is None and ServiceRun.from_json([]) is None
    odd = ServiceRun.from_json({"run_id": "r", "state": "nonsense", "pid": "x", "code": True, "started": "soon"})
    assert (odd.state, odd.pid, odd.code, odd.started) == (RunState.PENDING, 0, None, None)
    answer = PollAnswer.from_json({"runs": {"r": "junk"}, "logs": {"r": 1}}, after=4)
    assert (answer.seq, answer.runs, answer.logs, answer.unknown) == (4, {}, {}, [])
    assert Hello.from_json(None) == Hello("")
