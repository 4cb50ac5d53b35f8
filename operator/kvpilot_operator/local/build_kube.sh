#!/usr/bin/env bash
# Builds the local control plane's binaries once and caches them:
#   kube-apiserver, kube-controller-manager, kube-scheduler  from Debian's `kubernetes` source
#   package (1.20.2, vendored Go dependencies), built with Debian's golang-go;
#   kubectl                                                  from Debian's kubernetes-client .deb;
#   etcd                                                     from Debian's etcd-server.
# Everything lands in $KVPILOT_CACHE/kube-1.20.2/bin (default ~/.cache/kvpilot). About 8 minutes
# and 1.4 GB of RAM on 2 cores the first time; a no-op once the binaries are there.
# Needs root for apt-get (as on the CI machines); prints what it does.
set -euo pipefail

CACHE=${KVPILOT_CACHE:-$HOME/.cache/kvpilot}
DEST=$CACHE/kube-1.20.2
BIN=$DEST/bin
WANT=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)
# Bumped when the recipe changes, so a cache built by an older recipe is rebuilt.
RECIPE=2

have_all() {
  local b
  for b in "${WANT[@]}"; do [ -x "$BIN/$b" ] || return 1; done
  [ "$(cat "$BIN/.recipe" 2>/dev/null)" = "$RECIPE" ]
}
if have_all; then
  echo "kube binaries cached in $BIN"
  exit 0
fi
mkdir -p "$BIN"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
APT_SRC=$DEST/apt
mkdir -p "$APT_SRC/lists/partial"
echo "deb-src http://deb.debian.org/debian bookworm main" >"$APT_SRC/sources.list"
# A private source list and list directory, so the machine's own apt state is left untouched.
APT_OPTS=(-o "Dir::Etc::SourceList=$APT_SRC/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$APT_SRC/lists")

echo "==> apt: golang-go rsync etcd-server"
$SUDO apt-get update -qq
# Kubernetes 1.20 vendors reflect2 1.0.1 and json-iterator 1.1.10, whose map iteration crashes
# (SIGSEGV in mapiterinit) when built with Go >= 1.18, Debian's golang-go being 1.19; Debian's
# reflect2 1.0.2 and json-iterator 1.1.12 are the upstream fixes, drop-in compatible.
$SUDO apt-get install -y -qq --no-install-recommends golang-go rsync etcd-server make \
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev >/dev/null
cmp -s "$(command -v etcd)" "$BIN/etcd" || { cp "$(command -v etcd)" "$BIN/etcd.new" && mv -f "$BIN/etcd.new" "$BIN/etcd"; }

echo "==> kubectl from Debian's kubernetes-client"
if [ ! -x "$BIN/kubectl" ]; then
  (cd "$APT_SRC" && apt-get download kubernetes-client >/dev/null)
  rm -rf "$APT_SRC/kc" && dpkg-deb -x "$APT_SRC"/kubernetes-client_*.deb "$APT_SRC/kc"
  cp "$APT_SRC/kc/usr/bin/kubectl" "$BIN/kubectl"
fi

if ! have_all; then
  echo "==> Debian source package kubernetes"
  $SUDO apt-get "${APT_OPTS[@]}" update -qq
  SRC=$DEST/src
  mkdir -p "$SRC"
  (cd "$SRC" && apt-get "${APT_OPTS[@]}" source --download-only kubernetes >/dev/null)
  TARBALL=$(ls "$SRC"/kubernetes_*.orig.tar.* | head -n 1)
  TREE=$SRC/tree
  rm -rf "$TREE" && mkdir -p "$TREE"
  tar -xf "$TARBALL" -C "$TREE" --strip-components=1
  for pkg in modern-go/reflect2 json-iterator/go; do
    rm -rf "$TREE/vendor/github.com/$pkg"
    mkdir -p "$TREE/vendor/github.com/$pkg"
    (cd "/usr/share/gocode/src/github.com/$pkg" && find . -maxdepth 1 -type f ! -name '*_test.go' \
      -exec cp {} "$TREE/vendor/github.com/$pkg/" \;)
  done
  echo "==> make kube-apiserver kube-controller-manager kube-scheduler (several minutes)"
  cd "$TREE"
  mkdir -p .go/src/k8s.io
  ln -sfn ../../.. .go/src/k8s.io/kubernetes
  GOPATH=$PWD/.go CGO_ENABLED=0 \
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler"
  for b in kube-apiserver kube-controller-manager kube-scheduler; do
    # Copy then rename: a running old binary is not overwritten in place ("text file busy").
    cp "$(find _output -type f -name "$b" | head -n 1)" "$BIN/$b.new"
    mv -f "$BIN/$b.new" "$BIN/$b"
  done
  echo "$RECIPE" >"$BIN/.recipe"
  cd "$DEST"
  rm -rf "$SRC"
fi

have_all
echo "kube binaries built in $BIN"
