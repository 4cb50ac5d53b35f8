"""`kvpilot images build`: kvpilot's images from the repository's `images/` Containerfiles.

Three steps, each cached under ~/.cache/kvpilot/images:

1. the base: a minimal Debian rootfs (mmdebstrap, variant minbase, with python3, its venv module
   and the CA certificates) imported into podman's storage as `localhost/kvpilot/base:...`,
   tagged with a hash of how it was made;
2. the kvpilot wheel (`pip wheel --no-deps`; it carries the package's data files), placed in the
   build context as `dist/`;
3. `buildah bud --isolation chroot --layers` per image: the dependencies (torch, the bundled
   model, the wheel's requirements) in layers of their own, reused when only kvpilot's code
   changed, kvpilot's wheel above them. Each image carries a label with a hash of its
   inputs (the Containerfile, the wheel's contents, the base image's id, the build arguments but
   the revision); an image whose label matches is not rebuilt, so a second run takes seconds.

The host's CA bundle goes in as a build secret (pip in the build trusts what the host trusts, and
the bundle lands in no layer); the folder holding the local CPU torch wheel (pip's find-links on
this host) is bind-mounted read-only at /wheels instead of downloading torch.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpilot_operator.images.runtime import container_env, images_dir, missing_tools

LABEL_INPUTS = "io.kvpilot.image.inputs"
SOURCE_URL = "https://github.com/kvpilot/kvpilot"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# The base's python, which the torch wheel must match.
BASE_PYTHON_TAG = "cp311"


@dataclass(frozen=True)
class ImageSpec:
    name: str
    containerfile: str
    repository: str
    tag_suffix: str
    local_base: bool  # FROM the mmdebstrap base (else the Containerfile's own BASE)
    torch_wheels: bool  # mounts the local torch wheel folder
    default: bool  # built without --only

    def tag(self, version: str) -> str:
        return f"localhost/{self.repository}:{version}{self.tag_suffix}"


IMAGES = {
    s.name: s
    for s in (
        ImageSpec("operator", "operator.Containerfile", "kvpilot/operator", "", True, False, True),
        ImageSpec(
            "engine-cpu", "engine-cpu.Containerfile", "kvpilot/engine", "-cpu", True, True, True
        ),
        # Not by default: its CUDA base comes from a registry and torch from PyTorch's CUDA index.
        ImageSpec(
            "engine-gpu", "engine-gpu.Containerfile", "kvpilot/engine", "", False, False, False
        ),
    )
}


class BuildError(RuntimeError):
    pass


def _say(msg: str) -> None:
    print(msg, flush=True)


def _run(cmd: Sequence[str | Path], env: dict[str, str], **kw: object) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], env=env, capture_output=True, text=True, check=False, **kw
    )
    if proc.returncode:
        raise BuildError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def _podman_ok(args: Sequence[str], env: dict[str, str]) -> str | None:
    proc = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _stream(cmd: Sequence[str], env: dict[str, str], log_path: Path, verbose: bool) -> None:
    """Run a long step, its full output in `log_path`, its milestones (buildah's STEP lines) on
    stdout with the elapsed time."""
    start = time.monotonic()
    with log_path.open("w", buffering=1) as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if verbose or line.startswith("STEP "):
                _say(f"  [{time.monotonic() - start:5.0f}s] {line.rstrip()[:160]}")
        rc = proc.wait()
    if rc:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise BuildError(f"{cmd[0]} failed ({rc}); full log {log_path}:\n{tail}")


def base_image(env: dict[str, str], mirror: str = MIRROR, refresh: bool = False) -> str:
    """The Debian base in podman's storage, made once per recipe (mmdebstrap, then import)."""
    recipe = {"suite": SUITE, "mirror": mirror, "packages": BASE_PACKAGES, "variant": "minbase"}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    tag = f"localhost/kvpilot/base:{SUITE}-{key}"
    if not refresh and _podman_ok(["image", "exists", tag], env) is not None:
        _say(f"base        {tag} (cached)")
        return tag
    work = images_dir()
    rootfs = work / "tmp" / f"rootfs-{key}.tar"
    _say(f"base        mmdebstrap {SUITE} from {mirror} (about half a minute to two) ...")
    start = time.monotonic()
    _stream(
        [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            # Manuals and docs are dead weight in an image.
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            SUITE,
            str(rootfs),
            mirror,
        ],
        env,
        work / "logs" / "base.log",
        verbose=False,
    )
    _run(["podman", "import", "--change", 'CMD ["/usr/bin/python3"]', rootfs, tag], env)
    rootfs.unlink(missing_ok=True)
    _say(f"base        {tag} built in {time.monotonic() - start:.0f}s")
    return tag


def build_wheel(root: Path, context: Path, env: dict[str, str]) -> Path:
    """The kvpilot wheel in `context/dist/` (alone there: the Containerfiles install by name)."""
    dist = context / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir(parents=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(root),
        ],
        env,
    )
    (wheel,) = dist.glob("kvpilot-*.whl")
    with zipfile.ZipFile(wheel) as z:
        if not any(n.startswith("kvpilot_operator/data/crds/") for n in z.namelist()):
            raise BuildError(f"{wheel.name} carries no kvpilot_operator/data/ (package-data?)")
        (meta,) = (n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta).decode()
    for extra in ("engine", "operator"):
        (dist / f"requirements-{extra}.txt").write_text("\n".join(requirements(metadata, extra)))
    return wheel


