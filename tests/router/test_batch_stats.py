"""The router's merge of the replicas' /batch/stats: counters add up, histograms merge, the mean follows the
merged histogram, settings come through, a replica that did not answer is listed and left out of the sums."""

from tinkerbell.router.batch_stats import merge


def _row(index: int, stats: dict | None, error: str | None = None) -> dict:
    return {"index": index, "url": f"http://r{index}", "healthy": stats is not None, "error": error, "stats": stats}


A = {"algorithm": "basic", "max_batch_size": 8, "max_wait_time": 0.0, "pending_requests": 1, "running_seqs": 2,
     "waiting_seqs": 0, "batches_run": 3, "mean_batch_size": 2.0, "batch_size_histogram": {"1": 1, "2": 1, "3": 1}}
B = {**A, "pending_requests": 0, "running_seqs": 0, "waiting_seqs": 4, "batches_run": 2, "mean_batch_size": 8.0,
     "batch_size_histogram": {"8": 2}}


def test_counters_add_and_the_mean_follows_the_merged_histogram():
    out = merge([_row(0, A), _row(1, B)])
    assert (out["pending_requests"], out["running_seqs"], out["waiting_seqs"], out["batches_run"]) == (1, 2, 4, 5)
    assert out["batch_size_histogram"] == {"1": 1, "2": 1, "3": 1, "8": 2}
    assert out["mean_batch_size"] == (1 + 2 + 3 + 16) / 5
    assert (out["algorithm"], out["max_batch_size"], out["max_wait_time"]) == ("basic", 8, 0.0)
    assert out["replicas_answering"] == 2 and [r["stats"] for r in out["replicas"]] == [A, B]


def test_a_silent_replica_is_listed_and_left_out():
    out = merge([_row(0, A), _row(1, None, "replica is unhealthy")])
    assert out["batches_run"] == 3 and out["mean_batch_size"] == 2.0 and out["replicas_answering"] == 1
    assert out["replicas"][1]["error"] == "replica is unhealthy"


def test_no_replica_answering_gives_no_figures():
    out = merge([_row(0, None, "replica is unhealthy")])
    assert out["replicas_answering"] == 0 and "batches_run" not in out
