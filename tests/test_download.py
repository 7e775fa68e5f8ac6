"""phi3v.download and download_models.py against a fake Hub on 127.0.0.1 (tests/fakehub.py)."""

import dataclasses
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from phi3v.download import DiskSpaceError, FolderError, download_model
from phi3v.errors import DownloadError
from phi3v.hub import AuthError, NetworkError, NotFoundError, RangeNotSatisfiableError, ServerError
from phi3v.manifest import LOCK_NAME, MANIFEST_NAME, LockedError, is_complete
from phi3v.meter import DownloadProgress
from phi3v.models import DEFAULT_MODEL, MODELS, model_folder
from phi3v.transfer import ChecksumError
from phi3v.urls import redact_url
from tests.fakehub import FakeHub

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC = MODELS[DEFAULT_MODEL]
BIG = "phi-3-v-128k-instruct-text.onnx.data"
_rng = random.Random(1234)
FILES = {  # .json files are plain git files on the fake Hub, the others LFS files
    "genai_config.json": b'{"model": {"type": "phi3v"}}\n',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
    "phi-3-v-128k-instruct-text.onnx": _rng.randbytes(3_000),
    BIG: _rng.randbytes(200_000),
}
TOTAL = sum(len(data) for data in FILES.values())
FAST = {"backoff": 0, "timeout": 5, "chunk_bytes": 16 * 1024, "bars": False}
TOKEN = "hf_secret"
PASSWORD = "pa55word"


@pytest.fixture(autouse=True)
def no_hub_environment(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


@pytest.fixture
def hub():
    with FakeHub(SPEC.repo, SPEC.folder, SPEC.revision, FILES) as hub:
        yield hub


@pytest.fixture
def other_host():
    """A second fake Hub with the same files on another port of 127.0.0.1: another origin."""
    with FakeHub(SPEC.repo, SPEC.folder, SPEC.revision, FILES) as other:
        yield other


def fetch(hub: FakeHub, root: Path, name: str = DEFAULT_MODEL, **kwargs) -> Path:
    return download_model(name, root, endpoint=hub.url, **{**FAST, **kwargs})


def leave_part(root: Path, name: str, data: bytes) -> Path:
    """A .part file as a killed earlier run would have left it."""
    folder = model_folder(DEFAULT_MODEL, root)
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / (name + ".part")
    part.write_bytes(data)
    return part


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- registry -----------------------------------------------------------------------------


def test_registry_holds_the_three_model_sets_with_the_legacy_one_as_default():
    assert list(MODELS) == ["phi-3-vision-cpu", "phi-3-vision", "phi-3.5-vision"]
    assert DEFAULT_MODEL == "phi-3-vision-cpu"
    assert SPEC.repo == "microsoft/Phi-3-vision-128k-instruct-onnx-cpu"
    assert SPEC.folder == "cpu-int4-rtn-block-32-acc-level-4"
    assert SPEC.revision == "5ec8e2b2b96cd2815f8478c6a728616f9043e62a"
    assert [spec.layout for spec in MODELS.values()] == ["legacy", "redesigned", "redesigned"]
    for name in ("phi-3-vision", "phi-3.5-vision"):
        assert MODELS[name].folder == "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"


def test_model_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SPEC.revision = "main"


def test_model_folder_is_root_slash_name():
    assert model_folder("phi-3.5-vision", "somewhere") == Path("somewhere/phi-3.5-vision")


def test_unknown_model_name_is_refused_with_the_known_names(tmp_path):
    with pytest.raises(DownloadError, match="phi-3-vision-cpu, phi-3-vision, phi-3.5-vision"):
        download_model("phi-4", tmp_path)


# --- a fresh download ---------------------------------------------------------------------


def test_fresh_download_puts_every_file_flat_into_root_slash_name(hub, tmp_path):
    folder = fetch(hub, tmp_path)
    assert folder == tmp_path / "phi-3-vision-cpu"
    assert model_files(folder) == FILES


def test_fresh_download_leaves_only_the_model_files_manifest_and_lock(hub, tmp_path):
    folder = fetch(hub, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, MANIFEST_NAME, LOCK_NAME])


def test_fresh_download_follows_the_redirect_of_lfs_files(hub, tmp_path):
    fetch(hub, tmp_path)
    assert any(path == f"/cdn/{BIG}" for path, _ in hub.requests)