def requirements(metadata: str, extra: str) -> list[str]:
    """The wheel's Requires-Dist for `extra` (and the unconditional ones): the images install
    these in a layer of their own, cached until they change, and the wheel with --no-deps."""
    out = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line.removeprefix("Requires-Dist:").strip().partition(";")
        marker = marker.strip()
        if not marker or re.fullmatch(rf"""extra == ["']{extra}["']""", marker):
            out.append(req.strip())
    return out


def wheel_digest(wheel: Path) -> str:
    """A hash of the wheel's members, not its bytes: a rebuilt wheel differs in zip timestamps."""
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            h.update(name.encode() + b"\0" + z.read(name) + b"\0")
    return h.hexdigest()


def find_torch_wheels(explicit: Path | None = None) -> tuple[Path, str] | None:
    """(folder, version) of a local CPU torch wheel for the base's python: --wheels, else pip's
    find-links (PIP_FIND_LINKS or pip's config files)."""
    candidates: list[Path] = [explicit] if explicit else []
    if explicit is None:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in out.splitlines():
            if "find-links" in line:
                value = line.split("=", 1)[1].strip().strip("'\"")
                candidates += [Path(p.removeprefix("file://")) for p in value.split()]
    for folder in candidates:
        wheels = sorted(folder.glob(f"torch-*+cpu-{BASE_PYTHON_TAG}-*linux*x86_64.whl"))
        if wheels:
            version = wheels[-1].name.split("-")[1]
            return folder, version
    return None


