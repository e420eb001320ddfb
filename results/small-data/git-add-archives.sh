#!/usr/bin/env bash
# Stage for a commit what a new machine needs to resume the study (run at a session's end, before
# `git commit`): every tile archive's header and the tiles its sweep computed. Tiles another store
# lent (their records' "reused_from") are left out: run.sh restores the lending N = 640 store from
# its own archive, and the sweep lends them again, so committing them would only store them twice.
set -eu
cd "$(dirname "$0")"
for dir in archive/*/*/; do
    [ -e "${dir}archive.json" ] && git add -- "${dir}archive.json"
    for record in "$dir"tile-*.json; do
        [ -e "$record" ] || continue
        grep -q '"reused_from"' "$record" && continue
        git add -- "$record" "${record%.json}.bin"
    done
done
git add run.log
