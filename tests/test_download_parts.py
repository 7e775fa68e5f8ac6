"""The download's parts one by one: files, URLs, the Hub client, the transfer, the manifest and
the meter (phi3v/files.py ... phi3v/meter.py), against a fake Hub on 127.0.0.1."""

import hashlib
import os
import threading

import pytest
import requests

from phi3v.errors import DownloadError
from phi3v.files import fsync_dir, git_blob_oid, hash_into, sha256_file, size_of
from phi3v.hub import (
    EndpointError,
    Hub,
    NetworkError,
    NotFoundError,
    RemoteFile,
    repo_commit,
    root_cause,
)
from phi3v.manifest import (
    LockedError,
    folder_lock,
    new_manifest,
    read_manifest,
    same_set,
    up_to_date,
    write_manifest,
)
from phi3v.meter import DownloadProgress, Meter
from phi3v.models import DEFAULT_MODEL, MODELS, model_spec
from phi3v.transfer import PART_SUFFIX, fetch_verified, missing_bytes
from phi3v.urls import origin, redact_text
from tests.fakehub import FakeHub

SPEC = MODELS[DEFAULT_MODEL]
HELLO = b"hello\n"
HELLO_SHA256 = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
HELLO_GIT_OID = "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of "hello\n"
DATA = bytes(range(256)) * 400
FILES = {"genai_config.json": b"{}\n", "model.onnx.data": DATA}


@pytest.fixture
def hub():
    with FakeHub(SPEC.repo, SPEC.folder, SPEC.revision, FILES) as fake:
        yield fake


def remote(name: str, data: bytes, sha256: str | None = None) -> RemoteFile:
    return RemoteFile(name=name, path=f"f/{name}", size=len(data), sha256=sha256, oid=None)


# --- files --------------------------------------------------------------------------------


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path):
    (tmp_path / "f").write_bytes(HELLO)
    assert sha256_file(tmp_path / "f") == HELLO_SHA256


def test_sha256_file_with_a_memo_does_not_read_an_unchanged_file_again(tmp_path):
    path, memo = tmp_path / "f", tmp_path / "memo" / "hashes.json"
    path.write_bytes(HELLO)
    assert sha256_file(path, memo=memo) == HELLO_SHA256
    stat = path.stat()
    path.write_bytes(b"HELLO\n")  # same size; the old mtime put back: looks unchanged
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_file(path, memo=memo) == HELLO_SHA256


def test_sha256_file_with_a_memo_hashes_a_changed_file_again(tmp_path):
    path, memo = tmp_path / "f", tmp_path / "hashes.json"
    path.write_bytes(HELLO)
    sha256_file(path, memo=memo)
    path.write_bytes(b"changed\n")
    assert sha256_file(path, memo=memo) == hashlib.sha256(b"changed\n").hexdigest()


def test_sha256_file_ignores_a_memo_that_is_not_json(tmp_path):
    (tmp_path / "f").write_bytes(HELLO)
    (tmp_path / "hashes.json").write_text("not json")
    assert sha256_file(tmp_path / "f", memo=tmp_path / "hashes.json") == HELLO_SHA256


def test_hash_into_feeds_the_file_to_a_running_hash(tmp_path):
    (tmp_path / "f").write_bytes(HELLO)
    digest = hash_into(tmp_path / "f", hashlib.sha256(b"before "))
    assert digest.hexdigest() == hashlib.sha256(b"before " + HELLO).hexdigest()


def test_git_blob_oid_is_the_id_git_gives_the_content(tmp_path):
    (tmp_path / "f").write_bytes(HELLO)
    assert git_blob_oid(tmp_path / "f") == HELLO_GIT_OID


def test_size_of_is_the_file_size_or_none_when_it_is_missing(tmp_path):
    assert size_of(tmp_path / "missing") is None
    (tmp_path / "f").write_bytes(HELLO)
    assert size_of(tmp_path / "f") == len(HELLO)


