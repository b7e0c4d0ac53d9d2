#!/usr/bin/env bash
# The device tool sends the checkout's tracked files plus what `carry` names, 64 MiB in all. The
# fixtures alone are ~44 MiB and the carried binary + diffusers wheel ~27 MiB, so for the device
# call the fixtures gpu_session.sh does not read are untracked for a moment:
#   tests/python/gpu_slim.sh on    # before run(carry=[".gpu", ".whl"], ...)
#   tests/python/gpu_slim.sh off   # right after it returns
# `on` keeps the whole index in .git/index.before-gpu and `off` puts it back; nothing in the
# working tree is touched. If a session ended between the two, the next one finds
# .git/index.before-gpu and runs `off` first (never commit while it exists).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
GIT=$(git rev-parse --git-dir)
SAVED=$GIT/index.before-gpu
case "${1:-}" in
on)
  [ -e "$SAVED" ] && { echo "already slim ($SAVED exists): run '$0 off' first" >&2; exit 1; }
  cp "$GIT/index" "$SAVED"
  keep='^tests/fixtures/(tiny-sd/|refs/txt2img_pndm\.safetensors$|refs/README\.md$|[^/]*\.py$)'
  mapfile -t drop < <(git ls-files tests/fixtures | grep -Ev "$keep")
  printf '%s\0' "${drop[@]}" | git rm -q --cached --pathspec-from-file=- --pathspec-file-nul
  mkdir -p "$GIT/info"
  [ -e "$GIT/info/exclude" ] && cp "$GIT/info/exclude" "$GIT/info/exclude.before-gpu"
  printf '/%s\n' "${drop[@]}" >> "$GIT/info/exclude"
  echo "untracked ${#drop[@]} fixture files; what travels now (KiB): $(git ls-files -z | xargs -0 du -ck | tail -1 | cut -f1) tracked"
  ;;
off)
  [ -e "$SAVED" ] || { echo "not slim: nothing to restore" >&2; exit 0; }
  mv "$SAVED" "$GIT/index"
  if [ -e "$GIT/info/exclude.before-gpu" ]; then
    mv "$GIT/info/exclude.before-gpu" "$GIT/info/exclude"
  else
    rm -f "$GIT/info/exclude"
  fi
  git status --short
  ;;
*)
  echo "usage: $0 on|off" >&2
  exit 2
  ;;
esac
