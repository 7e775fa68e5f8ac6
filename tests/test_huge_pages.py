"""phi3v/huge_pages.py: which mappings move onto 2 MB pages, and that moving them changes no byte.

The live tests need Linux 6.1 or later (``MADV_COLLAPSE``) and skip elsewhere, with the reason
the module gives.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from phi3v import huge_pages
from phi3v.huge_pages import HUGE, Mapping, candidates, collapse, mappings

MB = 1 << 20

SMAPS = """\
55d0c0000000-55d0c0800000 rw-p 00000000 00:00 0                          [heap]
Size:               8192 kB
Rss:                8000 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000a00000 rw-p 00000000 00:00 0
Size:              10240 kB
Rss:               10240 kB
AnonHugePages:      4096 kB
7f0000a00000-7f0001400000 r--p 00000000 fd:01 1234                       /tmp/model.onnx.data
Size:              10240 kB
Rss:               10240 kB
AnonHugePages:         0 kB
7f0001400000-7f0001e00000 rw-s 00000000 00:01 77              /memfd:phi3v-kv-cache (deleted)
Size:              10240 kB
Rss:               10240 kB
AnonHugePages:         0 kB
7f0001e00000-7f0002800000 rw-p 00000000 00:00 0
Size:              10240 kB
Rss:                2048 kB
AnonHugePages:         0 kB
7f0002900000-7f0002b00000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                2048 kB
AnonHugePages:         0 kB
"""


def test_smaps_gives_each_mappings_range_residency_and_kind():
    found = mappings(SMAPS)
    assert [(m.start, m.end) for m in found][:2] == [
        (0x55D0C0000000, 0x55D0C0800000),
        (0x7F0000000000, 0x7F0000A00000),
    ]
    assert found[0] == Mapping(0x55D0C0000000, 0x55D0C0800000, 8000 * 1024, 0, True)
    assert found[1].huge == 4096 * 1024
    # a file (the model's data) and a shared memory file (the KV cache) are not anonymous
    assert [m.anonymous_private_writable for m in found] == [True, True, False, False, True, True]


def test_only_resident_anonymous_mappings_are_chosen_in_whole_huge_pages():
    # the heap (98 % resident) and the second mapping (resident, part on huge pages already);
    # not the files, not the sparse mapping (20 % resident: it would grow), not the last one,
    # whose 2 MB straddle a 2 MB boundary
    assert candidates(mappings(SMAPS)) == [(0x55D0C0000000, 8 * MB), (0x7F0000000000, 10 * MB)]


def test_ranges_to_leave_are_cut_out_of_a_mapping_in_whole_huge_pages():
    # one resident mapping of 10 MB; leave 3 MB in its middle: 2 MB before, 4 MB after
    mapping = Mapping(0x7F0000000000, 0x7F0000000000 + 10 * MB, 10 * MB, 0, True)
    leave = [(0x7F0000000000 + 3 * MB, 0x7F0000000000 + 6 * MB)]
    assert candidates([mapping], leave) == [
        (0x7F0000000000, 2 * MB),  # [0, 3 MB) rounded inwards
        (0x7F0000000000 + 6 * MB, 4 * MB),
    ]
    assert candidates([mapping], [(0, 2**64)]) == []


def test_a_span_is_rounded_inwards_to_whole_huge_pages():
    mapping = Mapping(HUGE + 4096, 4 * HUGE - 4096, 0, 0, True)
    assert mapping.span() == (2 * HUGE, 3 * HUGE)


def written_memory(size: int) -> mmap.mmap:
    """Anonymous memory on 4 KB pages (nothing asked for huge ones), every page written."""
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    values = np.frombuffer(memory, np.uint8)
    values[:] = np.arange(size, dtype=np.uint64).astype(np.uint8) ^ 0x5A
    return memory


def huge_bytes_in(memory: mmap.mmap) -> int:
    start = np.frombuffer(memory, np.uint8).ctypes.data
    for mapping in mappings(Path("/proc/self/smaps").read_text()):
        if mapping.start <= start < mapping.end:
            return mapping.huge
    raise AssertionError("the mapping is not in smaps")


def test_collapse_moves_written_memory_onto_huge_pages_and_keeps_every_byte():
    memory = written_memory(32 * MB)
    before = bytes(memory)
    assert huge_bytes_in(memory) == 0
    done = collapse()
    if done.reason:
        pytest.skip(done.reason)
    if done.failed and huge_bytes_in(memory) == 0:  # memory too fragmented, not our doing
        pytest.skip("the kernel found no free 2 MB blocks for this mapping")
    assert huge_bytes_in(memory) >= 28 * MB  # all but the unaligned ends
    assert done.collapsed >= 28 * MB
    assert bytes(memory) == before
    assert "GB of weights on 2 MB pages" in done.describe()


def test_collapse_leaves_the_mappings_it_is_told_to_leave():
    """Another runtime's memory in the same process stays as it was (bench/decode_peer.py)."""
    theirs, ours = written_memory(32 * MB), written_memory(32 * MB)
    # a flag of its own (no effect on huge pages) keeps Linux from merging the two neighbours
    # into one mapping, so that smaps counts each one's huge pages apart
    theirs.madvise(mmap.MADV_DONTFORK)
    start = np.frombuffer(theirs, np.uint8).ctypes.data
    done = collapse(leave=[(start, start + 32 * MB)])
    if done.reason:
        pytest.skip(done.reason)
    if done.failed and huge_bytes_in(ours) == 0:  # memory too fragmented, not our doing
        pytest.skip("the kernel found no free 2 MB blocks for this mapping")
    assert huge_bytes_in(ours) >= 28 * MB
    assert huge_bytes_in(theirs) == 0


