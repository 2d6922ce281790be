"""Real `suture run` processes: SIGKILL at random moments and two concurrent writers never lose an output.

The cases and their counting live in tests/robustness/process_cases.py (the robustness benchmark reuses
them); this test holds the floor: every kill lands, nothing is lost or broken, every re-run is identical.
"""

from __future__ import annotations

from tests.robustness.process_cases import kill_and_concurrency_counts


def test_kills_and_concurrent_runs_never_lose_or_break_the_output(tmp_path):
    counts = kill_and_concurrency_counts(tmp_path, kills=10, rounds=2, seed=0)
    assert counts["kills_tried"] == counts["kills_landed"] == 10, counts
    assert counts["kills_mid_write"] >= 3 and counts["kills_in_swap"] >= 3, counts  # the dangerous moments were hit
    assert counts["broken_after_kill"] == 0, counts
    assert counts["outputs_lost"] == 0, counts
    assert counts["rerun_failures"] == 0 and counts["non_identical_reruns"] == 0, counts
    assert counts["concurrent_rounds"] == 4, counts
    assert counts["concurrent_lost_outputs"] == 0 and counts["double_success_without_overwrite"] == 0, counts
    assert counts["busy_refusals"] >= 1, counts  # the runs really overlapped, and the loser said so in one line
    assert counts["unclear_errors"] == 0, counts
    assert counts["leftovers"] == 0, counts  # killed runs' temporaries and backups were all cleaned up