def test_manifest_records_revision_sizes_and_sha256(hub, tmp_path):
    folder = fetch(hub, tmp_path)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert (manifest["repo"], manifest["revision"]) == (SPEC.repo, SPEC.revision)
    assert manifest["commit"] == SPEC.revision
    assert manifest["files"][BIG] == {
        "path": f"{SPEC.folder}/{BIG}",
        "size": 200_000,
        "sha256": hub.sha256(BIG),
        "oid": hub.git_oid(BIG),
        "verified": True,
    }
    assert manifest["files"]["genai_config.json"]["sha256"] is None  # git file: size only


def test_tree_api_pages_are_all_followed(hub, tmp_path):
    hub.page_size = 2
    assert model_files(fetch(hub, tmp_path)) == FILES


def test_main_revision_records_the_commit_the_hub_reports_and_sticks_to_it(tmp_path):
    spec = MODELS["phi-3-vision"]
    with FakeHub(spec.repo, spec.folder, "main", FILES) as hub:
        folder = fetch(hub, tmp_path, "phi-3-vision")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert (manifest["revision"], manifest["commit"]) == ("main", hub.commit)
    paths = [path for path, _ in hub.content_requests()]
    assert "/resolve/main/" in paths[0]
    assert all(f"/resolve/{hub.commit}/" in path for path in paths[1:])


def test_hf_token_is_sent_as_a_bearer_token(hub, tmp_path, monkeypatch):
    hub.token = "hf_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    fetch(hub, tmp_path)
    assert all(headers["Authorization"] == "Bearer hf_secret" for _, headers in hub.requests)


def test_hf_endpoint_environment_variable_picks_the_server(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    download_model(DEFAULT_MODEL, tmp_path, **FAST)
    assert is_complete(model_folder(DEFAULT_MODEL, tmp_path))


def test_tree_api_pages_with_relative_links_are_followed(hub, tmp_path):
    hub.page_size, hub.link_base = 2, ""  # Link: </api/models/...?cursor=2>; rel="next"
    assert model_files(fetch(hub, tmp_path)) == FILES


# --- secrets: the token goes to the endpoint only, URLs are shown without credentials -----


def authorizations(hub: FakeHub) -> list[str | None]:
    return [headers.get("Authorization") for _, headers in hub.requests]


def with_password(url: str) -> str:
    """``url`` with a user and PASSWORD in it: http://user:PASSWORD@host:port."""
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}user:{PASSWORD}@{rest}"


def test_hf_token_is_not_sent_to_another_host_the_next_page_link_names(
    hub, other_host, tmp_path, monkeypatch
):
    hub.token = TOKEN
    hub.page_size, hub.link_base = 2, other_host.url
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(DownloadError):
        fetch(hub, tmp_path)
    assert authorizations(hub) == [f"Bearer {TOKEN}"]  # the endpoint's first page got it
    assert other_host.requests == []  # nothing at all went there, so neither did the token


def test_a_next_page_link_to_another_host_fails_with_a_message_naming_both(
    hub, other_host, tmp_path
):
    hub.page_size, hub.link_base = 2, other_host.url
    expected = (
        f"{re.escape(hub.url)} linked the next page of its file list to another host "
        f"\\({re.escape(other_host.url)}/api/models/.*Check HF_ENDPOINT"
    )
    with pytest.raises(DownloadError, match=expected):
        fetch(hub, tmp_path)


def test_hf_token_is_not_sent_along_a_redirect_to_another_host(
    hub, other_host, tmp_path, monkeypatch
):
    hub.token = TOKEN
    hub.cdn_base = other_host.url  # LFS files: 302 from the endpoint to the other host
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert model_files(fetch(hub, tmp_path)) == FILES
    cdn_headers = [headers for path, headers in other_host.requests if path.startswith("/cdn/")]
    assert len(cdn_headers) == 2  # the two LFS files, fetched from the other host
    assert all("Authorization" not in headers for headers in cdn_headers)
    assert set(authorizations(hub)) == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secret@host/x", "http://***@host/x"),
        ("https://hf_abc@host:8443/a/b?cursor=2", "https://***@host:8443/a/b?cursor=2"),
        ("http://us@er:p@ss@host", "http://***@host"),  # up to the authority's last @
        ("user:secret@huggingface.co/api", "***@huggingface.co/api"),  # no scheme
    ],
)
def test_redact_url_replaces_user_and_password_with_stars(url, shown):
    assert redact_url(url) == shown


