"""Fault injection: the first process to reach a marker dies as a crash does; every later one goes past it."""

import multiprocessing

from keplm.platform.faults import exit_once, first_claim


def _reach(marker: str) -> None:
    exit_once(marker, "step 6", before_exit=lambda: print("before exit", flush=True))


def test_the_first_process_at_a_marker_exits_and_the_next_goes_past(tmp_path):
    marker = tmp_path / "deep" / "fault_injected"
    ctx = multiprocessing.get_context("fork")
    first, second = ctx.Process(target=_reach, args=(str(marker),)), ctx.Process(target=_reach, args=(str(marker),))
    first.start()
    first.join(30)
    assert first.exitcode == 1 and marker.read_text() == "step 6"
    second.start()
    second.join(30)
    assert second.exitcode == 0                      # the restarted process got past the fault
    assert not first_claim(marker) and marker.read_text() == "step 6"
