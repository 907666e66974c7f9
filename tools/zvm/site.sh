#!/usr/bin/env bash
# Install the project's runtime and test dependencies (from pyproject.toml,
# less the linters) into a directory the VM tier puts first on PYTHONPATH, so
# the guest runs the same library versions as the host tier. Cached beside
# the image, keyed on pyproject.toml; prints the directory.
# Env: PYTHON (a Python 3.11 with pip; default python3), SNAPPER_ZVM_CACHE.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python3}
CACHE=${SNAPPER_ZVM_CACHE:-/var/cache/snapper/zvm}
key=$(sha256sum "$ROOT/pyproject.toml" "$0" | sha256sum | cut -c1-16)
DIR="$CACHE/site-$key"
if [ ! -d "$DIR" ]; then
  mkdir -p "$CACHE"
  tmp=$(mktemp -d "$CACHE/.site.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  mapfile -t reqs < <("$PY" - "$ROOT/pyproject.toml" <<'PYEOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
skip = ("ruff", "mypy", "types-")
for r in p["dependencies"] + p["optional-dependencies"]["test"]:
    if not r.startswith(skip):
        print(r)
PYEOF
)
  # Same CPython minor (3.11) and glibc platform as the guest: binary wheels fit.
  "$PY" -m pip install -q --disable-pip-version-check --no-compile --target "$tmp/site" \
    --only-binary=:all: "${reqs[@]}" >&2
  mv "$tmp/site" "$DIR"
fi
echo "$DIR"
