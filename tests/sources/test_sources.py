"""`kvpilot download` against real servers on loopback: S3 through moto's server (a real
implementation of the S3 API, driven by boto3) and the Hub through huggingface_hub against a
stand-in that serves local folders over the Hub's HTTP file API (tests/support/hubstandin.py).
Each bad source gets its reason."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvpilot_engine.sources import MANIFEST, SourceError, download, parse_uri

from tests.support.hubstandin import HubStandIn, serving

slow = pytest.mark.slow


# --- URIs (fast) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "scheme", "location", "path", "revision"),
    [
        ("hf://HuggingFaceTB/SmolLM2-135M", "hf", "HuggingFaceTB/SmolLM2-135M", "", None),
        ("hf://org/repo@v1.0", "hf", "org/repo", "", "v1.0"),
        ("s3://models/smol/v1", "s3", "models", "smol/v1", None),
        ("s3://models", "s3", "models", "", None),
        ("pvc://weights/llama/8b", "pvc", "weights", "llama/8b", None),
    ],
)
def test_parse_uri(uri: str, scheme: str, location: str, path: str, revision: str | None) -> None:
    src = parse_uri(uri)
    assert (src.scheme, src.location, src.path, src.revision) == (scheme, location, path, revision)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("gs://bucket/x", "UnknownScheme"),
        ("ftp://host/x", "UnknownScheme"),
        ("/models/x", "InvalidURI"),
        ("hf://a/b/c", "InvalidURI"),
        ("hf://org/repo@", "InvalidURI"),
        ("s3://UPPER/x", "InvalidURI"),
        ("pvc://claim/../etc", "InvalidURI"),
    ],
)
def test_bad_uri(uri: str, reason: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        download(uri, tmp_path)
    assert err.value.reason == reason


# --- fixtures --------------------------------------------------------------------------------


def _hf_folder(root: Path, weights: bool = True) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (root / "tokenizer.json").write_text("{}")
    if weights:
        (root / "model.safetensors").write_bytes(os.urandom(3 << 20))
        (root / "pytorch_model.bin").write_bytes(b"a pickled copy the download skips")
    return root


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubStandIn, str]]:
    base = tmp_path_factory.mktemp("hub")
    stand_in = HubStandIn(
        repos={
            "org/tiny": _hf_folder(base / "tiny"),
            "org/empty": _hf_folder(base / "empty", weights=False),
            "org/rotten": _hf_folder(base / "rotten"),
        }
    )
    with serving(stand_in) as endpoint:
        yield stand_in, endpoint


@pytest.fixture
def hub_env(hub: tuple[HubStandIn, str], monkeypatch: pytest.MonkeyPatch) -> HubStandIn:
    from huggingface_hub import constants

    stand_in, endpoint = hub
    # huggingface_hub reads HF_ENDPOINT once, at import; the CLI tests pass it in the env.
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    stand_in.corrupt = set()
    return stand_in


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the Hub ---------------------------------------------------------------------------------


@slow
def test_hub_download_pinned_verified_reused(hub_env: HubStandIn, tmp_path: Path) -> None:
    src = hub_env.repos["org/tiny"]
    fetched = download("hf://org/tiny", tmp_path / "m", log_interval=0)
    assert fetched.revision == hub_env.commit("org/tiny")
    # Safetensors present: the pickled copy is not fetched.
    assert sorted(fetched.files) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert _sha256(tmp_path / "m/model.safetensors") == _sha256(src / "model.safetensors")
    assert not (tmp_path / "m/pytorch_model.bin").exists()
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert manifest["revision"] == fetched.revision
    assert manifest["files"]["model.safetensors"]["sha256"] == _sha256(src / "model.safetensors")
    # A second run (another replica on a shared cache) downloads nothing.
    hub_env.requests.clear()
    again = download("hf://org/tiny", tmp_path / "m", log_interval=0)
    assert again.revision == fetched.revision
    assert not [r for r in hub_env.requests if "/resolve/" in r]
    # The commit pins: @<commit> resolves to itself.
    pinned = download(f"hf://org/tiny@{fetched.revision}", tmp_path / "p", log_interval=0)
    assert pinned.revision == fetched.revision


@slow
def test_hub_bad_sources(hub_env: HubStandIn, tmp_path: Path) -> None:
    cases = {
        "hf://org/missing": ("NotFound", "repository not found"),
        "hf://org/tiny@v9": ("NotFound", "revision 'v9' not found"),
        "hf://org/empty": ("NoWeights", "config.json, tokenizer.json"),
    }
    for uri, (reason, text) in cases.items():
        with pytest.raises(SourceError) as err:
            download(uri, tmp_path / "x", log_interval=0)
        assert (err.value.reason, uri) == (reason, uri)
        assert text in str(err.value)


@slow
def test_hub_checksum_mismatch(hub_env: HubStandIn, tmp_path: Path) -> None:
    hub_env.corrupt = {"model.safetensors"}
    with pytest.raises(SourceError) as err:
        download("hf://org/rotten", tmp_path / "m", log_interval=0)
    assert err.value.reason == "ChecksumMismatch"
    assert "model.safetensors" in str(err.value)
    assert not (tmp_path / "m/model.safetensors").exists()  # removed: a retry fetches it again
    assert not (tmp_path / "m" / MANIFEST).exists()
    hub_env.corrupt = set()
    assert download("hf://org/rotten", tmp_path / "m", log_interval=0).files


@slow
def test_network_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    from kvpilot_operator.local.procs import free_ports

    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    with pytest.raises(SourceError) as err:
        download("hf://org/tiny", tmp_path, log_interval=0)
    assert err.value.reason == "Unreachable" and dead in str(err.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(SourceError) as err:
        download("s3://models/x", tmp_path, log_interval=0)
    assert err.value.reason == "Unreachable" and dead in str(err.value)


# --- S3 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from kvpilot_operator.local.procs import free_ports
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """A boto3 client on the moto server, with the standard AWS environment set for it."""
    import boto3

    for key, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3")


@slow
def test_s3_download_resume_pin(s3, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="models")
    weights = os.urandom(2 << 20)
    s3.put_object(Bucket="models", Key="smol/v1/model.safetensors", Body=weights)
    s3.put_object(Bucket="models", Key="smol/v1/config.json", Body=b"{}")
    s3.put_object(Bucket="models", Key="smol/v10/other.gguf", Body=b"not under smol/v1/")
    dest = tmp_path / "m"
    # A partial file from an interrupted run, with one corrupt byte: resumed, then caught.
    dest.mkdir()
    (dest / "model.safetensors.partial").write_bytes(b"\0" + weights[1 : 1 << 20])
    with pytest.raises(SourceError) as err:
        download("s3://models/smol/v1", dest, log_interval=0)
    assert err.value.reason == "ChecksumMismatch" and "md5 (ETag)" in str(err.value)
    # A clean partial resumes: only the rest is fetched.
    (dest / "model.safetensors.partial").write_bytes(weights[: 1 << 20])
    fetched = download("s3://models/smol/v1", dest, log_interval=0)
    assert sorted(fetched.files) == ["config.json", "model.safetensors"]
    assert (dest / "model.safetensors").read_bytes() == weights
    assert fetched.downloaded_bytes == len(weights) + 2
    # Reused, and pinned: the same listing is the same revision; a changed one is refused.
    assert download("s3://models/smol/v1", dest, revision=fetched.revision).downloaded_bytes == 0
    s3.put_object(Bucket="models", Key="smol/v1/config.json", Body=b'{"changed": 1}')
    with pytest.raises(SourceError) as err:
        download("s3://models/smol/v1", tmp_path / "n", revision=fetched.revision)
    assert err.value.reason == "RevisionMismatch"


@slow
def test_s3_versioned_bucket_pins_versions(s3, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="versioned")
    s3.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket="versioned", Key="m.gguf", Body=b"GGUF v1")
    fetched = download("s3://versioned/m.gguf", tmp_path / "m", log_interval=0)
    assert fetched.files["m.gguf"]["versionId"]
    assert (tmp_path / "m/m.gguf").read_bytes() == b"GGUF v1"


@slow
def test_s3_bad_sources(s3, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="docs")
    s3.put_object(Bucket="docs", Key="readme/README.md", Body=b"hello")
    cases = {
        "s3://no-such-bucket/x": "NotFound",
        "s3://docs/nothing-here": "NotFound",
        "s3://docs/readme": "NoWeights",
    }
    for uri, reason in cases.items():
        with pytest.raises(SourceError) as err:
            download(uri, tmp_path / "x", log_interval=0)
        assert (uri, err.value.reason) == (uri, reason)


# --- pvc -------------------------------------------------------------------------------------


def test_pvc_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPILOT_PVC_ROOT", str(tmp_path / "mnt"))
    (tmp_path / "mnt/weights/llama").mkdir(parents=True)
    (tmp_path / "mnt/weights/llama/model.gguf").write_bytes(b"GGUF")
    fetched = download("pvc://weights/llama", tmp_path / "m", log_interval=0)
    assert (tmp_path / "m/model.gguf").read_bytes() == b"GGUF"
    with pytest.raises(SourceError) as err:
        download("pvc://other/x", tmp_path / "n", log_interval=0)
    assert err.value.reason == "NotFound"
    assert download("pvc://weights/llama", tmp_path / "m", revision=fetched.revision).files


# --- the CLI ---------------------------------------------------------------------------------


def _kvpilot(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvpilot_engine.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@slow
def test_cli_download_and_failure_line(hub: tuple[HubStandIn, str], tmp_path: Path) -> None:
    _, endpoint = hub
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    term = tmp_path / "termination-log"
    ok = _kvpilot(
        "download", "hf://org/tiny", str(tmp_path / "m"), "--termination-message-path", str(term),
        env=env,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    result = json.loads(term.read_text())
    assert result["revision"] == json.loads(ok.stdout)["revision"]
    assert '"event": "download complete"' in ok.stderr
    bad = _kvpilot("download", "hf://org/missing", str(tmp_path / "x"), env=env)
    assert bad.returncode == 1
    last = json.loads(bad.stderr.strip().splitlines()[-1])
    assert last["reason"] == "NotFound" and "hf://org/missing" in last["error"]


@slow
def test_cli_generate_downloads_hub_model(
    smollm2_path: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`kvpilot generate org/repo` (serve's model argument and flags) fetches SmolLM2's GGUF
    through the Hub client into --download-dir, then runs it: the bytes are the bundled file's
    and the model answers."""
    repo = tmp_path_factory.mktemp("smol-repo")
    (repo / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(smollm2_path)
    with serving(HubStandIn(repos={"HuggingFaceTB/SmolLM2-gguf": repo})) as endpoint:
        env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
        flags = ["-p", "Hi", "--max-tokens", "2", "--device", "cpu"]
        hub_run = _kvpilot(
            "generate", "HuggingFaceTB/SmolLM2-gguf", "--revision", "main",
            "--download-dir", str(tmp_path / "dl"), *flags, env=env,
        )  # fmt: skip
    assert hub_run.returncode == 0, hub_run.stderr
    (got,) = (tmp_path / "dl").rglob("*.gguf")  # the Hub's cache layout, under --download-dir
    assert _sha256(got) == _sha256(Path(smollm2_path))
    assert hub_run.stdout.strip()


# --- OCI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oci(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from tests.support.registry import registry

    workdir = tmp_path_factory.mktemp("registry")
    with registry(workdir) as address:
        yield address, workdir / "data"


@slow
def test_oci_artifact_pinned_verified(oci: tuple[str, Path], tmp_path: Path) -> None:
    from tests.support.registry import push_files

    address, data = oci
    weights = os.urandom(1 << 20)
    files = {"model.gguf": weights, "README.md": b"a model"}
    digest = push_files(address, "models/smol", "v1", files)
    fetched = download(f"oci://{address}/models/smol:v1", tmp_path / "m", log_interval=0)
    assert fetched.revision == digest
    assert (tmp_path / "m/model.gguf").read_bytes() == weights
    # By digest; and pinned: after the tag moved, the pin still gets the pinned weights.
    assert download(f"oci://{address}/models/smol@{digest}", tmp_path / "d").revision == digest
    moved = push_files(address, "models/smol", "v1", {"model.gguf": b"other weights"})
    pinned = download(f"oci://{address}/models/smol:v1", tmp_path / "p", revision=digest)
    assert pinned.revision == digest and (tmp_path / "p/model.gguf").read_bytes() == weights
    assert download(f"oci://{address}/models/smol:v1", tmp_path / "n").revision == moved
    cases = {
        f"oci://{address}/models/none:v1": "NotFound",
        f"oci://{address}/models/smol:v9": "NotFound",
    }
    push_files(address, "models/docs", "v1", {"README.md": b"no weights"})
    cases[f"oci://{address}/models/docs:v1"] = "NoWeights"
    for uri, reason in cases.items():
        with pytest.raises(SourceError) as err:
            download(uri, tmp_path / "x", log_interval=0)
        assert (uri, err.value.reason) == (uri, reason)
    # A blob rotten in the registry's storage: caught by its digest, removed.
    blob = weights[:0] + os.urandom(1 << 16)
    rotten = push_files(address, "models/rotten", "v1", {"model.gguf": blob})
    (stored,) = data.rglob(f"blobs/sha256/*/{hashlib.sha256(blob).hexdigest()}/data")
    stored.write_bytes(b"\0" + blob[1:])
    with pytest.raises(SourceError) as err:
        download(f"oci://{address}/models/rotten@{rotten}", tmp_path / "r", log_interval=0)
    assert err.value.reason == "ChecksumMismatch" and "model.gguf" in str(err.value)
    assert not (tmp_path / "r/model.gguf").exists()


def test_serve_fetches_a_uri_model_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvpilot serve URI` (and generate, run-batch): the model is downloaded into
    --download-dir and served from there under the name the user wrote; local paths and
    bundled names are left alone."""
    from kvpilot_engine.cli import build_parser, fetch_model

    monkeypatch.setenv("KVPILOT_PVC_ROOT", str(tmp_path / "mnt"))
    (tmp_path / "mnt/weights/smol").mkdir(parents=True)
    (tmp_path / "mnt/weights/smol/model.gguf").write_bytes(b"GGUF")
    ns = build_parser().parse_args(
        ["serve", "pvc://weights/smol", "--download-dir", str(tmp_path / "dl")]
    )
    fetch_model(ns)
    assert ns.model == str(tmp_path / "dl") and ns.served_model_name == "pvc://weights/smol"
    assert (tmp_path / "dl/model.gguf").read_bytes() == b"GGUF"
    for model in ("smollm2", str(tmp_path / "dl")):
        ns = build_parser().parse_args(["serve", model])
        fetch_model(ns)
        assert ns.model == model and ns.served_model_name is None
    ns = build_parser().parse_args(["serve", "gs://bucket/model"])
    with pytest.raises(ValueError, match="UnknownScheme"):
        fetch_model(ns)
