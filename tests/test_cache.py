"""The preprocessed cache on real PTB-XL records."""

import threading
from pathlib import Path

import numpy as np
import pytest

from services.datasets.cache import cache_key, open_cache, preprocessed
from services.datasets.ptbxl import PtbxlDataset
from services.ecg.preprocess import InputSpec, prepare_signal
from services.ecg.recording import Recording
from services.errors import EcgInputError

SPEC = InputSpec()
IDENTITY = {"kind": "ptbxl", "path": "ptbxl-500"}


@pytest.fixture(scope="module")
def ptbxl(ptbxl_dir: Path) -> PtbxlDataset:
    return PtbxlDataset(ptbxl_dir)


def test_cache_holds_the_preprocessed_records(ptbxl: PtbxlDataset, tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    indices = np.array([4, 0, 7, 2, 9])
    cache = preprocessed(
        ptbxl, IDENTITY, SPEC, tmp_path, indices=indices, on_progress=lambda d, t: progress.append((d, t))
    )
    assert cache.signals.shape == (5, 12, 2500) and cache.signals.dtype == np.float32
    assert isinstance(cache.signals, np.memmap) and not cache.signals.flags.writeable
    for row, source in enumerate(indices):
        np.testing.assert_array_equal(
            cache.signals[row], prepare_signal(ptbxl.recording(int(source)), SPEC)[:, :2500]
        )
        assert cache.record_ids[row] == ptbxl.record_id(int(source))
    np.testing.assert_array_equal(cache.labels, ptbxl.labels[indices])
    np.testing.assert_array_equal(cache.folds, ptbxl.folds[indices])
    assert cache.meta["label_names"] == list(ptbxl.label_names)
    assert progress[-1] == (5, 5)


def test_cache_is_built_once_per_spec_and_selection(ptbxl: PtbxlDataset, tmp_path: Path) -> None:
    first = preprocessed(ptbxl, IDENTITY, SPEC, tmp_path, indices=np.arange(3))
    calls: list = []
    again = preprocessed(
        ptbxl, IDENTITY, SPEC, tmp_path, indices=np.arange(3), on_progress=lambda *a: calls.append(a)
    )
    assert again.path == first.path and calls == [], "the second call rebuilt the cache"
    other_filter = preprocessed(ptbxl, IDENTITY, InputSpec(lowpass_hz=30.0), tmp_path, indices=np.arange(3))
    other_records = preprocessed(ptbxl, IDENTITY, SPEC, tmp_path, indices=np.arange(4))
    assert len({first.path, other_filter.path, other_records.path}) == 3
    assert not np.array_equal(other_filter.signals, first.signals)
    assert cache_key(IDENTITY, SPEC, 10.0) != cache_key({**IDENTITY, "mtime_ns": 1}, SPEC, 10.0)


def test_long_records_become_several_segments_and_bad_ones_are_listed(
    tmp_path: Path, ptb_record: Path
) -> None:
    from services.datasets.base import EcgDataset
    from services.ecg.readers import read_wfdb

    ptb = read_wfdb(ptb_record)  # 38.4 s -> three 10-s segments

    class TwoRecords(EcgDataset):
        kind = "test"

        def __len__(self) -> int:
            return 2

        def record_id(self, index: int) -> str:
            return ["ptb", "broken"][index]

        def recording(self, index: int) -> Recording:
            if index == 1:
                raise EcgInputError("broken.hea: the signal file does not match its header")
            return ptb

        def summary(self) -> dict:
            return {}

    cache = preprocessed(TwoRecords(), {"kind": "test"}, SPEC, tmp_path)
    assert cache.signals.shape == (3, 12, 2500)
    assert list(cache.record_index) == [0, 0, 0] and list(cache.segments_of(np.array([0]))) == [0, 1, 2]
    full = prepare_signal(ptb, SPEC)
    np.testing.assert_array_equal(cache.signals[2], full[:, 5000:7500])
    assert cache.meta["skipped"] == ["broken: broken.hea: the signal file does not match its header"]
    assert cache.labels is None and cache.folds is None


def test_a_failed_build_leaves_nothing_and_concurrent_builds_agree(
    ptbxl: PtbxlDataset, tmp_path: Path
) -> None:
    class Boom(RuntimeError):
        pass

    def explode(done: int, total: int) -> None:
        raise Boom

    with pytest.raises(Boom):
        preprocessed(ptbxl, IDENTITY, SPEC, tmp_path, indices=np.arange(25), on_progress=explode)
    assert list(tmp_path.iterdir()) == [], "a failed build left files behind"

    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(preprocessed(ptbxl, IDENTITY, SPEC, tmp_path, indices=np.arange(6)))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0].path == results[1].path
    assert [p.name for p in tmp_path.iterdir()] == [results[0].path.name], "a temporary build folder was left"
    np.testing.assert_array_equal(open_cache(results[0].path).signals, results[1].signals)