def test_redact_url_hides_the_credentials_of_a_signed_link():
    url = "https://cdn.example/f?Expires=9&Policy=p&Signature=s&Key-Pair-Id=k&X-Amz-Credential=c"
    assert redact_url(url) == (
        "https://cdn.example/f?Expires=9&Policy=***&Signature=***&Key-Pair-Id=***"
        "&X-Amz-Credential=***"
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://huggingface.co/api/models/a/b/tree/main/x?cursor=2",
        "https://host/a/path@with-an-at",
        "http://[::1",  # not a URL at all: given back, no exception
        "",
    ],
)
def test_redact_url_leaves_a_url_without_credentials_as_it_is(url):
    assert redact_url(url) == url


def failing_endpoint(hub: FakeHub, failure: str) -> str:
    """The URL of an endpoint that fails the way ``failure`` says (the fake Hub, mostly)."""
    if failure == "unreachable":
        return closed_port_url()
    if failure == "not a URL":
        return "huggingface.co"
    if failure == "HTTP 404":
        hub.folder = "some-other-folder"
    elif failure == "HTTP 500":
        hub.fail_tree = [500]
    elif failure == "not a file list":
        hub.tree_body = b"<html>a login page</html>"
    elif failure == "next page elsewhere":
        hub.page_size, hub.link_base = 2, closed_port_url()
    return hub.url