def test_fsync_dir_of_a_missing_folder_raises(tmp_path):
    fsync_dir(tmp_path)  # an existing folder: no error
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")


# --- URLs and the registry ----------------------------------------------------------------


def test_redact_text_hides_the_credentials_of_every_url_and_of_the_endpoint():
    text = "failed: user:pw@host/x and https://a:b@cdn/y?Signature=s"
    assert (
        redact_text(text, "user:pw@host")
        == "failed: ***@host/x and https://***@cdn/y?Signature=***"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://huggingface.co/api", ("https", "huggingface.co", 443)),
        ("http://127.0.0.1:8080/x", ("http", "127.0.0.1", 8080)),
        ("huggingface.co", None),
        ("http://host:port/", None),
    ],
)
def test_origin_is_scheme_host_and_port_with_the_default_port_filled_in(url, expected):
    assert origin(url) == expected


def test_model_spec_of_an_unknown_name_names_the_known_ones():
    assert model_spec(DEFAULT_MODEL) is SPEC
    with pytest.raises(DownloadError, match="choose one of phi-3-vision-cpu"):
        model_spec("phi-4")


# --- the Hub client -----------------------------------------------------------------------


def test_hub_lists_a_folder_with_sizes_and_the_sha256_of_lfs_files(hub):
    with Hub(hub.url) as client:
        files, _ = client.list_folder(SPEC.repo, SPEC.revision, SPEC.folder)
    by_name = {f.name: f for f in files}
    assert by_name["model.onnx.data"].size == len(DATA)
    assert by_name["model.onnx.data"].sha256 == hub.sha256("model.onnx.data")
    assert by_name["genai_config.json"].sha256 is None


def test_hub_file_url_is_the_resolve_url_of_the_file():
    client = Hub("https://hub.example/")
    assert client.file_url("a/b", "main", "f/x y") == "https://hub.example/a/b/resolve/main/f/x%20y"


def test_hub_sends_the_token_to_its_own_origin_only():
    client = Hub("https://hub.example", "hf_x")
    assert client.auth_for("https://hub.example/a") == {"Authorization": "Bearer hf_x"}
    assert client.auth_for("https://cdn.example/a") == {}
    assert client.auth_for("http://hub.example/a") == {}


def test_hub_scrub_shows_the_endpoint_without_its_password():
    client = Hub("http://user:pw@hub.example")
    assert client.scrub("no route to http://user:pw@hub.example/api") == (
        "no route to http://***@hub.example/api"
    )


def test_hub_get_of_a_missing_file_raises_not_found(hub):
    with Hub(hub.url) as client, pytest.raises(NotFoundError, match="HTTP 404 for the file"):
        client.get(client.file_url(SPEC.repo, SPEC.revision, "nope"), what="the file")


def test_hub_get_follows_the_redirect_and_reports_the_repo_commit(hub):
    url_path = f"{SPEC.folder}/model.onnx.data"
    with Hub(hub.url) as client:
        response = client.get(client.file_url(SPEC.repo, SPEC.revision, url_path), what="x")
        with response:
            assert response.content == DATA
            assert repo_commit(response) == hub.commit


def test_hub_network_error_names_the_reason_and_the_tries():
    error = Hub("http://127.0.0.1:9", retries=2).network_error("Connection refused")
    assert isinstance(error, NetworkError)
    assert "cannot reach http://127.0.0.1:9 (Connection refused) after 3 tries" in str(error)


def test_hub_refuses_an_answer_that_is_not_a_file_list(hub):
    hub.tree_body = b"<html></html>"
    with Hub(hub.url) as client, pytest.raises(EndpointError, match="JSON file list"):
        client.list_folder(SPEC.repo, SPEC.revision, SPEC.folder)


def test_root_cause_is_the_os_reason_inside_a_requests_error():
    inner = ConnectionRefusedError(111, "Connection refused")
    try:
        try:
            raise inner
        except OSError as error:
            raise requests.ConnectionError("wrapped") from error
    except requests.ConnectionError as outer:
        assert root_cause(outer) == "Connection refused"


