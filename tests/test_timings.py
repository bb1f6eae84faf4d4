"""Honest per-cell timings (issue 12): warm-up calls untimed and recorded apart, a spread from several
timed calls, and samples that timing never touches.

The seconds themselves are never compared with a clock here (tests do not depend on timing): the
worker's calls are counted, and timing_row is checked on shards whose per-call seconds are set by hand.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from samplebench import store
from samplebench.config import plan
from samplebench.metrics.run import timing_row


def _generate(tmp_path, *overrides):
    import samplebench.generate as generate

    calls = []
    real = generate.run_batch

    def counting(model, cell, inputs, steps):  # every sampler run: batches, warm-ups and repeats
        calls.append((cell.sampler_label, cell.nfe, inputs.indices[0], len(inputs.indices)))
        return real(model, cell, inputs, steps)

    cells = plan([f"results_dir={tmp_path}", "run=r", *overrides])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, "run_batch", counting)
        generate.generate(cells, worker="w")
    return calls, {(c.info["sampler_label"], c.info["nfe"]): c for c in store.find_cells(tmp_path / "r")}


def test_one_batch_cells_repeat_their_batch_and_each_sampler_warms_up_once(tmp_path):
    calls, cells = _generate(
        tmp_path, "sampler=ddim,dpmpp", "nfe=5,10", "num_images=40", "batch_size=40", "timing.repeats=4"
    )
    per_cell = Counter((s, n) for s, n, _, _ in calls)
    # Each sampler's first cell: 1 warm-up + 1 batch + 3 repeats; its second cell: 1 batch + 3 repeats.
    assert per_cell == {("ddim", 5): 5, ("ddim", 10): 4, ("dpmpp", 5): 5, ("dpmpp", 10): 4}
    # The repeats come after every cell's shards, round-robin over the cells (A B C D A B C D ...).
    tail = [(s, n) for s, n, _, _ in calls[-12:]]
    assert tail == [("ddim", 5), ("ddim", 10), ("dpmpp", 5), ("dpmpp", 10)] * 3
    for (sampler, nfe), cell in cells.items():
        (shard,) = [store.read_shard(p) for _, _, p in cell.shards()]
        warm = ["warmup"] if nfe == 5 else []
        assert list(shard["batch_kind"]) == ["sample", *warm], (sampler, nfe)
        (timing,) = [store.read_shard(p) for p in cell.timing_files()]
        assert list(timing["batch_kind"]) == ["repeat"] * 3 and list(timing["batch_sizes"]) == [40] * 3
        assert list(shard["indices"]) == list(range(40))  # timing-only calls add no samples
        row = timing_row(cell)
        assert row["n_timed"] == 4 and row["n_images"] == 40
        assert (row["warmup_seconds"] > 0) == (nfe == 5)
        assert row["sec_per_image_min"] <= row["sec_per_image_total"] <= row["sec_per_image_max"]


def test_timing_calls_do_not_change_the_samples(tmp_path):
    common = ["sampler=euler_a", "nfe=6", "num_images=24", "batch_size=8", "shard_size=16"]
    _, with_timing = _generate(tmp_path / "a", *common, "timing.repeats=9")
    _, without = _generate(tmp_path / "b", *common, "timing.repeats=1", "timing.warmup=false")

    def samples(cell):
        return np.concatenate([s["samples"] for s in cell.iter_shards()])

    np.testing.assert_array_equal(samples(with_timing["euler_a", 6]), samples(without["euler_a", 6]))


def test_cells_with_enough_batches_are_not_repeated_and_only_shard_zero_repeats(tmp_path):
    # 3 batches of 8 in 2 shards (16 + 8): with repeats=5 the shard holding sample 0 repeats twice.
    common = ["sampler=ddim", "nfe=5", "num_images=24", "batch_size=8"]
    calls, cells = _generate(tmp_path, *common, "shard_size=16", "timing.repeats=5")
    starts = Counter(first for _, _, first, _ in calls)
    assert starts == {0: 1 + 1 + 2, 8: 1, 16: 1}  # warm-up, batch, 2 repeats at 0; one batch elsewhere
    assert [p.name for p in cells["ddim", 5].timing_files()] == ["timing-00000000.npz"]
    assert timing_row(cells["ddim", 5])["n_timed"] == 5
    calls, _ = _generate(tmp_path / "big", *common, "timing.repeats=3")
    assert len(calls) == 1 + 3  # warm-up + 3 batches, no repeats


def _fake_cell(tmp_path, calls: list[tuple[int, float, float, str]], n: int) -> store.CellRecord:
    """A cell whose one shard records these (size, sampling s, decode s, kind) calls."""
    cell_dir = tmp_path / "cell"
    info = {
        "model_label": "gmm",
        "sampler_label": "ddim",
        "schedule_label": "karras",
        "nfe": 5,
        "guidance": 1.0,
        "num_images": n,
    }
    store.write_json(cell_dir / "cell.json", info)
    sizes = np.asarray([c[0] for c in calls])
    store.write_shard(
        cell_dir,
        0,
        {
            "indices": np.arange(n),
            "finite": np.ones(n, bool),
            "nfe": np.full(n, 5),
            "batch_sizes": sizes,
            "batch_seconds": np.asarray([c[1] for c in calls]),
            "batch_model_seconds": np.asarray([c[1] for c in calls]) / 2,
            "batch_decode_seconds": np.asarray([c[2] for c in calls]),
            "batch_kind": np.asarray([c[3] for c in calls]),
        },
    )
    return store.CellRecord(cell_dir, info)


def test_timing_row_is_the_median_of_full_timed_calls_with_their_range(tmp_path):
    # Reference: the median and range of (sampling + decode) / size over the full-size timed calls,
    # computed by hand; the warm-up (100 s) and the short last batch (size 4, 1 s) are left out.
    calls = [
        (8, 100.0, 0.0, "warmup"),
        (8, 0.8, 0.08, "sample"),
        (8, 0.4, 0.08, "sample"),
        (4, 1.0, 0.0, "sample"),
        (8, 1.6, 0.08, "repeat"),
    ]
    row = timing_row(_fake_cell(tmp_path, calls, 20))
    assert row["n_timed"] == 3 and row["n_images"] == 20
    assert row["sec_per_image_sampling"] == pytest.approx(0.1)
    assert row["sec_per_image_decode"] == pytest.approx(0.01)
    assert row["sec_per_image_total"] == pytest.approx(0.11)
    assert (row["sec_per_image_min"], row["sec_per_image_max"]) == pytest.approx((0.06, 0.21))
    assert row["warmup_seconds"] == pytest.approx(100.0)
    assert row["model_call_share"] == pytest.approx(0.5)


def test_shards_from_before_warmup_calls_still_time(tmp_path):
    # Older shards flag a real batch as warm-up (batch_warmup) instead of recording batch_kind.
    cell = _fake_cell(tmp_path, [(8, 0.8, 0.0, "sample"), (8, 0.4, 0.0, "sample")], 16)
    shard = cell.shards()[0][2]
    arrays = store.read_shard(shard)
    del arrays["batch_kind"]
    arrays["batch_warmup"] = np.asarray([True, False])
    store.write_shard(cell.path, 0, arrays)
    row = timing_row(cell)
    assert row["n_timed"] == 1 and row["sec_per_image_sampling"] == pytest.approx(0.05)
    arrays["batch_warmup"] = np.asarray([True, True])
    store.write_shard(cell.path, 0, arrays)
    row = timing_row(cell)
    assert row["timing_note"].startswith("warm-up batch only") and row["n_timed"] == 2


def test_the_analytic_model_runs_on_one_cpu_thread_and_the_count_comes_back(tmp_path):
    # On a busy CPU a multi-threaded call of microsecond ops stalls for whole scheduler slices; the
    # analytic model asks for one thread (GaussianMixtureModel.cpu_threads) while its cells run.
    import torch

    import samplebench.generate as generate

    seen, real = [], generate.run_batch

    def recording(model, cell, inputs, steps):
        seen.append(torch.get_num_threads())
        return real(model, cell, inputs, steps)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(generate, "run_batch", recording)
            generate.generate(
                plan([f"results_dir={tmp_path}", "run=r", "sampler=ddim", "nfe=5", "num_images=8"])
            )
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
