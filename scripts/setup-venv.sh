#!/usr/bin/env bash
# Create or update the project's virtualenv outside the repo (in the cache
# folder), so a fresh clone reuses installed packages and pip's cache.
# Prints the venv's path on stdout.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
home_dir=${STREAMREC_HOME:-$HOME/.cache/streamrec}
venv=$home_dir/venv
py=${PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' 2>/dev/null; then
  echo "streamrec needs Python 3.11 or newer ($py is $("$py" --version 2>&1))" >&2
  exit 1
fi
mkdir -p "$home_dir"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1) $repo"
stamp=$venv/.streamrec-installed
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing streamrec and its dependencies into $venv (torch is large: the first time takes minutes)" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -e "$repo[test]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
