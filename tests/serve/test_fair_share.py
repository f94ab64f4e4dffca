"""Request slots alone: per-caller and per-socket limits, waiting requests started in round-robin order."""

from __future__ import annotations

from agent.serve.fair_share import FairShare


def test_per_caller_limit_queues_the_rest_in_order() -> None:
    f = FairShare(per_caller=2)
    started: list[str] = []
    assert f.ask("a", lambda: started.append("a1")) and f.ask("a", lambda: started.append("a2"))
    assert not f.ask("a", lambda: started.append("a3")) and not f.ask("a", lambda: started.append("a4"))
    assert f.ask("b", lambda: started.append("b1"))  # a neighbour is not held behind a's queue
    assert f.active("a") == 2 and f.waiting("a") == 2 and f.waited == 2
    f.done("a")
    assert started == ["a3"] and f.active("a") == 2
    f.done("a")
    f.done("a")
    assert started == ["a3", "a4"] and f.waiting("a") == 0
    f.done("a")
    f.done("b")
    assert f.running == 0 and f.active("a") == 0


def test_deep_pipeline_does_not_crowd_out_a_single_request() -> None:
    """With the socket's slots taken, a caller with 100 waiting and one with 1 take turns."""
    f = FairShare(per_caller=4, total=2)
    order: list[str] = []
    assert f.ask("x", lambda: None) and f.ask("y", lambda: None)
    for i in range(100):
        assert not f.ask("deep", lambda i=i: order.append(f"deep{i}"))
    assert not f.ask("single", lambda: order.append("single"))
    f.done("x")
    f.done("y")
    assert order == ["deep0", "single"]  # one each, in the order they started waiting
    f.done("deep")
    f.done("single")
    assert order[2:] == ["deep1", "deep2"]


def test_new_caller_does_not_jump_the_queue_of_a_waiting_one() -> None:
    f = FairShare(per_caller=1)
    assert f.ask("a", lambda: None)
    got: list[str] = []
    assert not f.ask("a", lambda: got.append("a2"))
    assert not f.ask("a", lambda: got.append("a3"))  # FIFO inside a caller
    f.done("a")
    assert got == ["a2"]


def test_cancel_removes_a_waiting_request() -> None:
    f = FairShare(per_caller=1)
    assert f.ask("a", lambda: None)
    ran: list[int] = []

    def go() -> None:
        ran.append(1)

    assert not f.ask("a", go)
    f.cancel("a", go)
    f.cancel("a", go)  # twice is harmless
    f.done("a")
    assert ran == [] and f.running == 0 and f.waiting("a") == 0


def test_force_counts_a_request_already_running() -> None:
    f = FairShare(per_caller=1, total=1)
    f.force("a")
    assert f.active("a") == 1 and f.running == 1
    assert not f.ask("b", lambda: None)
    f.done("a")
    assert f.active("b") == 1 and f.running == 1
    f.done("zzz")  # a caller with nothing running: ignored
    assert f.running == 1


def test_no_limits_never_queues() -> None:
    f = FairShare()
    assert all(f.ask("a", lambda: None) for _ in range(1000))
    assert f.waited == 0 and f.active("a") == 1000
