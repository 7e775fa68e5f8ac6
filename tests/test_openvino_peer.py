"""bench/openvino_peer.py on a tiny int4 set: every runtime's row, timed or with its reason.

OpenVINO is a benchmark peer (the ``bench`` extra), not a test dependency: without it this is
skipped. Nothing here asserts a speed; the script's results file is checked for completeness.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v.config import load_config
from phi3v.convert import fast_models
from phi3v.testing import build_model

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "openvino_peer.py"
CROPS = (2, 3)  # the smallest images: the global view with one tile, and with two
RUNTIMES = ("openvino", "exact", "fast")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="openvino is not installed (it is in the bench extra: pip install -e '.[bench]')",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """The script's JSON results on a tiny int4 set that has its fast copies."""
    folder = build_model(tmp_path_factory.mktemp("ov-model"), weights="int4")
    fast_models(load_config(folder))
    out = tmp_path_factory.mktemp("ov-results")
    command = [sys.executable, str(SCRIPT), "--model", str(folder), "--positions", "24"]
    command += ["--crops", ",".join(map(str, CROPS)), "--repeats", "1", "--results", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    assert (out / "openvino.md").read_text().startswith("# OpenVINO")
    return json.loads((out / "openvino.json").read_text())


def test_every_measurement_has_a_row_for_every_runtime(results):
    measurements = {row["measurement"] for row in results["rows"]}
    assert len(measurements) == 2 + len(CROPS)  # prefill, decode, one vision row per crop count
    pairs = {(row["measurement"], row["runtime"]) for row in results["rows"]}
    assert pairs == {(m, r) for m in measurements for r in RUNTIMES}


def test_each_row_is_timed_or_says_why_not(results):
    for row in results["rows"]:
        timed = row.get("median_s") is not None and row["peak_rss_mib"] > 0
        assert timed or row.get("error") or row.get("skipped"), row


def test_exact_runs_everything_it_is_given(results):
    exact = [row for row in results["rows"] if row["runtime"] == "exact"]
    assert all(row.get("median_s") is not None for row in exact), exact


def test_openvino_outputs_agree_with_exact_where_it_ran(results):
    ran = [r for r in results["rows"] if r["runtime"] == "openvino" and "median_s" in r]
    assert ran, "OpenVINO ran nothing"
    for row in ran:  # bf16 on AMX CPUs: percent-level differences, not garbage
        assert row["difference_from_exact"] < 0.2, row


def test_the_results_record_the_machine_and_the_openvino_settings(results):
    assert results["cpu"] and results["versions"]["openvino"]
    assert results["loadavg_start"] and results["loadavg_end"]
    ran = [r for r in results["rows"] if r["runtime"] == "openvino" and "median_s" in r]
    settings = ran[0]["settings"]
    assert settings["INFERENCE_NUM_THREADS"] == str(results["threads"])
