"""The generation worker: per-sample seeds, atomic shards, resuming."""

import numpy as np
import pytest

from samplebench import store
from samplebench.config import plan
from samplebench.errors import UsageError
from samplebench.generate import generate


def _overrides(tmp_path, run, *extra):
    return [f"results_dir={tmp_path}", f"run={run}", "num_images=96", "shard_size=32", *extra]


def _samples(tmp_path, run):
    out = {}
    for cell in store.find_cells(tmp_path / run):
        shards = list(cell.iter_shards())
        out[cell.key] = (
            np.concatenate([s["samples"] for s in shards]),
            np.concatenate([s["indices"] for s in shards]),
        )
    return out


SWEEP = ["sampler=ddim,euler_a,dpmpp", "nfe=5,10", "guidance=1,3"]


def test_batch_size_does_not_change_samples(tmp_path):
    generate(plan(_overrides(tmp_path, "b1", *SWEEP, "batch_size=1", "nfe=5")))
    generate(plan(_overrides(tmp_path, "b64", *SWEEP, "batch_size=64", "nfe=5")))
    a, b = _samples(tmp_path, "b1"), _samples(tmp_path, "b64")
    assert a.keys() == b.keys() and len(a) == 6
    for k in a:
        np.testing.assert_array_equal(a[k][1], b[k][1])
        np.testing.assert_allclose(a[k][0], b[k][0], rtol=1e-10, atol=1e-12)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    generate(plan(_overrides(tmp_path, "whole", *SWEEP)))

    real_write = store.write_shard
    written = []

    def crash_after_five(*args, **kwargs):
        if len(written) == 5:
            raise KeyboardInterrupt("simulated crash")
        written.append(real_write(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(store, "write_shard", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        generate(plan(_overrides(tmp_path, "resumed", *SWEEP)))
    monkeypatch.setattr(store, "write_shard", real_write)
    assert not list((tmp_path / "resumed").rglob("*.tmp"))  # no half shard left behind
    summary = generate(plan(_overrides(tmp_path, "resumed", *SWEEP)))
    assert summary.shards_skipped == 5
    assert summary.shards_written == 12 * 3 - 5  # 3 samplers x 2 NFE x 2 guidance, 3 shards each
    whole, resumed = _samples(tmp_path, "whole"), _samples(tmp_path, "resumed")
    assert whole.keys() == resumed.keys()
    for k in whole:
        np.testing.assert_array_equal(whole[k][0], resumed[k][0])


def test_rerun_skips_finished_work(tmp_path):
    ov = _overrides(tmp_path, "again", "sampler=ddim", "nfe=5")
    first = generate(plan(ov))
    before = _samples(tmp_path, "again")
    second = generate(plan(ov))
    assert first.shards_written == 3 and second.shards_written == 0 and second.shards_skipped == 3
    after = _samples(tmp_path, "again")
    for k in before:
        np.testing.assert_array_equal(before[k][0], after[k][0])


def test_more_images_extend_a_cell(tmp_path):
    generate(plan(_overrides(tmp_path, "grow", "sampler=ddim", "nfe=5")))
    summary = generate(plan([*_overrides(tmp_path, "grow", "sampler=ddim", "nfe=5"), "num_images=128"]))
    assert summary.shards_written == 1
    ((samples, indices),) = _samples(tmp_path, "grow").values()
    assert list(indices) == list(range(128))


def test_a_cell_grown_by_less_than_a_shard_completes(tmp_path):
    # 40 samples (shards 0-31, 32-39), then 50: the short shard is followed by 40-49, then 70.
    for n in (40, 50, 70):
        generate(plan([*_overrides(tmp_path, "part", "sampler=ddim", "nfe=5"), f"num_images={n}"]))
        (cell,) = store.find_cells(tmp_path / "part")
        assert cell.complete()
        ((_, indices),) = _samples(tmp_path, "part").values()
        assert list(indices) == list(range(n))
    assert [(a, b) for a, b, _ in cell.shards()] == [(0, 31), (32, 39), (40, 49), (50, 63), (64, 69)]


def test_changed_config_in_the_same_run_is_refused(tmp_path):
    generate(plan(_overrides(tmp_path, "x", "sampler=ddim", "nfe=5")))
    with pytest.raises(UsageError, match="seed= changed since it was made"):
        generate(plan(_overrides(tmp_path, "x", "sampler=ddim", "nfe=5", "seed=3")))


def test_a_corrupt_shard_is_a_clear_error(tmp_path):
    generate(plan(_overrides(tmp_path, "c", "sampler=ddim", "nfe=5")))
    (cell,) = store.find_cells(tmp_path / "c")
    path = cell.shards()[0][2]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UsageError, match="corrupt or truncated"):
        list(cell.iter_shards())
