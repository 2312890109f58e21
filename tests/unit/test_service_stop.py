"""Stopping a run of the runner service ends once the service says it has ended, LOST
included: a run the service has forgotten (restarted) or lost is done, not "did not end"."""

from __future__ import annotations

from dvcray_cli.runs.backends.service import ServiceBackend
from dvcray_cli.service.client import ServiceError
from dvcray_cli.service.protocol import PollAnswer, PollRequest, RunState, ServiceRun


class ForgetfulService:
    """Stands in for the service's HTTP client (unit tests start nothing): it takes the
    stop, then answers polls from a script of run tables."""

    def __init__(self, answers: list[PollAnswer]) -> None:
        self.answers, self.stopped, self.polls = answers, [], 0

    def stop(self, run_id: str) -> None:
        self.stopped.append(run_id)

    def poll(self, request: PollRequest, timeout: float) -> PollAnswer:
        self.polls += 1
        if not self.answers:
            raise ServiceError("no answer")
        return self.answers.pop(0)


def test_a_run_the_service_forgot_has_ended_lost():
    service = ForgetfulService([PollAnswer(1, unknown=["r1"])])
    found = ServiceBackend("http://127.0.0.1:1", service).stop({"r1": "j1"}, timeout=30)
    assert found == {"r1": RunState.LOST} and found["r1"].is_terminal()
    assert service.stopped == ["r1"] and service.polls == 1, "it stopped waiting at once"


def test_stopping_waits_for_every_run_to_end():
    running = ServiceRun("r2", state=RunState.RUNNING)
    answers = [PollAnswer(1, {"r1": ServiceRun("r1", state=RunState.STOPPED), "r2": running}),
               PollAnswer(2, {"r2": ServiceRun("r2", state=RunState.FAILED, lost="its node died")})]
    service = ForgetfulService(answers)
    found = ServiceBackend("http://127.0.0.1:1", service).stop({"r1": "j", "r2": "j"}, timeout=30)
    assert found == {"r1": RunState.STOPPED, "r2": RunState.FAILED} and service.polls == 2