@pytest.mark.parametrize(
    ("value", "default", "moved"),
    [("", True, True), ("", False, False), ("0", True, False), (" Off ", True, False),
     ("1", False, True), ("yes", False, True)],
)  # fmt: skip
def test_the_setting_decides_over_the_callers_default(monkeypatch, value, default, moved):
    monkeypatch.setenv(huge_pages.HUGE_PAGES_ENV, value)
    assert huge_pages.wanted(default) is moved


def test_loading_a_model_moves_its_weights_and_answers_the_same(tiny_int4_model_dir, monkeypatch):
    from phi3v import Pipeline

    question = "Describe the history of computing machines in a few words."
    monkeypatch.setenv(huge_pages.HUGE_PAGES_ENV, "0")
    small = Pipeline.load(tiny_int4_model_dir, precision="exact")
    assert small.sessions.huge_pages.reason == huge_pages.NOT_ASKED
    assert small.sessions.huge_pages.describe() == (
        "weights on 4 KB pages: not asked for (huge_pages=False, or PHI3V_HUGE_PAGES=0)"
    )
    expected = small.generate(question, max_new_tokens=16).token_ids
    monkeypatch.delenv(huge_pages.HUGE_PAGES_ENV)
    assert Pipeline.load(tiny_int4_model_dir).sessions.huge_pages.reason == huge_pages.NOT_ASKED
    pipe = Pipeline.load(tiny_int4_model_dir, precision="exact", huge_pages=True)
    moved = pipe.sessions.huge_pages
    if moved.reason:
        pytest.skip(moved.reason)
    if moved.failed and not moved.collapsed:  # memory too fragmented, not our doing
        pytest.skip("the kernel found no free 2 MB blocks")
    assert moved.collapsed > 0
    assert pipe.generate(question, max_new_tokens=16).token_ids == expected


def test_the_benchmark_compares_both_page_sizes_inside_each_process():
    from tests.bench_modules import bench_modules

    def process(huge: list[list[float]], small: list[list[float]]) -> dict:
        return {
            "first": "2 MB pages", "prefill_s": {"2 MB pages": 7.0, "4 KB pages": 7.5},
            "step_ms": {"2 MB pages": huge, "4 KB pages": small},
            "moved": "3.0 GB of weights on 2 MB pages (6.0 s)", "same_tokens": True,
        }  # fmt: skip

    result = {
        "date": "2026-12-08", "commit": "abc", "cpu": "a CPU", "flags": ["avx2"],
        "command": "python bench/huge_pages.py", "load_before": [0.5], "load_after": [1.0],
        "positions": 256, "block": 3, "rounds": 2,
        # first steps of each block (500) are left out; per process 4 KB / 2 MB: 1.25, 0.8
        "processes": [
            process([[500, 80, 80], [500, 80, 80]], [[500, 100, 100], [500, 100, 100]]),
            process([[500, 100, 100], [500, 100, 100]], [[500, 80, 80], [500, 80, 80]]),
        ],
    }  # fmt: skip
    with bench_modules("huge_pages") as (bench,):
        text = bench.report(result)
    assert "| 1 | 2 MB pages | 7.0 | 80.0 | 7.5 | 100.0 | 1.250 | 2 of 2 |" in text
    assert "**1.000x** (geometric mean); faster on 2 MB pages in 2 of 4 rounds" in text
    assert "The same tokens on both: yes." in text