def revision(root: Path) -> str:
    """The commit the images are built from; `-dirty` when tracked files differ from it (the
    build takes the working tree, as `docker build .` would)."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
        )

    head = git("rev-parse", "HEAD")
    if head.returncode:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def export_head(root: Path, dest: Path) -> Path | None:
    """The committed tree (HEAD) of the checkout at `root`, unpacked into `dest`; None outside a
    git checkout. Images are built from commits by default: a working tree shared with work in
    progress (a half-added subpackage) must not leak into them, and their revision label is then
    exact."""
    if subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"],
        capture_output=True,
        check=False,
    ).returncode:
        return None
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(root), "archive", "--format=tar", "HEAD"], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait():
        raise BuildError(f"git archive HEAD failed in {root}")
    return dest


def inputs_digest(containerfile: Path, wheel: str, base: str, args: dict[str, str]) -> str:
    blob = json.dumps(
        {"containerfile": containerfile.read_text(), "wheel": wheel, "base": base, "args": args},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def build(
    only: Sequence[str] = (),
    *,
    root: Path,
    mirror: str = MIRROR,
    wheels: Path | None = None,
    refresh_base: bool = False,
    force: bool = False,
    verbose: bool = False,
    worktree: bool = False,
) -> dict[str, str]:
    """Build the images named in `only` (default: every default one) from the checkout at
    `root` (its HEAD commit, or with `worktree` the files as they are); returns name -> tag."""
    from kvpilot_operator import __version__

    unknown = [n for n in only if n not in IMAGES]
    if unknown:
        raise BuildError(f"unknown image {', '.join(unknown)} (images: {', '.join(IMAGES)})")
    specs = [IMAGES[n] for n in only] if only else [s for s in IMAGES.values() if s.default]
    needed = ["buildah", "podman", "runc"]
    if any(s.local_base for s in specs):
        needed.append("mmdebstrap")
    if missing := missing_tools(needed):
        raise BuildError(
            f"missing {', '.join(missing)}: apt-get install mmdebstrap buildah podman skopeo "
            "runc uidmap"
        )
    work = images_dir()
    env = container_env(work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    built: dict[str, str] = {}
    # One build at a time per storage (CI's install and a test may both ask).
    with (work / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = time.monotonic()
        rev = revision(root)
        if not worktree and (head := export_head(root, work / "src")) is not None:
            root = head
            rev = rev.removesuffix("-dirty")
            _say(f"source      commit {rev} (--worktree for uncommitted files)")
        context = work / "context"
        wheel = build_wheel(root, context, env)
        digest = wheel_digest(wheel)
        _say(f"wheel       {wheel.name} ({digest[:12]})")
        base = base_image(env, mirror, refresh_base) if any(s.local_base for s in specs) else ""
        base_id = _podman_ok(["image", "inspect", "--format", "{{.Id}}", base], env) if base else ""
        for spec in specs:
            built[spec.name] = _build_one(
                spec, root, context, wheel, digest, base, base_id or "", wheels, env,
                version=__version__, revision=rev, force=force, verbose=verbose,
            )  # fmt: skip
        _say(f"done        in {time.monotonic() - start:.0f}s; storage {storage_size(work)}")
    return built


def _build_one(
    spec: ImageSpec,
    root: Path,
    context: Path,
    wheel: Path,
    digest: str,
    base: str,
    base_id: str,
    wheels: Path | None,
    env: dict[str, str],
    *,
    version: str,
    revision: str,
    force: bool,
    verbose: bool,
) -> str:
    containerfile = root / "images" / spec.containerfile
    tag = spec.tag(version)
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    args = {"WHEEL": wheel.name, "WHEEL_SHA256": sha256, "VERSION": version, "SOURCE": SOURCE_URL}
    if spec.local_base:
        args["BASE"] = base
    volumes: list[str] = []
    if spec.torch_wheels:
        found = find_torch_wheels(wheels)
        if found is not None:
            folder, torch_version = found
            volumes = ["-v", f"{folder}:/wheels:ro"]
            # The local wheel, and no index pip would wait on from an offline build.
            args |= {"TORCH": f"torch=={torch_version}", "TORCH_INDEX": ""}
        else:
            _say(f"{spec.name:<11} no local CPU torch wheel: torch from PyTorch's CPU index")
    # The wheel counts by its contents (`digest`), not its bytes (zip timestamps differ per build).
    key = inputs_digest(
        containerfile,
        digest,
        base_id or base,
        {k: v for k, v in args.items() if k != "WHEEL_SHA256"},
    )
    have = _podman_ok(
        ["image", "inspect", "--format", f'{{{{index .Labels "{LABEL_INPUTS}"}}}}', tag], env
    )
    if have == key and not force:
        _say(f"{spec.name:<11} {tag} (cached, inputs {key[:12]})")
        return tag
    _say(f"{spec.name:<11} building {tag} from images/{spec.containerfile} ...")
    start = time.monotonic()
    # --layers: the dependency layers are reused when only kvpilot's own code changed.
    cmd = ["buildah", "bud", "--isolation", "chroot", "--layers", "-f", str(containerfile)]
    if CA_BUNDLE.is_file():
        cmd += ["--secret", f"id=ca,src={CA_BUNDLE}"]
    cmd += volumes
    for name, value in {**args, "REVISION": revision}.items():
        cmd += ["--build-arg", f"{name}={value}"]
    cmd += ["--label", f"{LABEL_INPUTS}={key}", "-t", tag, str(context)]
    _stream(cmd, env, images_dir() / "logs" / f"{spec.name}.log", verbose)
    size = _podman_ok(["image", "inspect", "--format", "{{.Size}}", tag], env) or "0"
    _say(
        f"{spec.name:<11} {tag} built in {time.monotonic() - start:.0f}s, {int(size) / 1e6:.0f} MB"
    )
    _prune(env)
    return tag


def _prune(env: dict[str, str]) -> None:
    """Drop the images a rebuild left untagged. The layers the tagged images are built on are
    their parents, not dangling: the cache survives."""
    subprocess.run(["podman", "image", "prune", "-f"], env=env, capture_output=True, check=False)


def storage_size(work: Path) -> str:
    out = subprocess.run(
        ["du", "-sh", str(work / "storage")], capture_output=True, text=True, check=False
    ).stdout
    return re.split(r"\s+", out.strip())[0] if out else "?"


def cmd_images_build(ns: argparse.Namespace) -> int:
    from kvpilot_operator.packaged import source_tree

    root = Path(ns.source) if ns.source else source_tree()
    if root is None or not (root / "images").is_dir():
        print("error: run from a kvpilot checkout, or pass --source DIR", file=sys.stderr)
        return 2
    try:
        tags = build(
            ns.only or (),
            root=root,
            mirror=ns.mirror,
            wheels=Path(ns.wheels) if ns.wheels else None,
            refresh_base=ns.refresh_base,
            force=ns.force,
            verbose=ns.verbose,
            worktree=ns.worktree,
        )
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, tag in tags.items():
        print(f"{name:<11} {tag}")
    return 0


def add_commands(sub: Any) -> None:
    images = sub.add_parser("images", help="kvpilot's container images").add_subparsers(
        dest="images", required=True
    )
    b = images.add_parser(
        "build",
        help="build the operator and CPU engine images with buildah (cached in "
        "~/.cache/kvpilot/images; unchanged inputs are not rebuilt)",
    )
    b.add_argument(
        "--only",
        action="append",
        choices=list(IMAGES),
        help="build this image (repeat; default: operator and engine-cpu)",
    )
    b.add_argument("--source", help="the kvpilot checkout (default: this installation's)")
    b.add_argument(
        "--worktree",
        action="store_true",
        help="build from the checkout's files as they are, not its HEAD commit",
    )
    b.add_argument("--mirror", default=MIRROR, help="Debian mirror for the base rootfs")
    b.add_argument(
        "--wheels", help="folder with a local CPU torch wheel (default: pip's find-links)"
    )
    b.add_argument("--refresh-base", action="store_true", help="remake the Debian base")
    b.add_argument("--force", action="store_true", help="rebuild even when inputs are unchanged")
    b.add_argument("-v", "--verbose", action="store_true", help="stream the whole build log")
    b.set_defaults(func=cmd_images_build)