@pytest.mark.parametrize(
    "failure",
    ["unreachable", "not a URL", "HTTP 404", "HTTP 500", "not a file list", "next page elsewhere"],
)
def test_error_messages_name_the_endpoint_without_its_password_or_the_token(
    hub, tmp_path, monkeypatch, failure
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    endpoint = failing_endpoint(hub, failure)
    with pytest.raises(DownloadError) as caught:
        download_model(
            DEFAULT_MODEL, tmp_path, endpoint=with_password(endpoint), **{**FAST, "retries": 0}
        )
    message = str(caught.value)
    assert PASSWORD not in message
    assert TOKEN not in message
    assert "***@" + endpoint.rpartition("://")[2] in message


# --- resuming -----------------------------------------------------------------------------


def test_resumes_with_a_range_request_after_the_connection_drops_mid_file(hub, tmp_path):
    hub.drop_after[BIG] = 50_000
    folder = fetch(hub, tmp_path)
    assert (folder / BIG).read_bytes() == FILES[BIG]
    first, second = hub.ranges_asked(BIG)
    assert first is None
    resumed_at = int(second.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 50_000


def test_resumes_a_part_file_left_by_a_killed_process(hub, tmp_path):
    leave_part(tmp_path, BIG, FILES[BIG][:70_000])
    folder = fetch(hub, tmp_path)
    assert hub.ranges_asked(BIG) == ["bytes=70000-"]
    assert (folder / BIG).read_bytes() == FILES[BIG]


def test_restarts_from_zero_when_the_server_ignores_range(hub, tmp_path):
    hub.ignore_range = True
    leave_part(tmp_path, BIG, FILES[BIG][:70_000])
    folder = fetch(hub, tmp_path)
    assert hub.ranges_asked(BIG) == ["bytes=70000-"]  # answered 200 with the whole file
    assert (folder / BIG).read_bytes() == FILES[BIG]


def test_restarts_from_zero_when_the_part_is_larger_than_the_file(hub, tmp_path):
    leave_part(tmp_path, BIG, FILES[BIG] + b"left over")
    folder = fetch(hub, tmp_path)
    assert hub.ranges_asked(BIG) == [None]
    assert (folder / BIG).read_bytes() == FILES[BIG]


def test_a_part_with_wrong_bytes_fails_its_sha256_and_is_fetched_again_from_zero(hub, tmp_path):
    leave_part(tmp_path, BIG, bytes(70_000))
    folder = fetch(hub, tmp_path)
    assert hub.ranges_asked(BIG) == ["bytes=70000-", None]
    assert (folder / BIG).read_bytes() == FILES[BIG]


def test_416_restarts_the_file_from_zero(hub, tmp_path):
    leave_part(tmp_path, BIG, FILES[BIG][:70_000])
    hub.fail_content[BIG] = [416]
    folder = fetch(hub, tmp_path)
    assert hub.ranges_asked(BIG) == ["bytes=70000-", None]
    assert (folder / BIG).read_bytes() == FILES[BIG]


def test_416_twice_fails_with_a_message_about_the_byte_range(hub, tmp_path):
    hub.fail_content[BIG] = [416, 416]
    with pytest.raises(RangeNotSatisfiableError, match="HTTP 416 .* refused the byte range"):
        fetch(hub, tmp_path)
    assert not (model_folder(DEFAULT_MODEL, tmp_path) / (BIG + ".part")).exists()


# --- verification -------------------------------------------------------------------------


def test_corrupted_bytes_fail_the_sha256_check_and_nothing_is_renamed_into_place(hub, tmp_path):
    hub.corrupt[BIG] = 2  # the first try and the fresh retry
    with pytest.raises(ChecksumError, match=f"sha256 .* the Hub lists {hub.sha256(BIG)}"):
        fetch(hub, tmp_path)
    folder = model_folder(DEFAULT_MODEL, tmp_path)
    assert not (folder / BIG).exists()
    assert not (folder / (BIG + ".part")).exists()
    assert not is_complete(folder)


def test_bytes_corrupted_once_are_fetched_again_from_zero(hub, tmp_path):
    hub.corrupt[BIG] = 1
    folder = fetch(hub, tmp_path)
    assert hub.ranges_asked(BIG) == [None, None]
    assert (folder / BIG).read_bytes() == FILES[BIG]


def test_is_complete_is_false_for_a_folder_without_manifest(tmp_path):
    assert not is_complete(tmp_path)


def test_is_complete_is_false_when_a_file_was_truncated(hub, tmp_path):
    folder = fetch(hub, tmp_path)
    (folder / BIG).write_bytes(FILES[BIG][:10])
    assert not is_complete(folder)


# --- HTTP errors and the network ----------------------------------------------------------


def test_404_for_an_unknown_revision_says_so(hub, tmp_path):
    with pytest.raises(NotFoundError, match="HTTP 404 .*no such revision"):
        fetch(hub, tmp_path, revision="0" * 40)


def test_404_for_a_missing_folder_says_so(hub, tmp_path):
    hub.folder = "some-other-folder"
    with pytest.raises(NotFoundError, match="HTTP 404 .*no such folder"):
        fetch(hub, tmp_path)


def test_404_for_an_unknown_repo_says_so(tmp_path):
    with (
        FakeHub("someone/else", SPEC.folder, SPEC.revision, FILES) as other,
        pytest.raises(NotFoundError, match="HTTP 404 .*no such repository"),
    ):
        fetch(other, tmp_path)


def test_401_without_a_token_says_to_set_hf_token(hub, tmp_path):
    hub.token = "hf_secret"
    with pytest.raises(AuthError, match="HTTP 401 .*no HF_TOKEN is set.*set HF_TOKEN"):
        fetch(hub, tmp_path)


def test_401_with_a_wrong_token_says_the_token_was_refused(hub, tmp_path):
    hub.token = "hf_secret"
    with pytest.raises(AuthError, match="HTTP 401 .*HF_TOKEN was refused"):
        fetch(hub, tmp_path, token="hf_wrong")


def test_403_says_the_token_has_no_access(hub, tmp_path):
    hub.fail_tree = [403]
    with pytest.raises(AuthError, match="HTTP 403 .*no access.*HF_TOKEN"):
        fetch(hub, tmp_path)


def test_server_errors_are_retried_until_the_server_recovers(hub, tmp_path):
    hub.fail_tree = [500, 503]
    hub.fail_content[BIG] = [500]
    folder = fetch(hub, tmp_path)
    assert model_files(folder) == FILES
    assert len(hub.ranges_asked(BIG)) == 2


def test_server_errors_that_persist_fail_with_a_try_later_message(hub, tmp_path):
    hub.fail_tree = [500] * 3
    with pytest.raises(ServerError, match="HTTP 500 .* 3 times in a row.*try again later"):
        fetch(hub, tmp_path, retries=2)
    assert len(hub.requests) == 3


def test_no_network_fails_with_a_message_naming_the_endpoint(tmp_path):
    url = closed_port_url()
    with pytest.raises(NetworkError, match=f"cannot reach {url} .*refused.* after 3 tries"):
        download_model(DEFAULT_MODEL, tmp_path, endpoint=url, **{**FAST, "retries": 2})


def test_an_endpoint_that_is_not_a_url_is_reported_as_such(tmp_path):
    with pytest.raises(DownloadError, match="cannot download from huggingface.co: .*HF_ENDPOINT"):
        download_model(DEFAULT_MODEL, tmp_path, endpoint="huggingface.co", **FAST)


def test_a_root_that_cannot_hold_folders_is_reported_with_what_to_do(hub, tmp_path):
    root = tmp_path / "a-file"
    root.write_text("")
    with pytest.raises(FolderError, match="cannot write into .*download into another folder"):
        fetch(hub, root)


@pytest.mark.parametrize(
    "failure",
    ["unreachable", "not a URL", "HTTP 404", "HTTP 500", "not a file list", "next page elsewhere"],
)
def test_error_messages_name_no_command_line_flag(hub, tmp_path, failure):
    endpoint = failing_endpoint(hub, failure)
    with pytest.raises(DownloadError) as caught:
        download_model(DEFAULT_MODEL, tmp_path, endpoint=endpoint, **{**FAST, "retries": 0})
    assert "--" not in str(caught.value)


@pytest.mark.parametrize("body", [b"<html>a login page</html>", b'{"files": []}'])
def test_a_tree_answer_that_is_not_a_json_list_is_reported(hub, tmp_path, body):
    hub.tree_body = body
    with pytest.raises(DownloadError, match="did not answer with a JSON file list.*HF_ENDPOINT"):
        fetch(hub, tmp_path)


def test_not_enough_disk_is_refused_before_any_content_request(hub, tmp_path):
    with pytest.raises(DiskSpaceError, match="not enough free disk space .*still to download"):
        fetch(hub, tmp_path, free_bytes=lambda folder: TOTAL - 1)
    assert hub.content_requests() == []


def test_disk_check_counts_only_the_bytes_still_missing(hub, tmp_path):
    leave_part(tmp_path, BIG, FILES[BIG][:70_000])
    folder = fetch(hub, tmp_path, free_bytes=lambda folder: TOTAL - 70_000)
    assert is_complete(folder)


# --- skipping, offline use, locking -------------------------------------------------------


def test_complete_folder_makes_no_request_at_all(hub, tmp_path):
    fetch(hub, tmp_path)
    requests_before = len(hub.requests)
    fetch(hub, tmp_path)
    assert len(hub.requests) == requests_before


def test_complete_folder_is_used_as_is_without_network(hub, tmp_path):
    folder = fetch(hub, tmp_path)
    assert download_model(DEFAULT_MODEL, tmp_path, endpoint=closed_port_url(), **FAST) == folder


def test_files_verified_by_a_failed_run_are_not_fetched_again(hub, tmp_path):
    hub.corrupt[BIG] = 2
    with pytest.raises(ChecksumError):
        fetch(hub, tmp_path)
    hub.requests.clear()
    fetch(hub, tmp_path)
    assert [path.rsplit("/", 1)[-1] for path, _ in hub.content_requests()] == [BIG]


def test_a_new_revision_fetches_only_the_files_that_changed(hub, tmp_path):
    fetch(hub, tmp_path)
    hub.files["genai_config.json"] = b'{"model": {"type": "phi3V"}}\n'  # same size as before
    hub.commit = "1" * 40
    hub.requests.clear()
    folder = fetch(hub, tmp_path, revision=hub.commit)
    assert [path.rsplit("/", 1)[-1] for path, _ in hub.content_requests()] == ["genai_config.json"]
    assert (folder / "genai_config.json").read_bytes() == hub.files["genai_config.json"]


def test_files_already_on_disk_without_manifest_are_hashed_and_kept(hub, tmp_path):
    folder = model_folder(DEFAULT_MODEL, tmp_path)
    folder.mkdir(parents=True)
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    fetch(hub, tmp_path)
    assert hub.content_requests() == []
    assert is_complete(folder)


def test_a_file_on_disk_with_the_right_size_but_wrong_bytes_is_replaced(hub, tmp_path):
    folder = model_folder(DEFAULT_MODEL, tmp_path)
    folder.mkdir(parents=True)
    (folder / BIG).write_bytes(bytes(len(FILES[BIG])))
    fetch(hub, tmp_path)
    assert (folder / BIG).read_bytes() == FILES[BIG]


def test_a_second_downloader_is_refused_while_the_first_holds_the_lock(hub, tmp_path):
    hub.hold = threading.Event()
    first = threading.Thread(target=fetch, args=(hub, tmp_path))
    first.start()
    try:
        assert hub.content_arrived.wait(timeout=5)
        with pytest.raises(LockedError, match=f"another process \\(pid {os.getpid()}\\)"):
            fetch(hub, tmp_path)
    finally:
        hub.hold.set()
        first.join(timeout=10)
    assert is_complete(model_folder(DEFAULT_MODEL, tmp_path))


def test_a_lock_file_left_by_a_dead_process_does_not_block(hub, tmp_path):
    folder = model_folder(DEFAULT_MODEL, tmp_path)
    folder.mkdir(parents=True)
    (folder / LOCK_NAME).write_text("999999")
    assert is_complete(fetch(hub, tmp_path))


# --- progress -----------------------------------------------------------------------------


def test_progress_callback_counts_every_byte_of_the_set(hub, tmp_path):
    events: list[DownloadProgress] = []
    fetch(hub, tmp_path, progress=events.append)
    assert {e.total for e in events} == {TOTAL}
    assert events[-1].done == TOTAL
    assert [e.done for e in events] == sorted(e.done for e in events)
    for name, data in FILES.items():
        assert max(e.file_done for e in events if e.filename == name) == len(data)
        assert {e.file_total for e in events if e.filename == name} == {len(data)}


def test_progress_reports_speed_and_a_non_negative_eta(hub, tmp_path):
    events: list[DownloadProgress] = []
    fetch(hub, tmp_path, progress=events.append)
    assert all(e.speed >= 0 for e in events)
    assert all(e.eta is None or e.eta >= 0 for e in events)
    assert any(e.speed > 0 and e.eta is not None for e in events)


def test_progress_counts_a_resumed_part_as_already_done(hub, tmp_path):
    leave_part(tmp_path, BIG, FILES[BIG][:70_000])
    events: list[DownloadProgress] = []
    fetch(hub, tmp_path, progress=events.append)
    assert next(e.file_done for e in events if e.filename == BIG) == 70_000


# --- the command line ---------------------------------------------------------------------


def run_cli(*args: str, endpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "download_models.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=REPO_ROOT,
    )


def test_cli_help_documents_every_option_and_its_default():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in (
        "--model",
        "--dir",
        "--revision",
        "--endpoint",
        "--list",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "default: phi-3-vision-cpu",
        "default: data",
    ):
        assert text in result.stdout


def test_cli_downloads_from_hf_endpoint_and_prints_the_folder(hub, tmp_path):
    result = run_cli("--dir", str(tmp_path), endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / DEFAULT_MODEL)
    assert is_complete(tmp_path / DEFAULT_MODEL)


def test_cli_failure_prints_one_line_without_traceback(hub, tmp_path):
    result = run_cli("--dir", str(tmp_path), "--revision", "0" * 40, endpoint=hub.url)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: HTTP 404")


def test_cli_failure_names_the_flag_that_changes_what_the_message_blames(hub, tmp_path):
    root = tmp_path / "a-file"
    root.write_text("")
    result = run_cli("--dir", str(root), endpoint=hub.url)
    assert result.stderr.startswith("error: cannot write into")
    assert result.stderr.rstrip().endswith("(--dir DIR downloads into another folder)")


def test_cli_failure_names_the_endpoint_without_its_password(hub, tmp_path):
    hub.folder = "some-other-folder"  # a 404, whose message holds the URL asked for
    result = run_cli("--dir", str(tmp_path), endpoint=with_password(hub.url))
    assert result.stderr.startswith("error: HTTP 404")
    assert PASSWORD not in result.stderr
    assert f"http://***@{hub.url.removeprefix('http://')}/" in result.stderr


def test_cli_unknown_model_prints_the_known_names(tmp_path):
    result = run_cli("--model", "phi-4", "--dir", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "error: unknown model set 'phi-4': choose one of "
        "phi-3-vision-cpu, phi-3-vision, phi-3.5-vision"
    )


def test_cli_list_names_every_model_set(tmp_path):
    result = run_cli("--list", "--dir", str(tmp_path))
    assert result.returncode == 0
    for spec in MODELS.values():
        assert f"{spec.name}" in result.stdout and spec.repo in result.stdout