# --- the transfer -------------------------------------------------------------------------


def test_fetch_verified_puts_the_file_in_place_and_no_part_is_left(hub, tmp_path):
    data = FILES["model.onnx.data"]
    path, sha256 = f"{SPEC.folder}/model.onnx.data", hub.sha256("model.onnx.data")
    target = RemoteFile("model.onnx.data", path, len(data), sha256, oid=None)
    with Hub(hub.url, backoff=0) as client:
        url = client.file_url(SPEC.repo, SPEC.revision, target.path)
        assert fetch_verified(client, url, target, tmp_path, Meter(None, False)) == hub.commit
    assert (tmp_path / target.name).read_bytes() == data
    assert not (tmp_path / (target.name + PART_SUFFIX)).exists()


def test_missing_bytes_counts_what_the_part_file_does_not_hold(tmp_path):
    target = remote("x", DATA)
    assert missing_bytes(tmp_path, target) == len(DATA)
    (tmp_path / ("x" + PART_SUFFIX)).write_bytes(DATA[:1000])
    assert missing_bytes(tmp_path, target) == len(DATA) - 1000
    (tmp_path / "x").write_bytes(DATA)
    assert missing_bytes(tmp_path, target) == 0


# --- the manifest and the lock ------------------------------------------------------------


def test_a_written_manifest_reads_back_as_it_was(tmp_path):
    manifest = new_manifest(SPEC, SPEC.revision, None, [remote("x", HELLO)], None)
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest


def test_read_manifest_of_a_folder_without_one_is_none(tmp_path):
    assert read_manifest(tmp_path) is None


def test_new_manifest_keeps_the_verified_mark_of_an_unchanged_file_only():
    old = new_manifest(SPEC, "main", None, [remote("a", HELLO), remote("b", HELLO)], None)
    for entry in old["files"].values():
        entry["verified"] = True
    manifest = new_manifest(SPEC, "main", None, [remote("a", HELLO), remote("b", DATA)], old)
    assert {n: e["verified"] for n, e in manifest["files"].items()} == {"a": True, "b": False}


def test_same_set_matches_the_revision_asked_for_or_the_commit_it_was_pinned_to():
    manifest = new_manifest(SPEC, "main", "1" * 40, [remote("a", HELLO)], None)
    assert same_set(manifest, SPEC, "main")
    assert same_set(manifest, SPEC, "1" * 40)
    assert not same_set(manifest, SPEC, "2" * 40)
    assert not same_set(manifest, MODELS["phi-3.5-vision"], "main")


def test_up_to_date_wants_every_file_verified_and_there(tmp_path):
    manifest = new_manifest(SPEC, "main", None, [remote("a", HELLO)], None)
    (tmp_path / "a").write_bytes(HELLO)
    assert not up_to_date(manifest, tmp_path, SPEC, "main")
    manifest["files"]["a"]["verified"] = True
    assert up_to_date(manifest, tmp_path, SPEC, "main")


def test_folder_lock_refuses_a_second_holder_while_the_first_holds_it(tmp_path):
    refused = []

    def second() -> None:
        try:
            with folder_lock(tmp_path):
                pass
        except LockedError as error:
            refused.append(str(error))

    with folder_lock(tmp_path):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
    assert refused and f"(pid {os.getpid()})" in refused[0]


# --- the meter ----------------------------------------------------------------------------


def test_meter_reports_the_bytes_of_the_set_as_files_arrive_and_are_placed():
    events: list[DownloadProgress] = []
    meter = Meter(events.append, bars=False)
    meter.total = 300
    first, second = remote("a", bytes(100)), remote("b", bytes(200))
    meter.placed(first)
    meter.start(second, have=50)
    meter.end()
    meter.placed(second)
    assert [(e.filename, e.done, e.total) for e in events] == [
        ("a", 100, 300),
        ("b", 150, 300),
        ("b", 300, 300),
    ]
