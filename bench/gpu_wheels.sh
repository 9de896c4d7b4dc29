#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels bench/gpu_session.sh installs on a bare GPU machine (the list and
# why: bench/gpu_wheels.txt) into wheels/ (git-ignored), for Python 3.12 on manylinux x86_64, and print their
# size beside the working tree's against the 64 MiB one device call may carry.
#
#   bash bench/gpu_wheels.sh                          # then: run(command="bash bench/gpu_session.sh", carry=["wheels"])
#   GPU_WHEELS_WITHOUT_BNB=1 bash bench/gpu_wheels.sh # all but bitsandbytes (43 MB): the kit then skips its steps
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${GPU_WHEELS_DIR:-wheels}"
pip=(${PIP:-python3 -m pip})
mapfile -t wanted < <(grep -v '^#' bench/gpu_wheels.txt | awk 'NF && !($3 == "bnb" && ENVIRON["GPU_WHEELS_WITHOUT_BNB"] != "") {print $1}')
rm -rf "$dest" && mkdir -p "$dest"
"${pip[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --dest "$dest" "${wanted[@]}"
# What a device call sends: the tracked and untracked-but-not-ignored files, plus the carried folder.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
wheels=$(find "$dest" -name '*.whl' -printf '%s\n' | awk '{s+=$1} END {print s+0}')
budget=$((64 * 1024 * 1024))
find "$dest" -name '*.whl' -printf '%s %f\n' | sort -rn | awk '{printf "  %8.2f MB  %s\n", $1/1e6, $2}'
awk -v t="$tree" -v w="$wheels" -v b="$budget" 'BEGIN {
    printf "wheels %.1f MB + working tree %.1f MB = %.1f MB of %.1f MB (64 MiB): %s\n", w/1e6, t/1e6, (w+t)/1e6, b/1e6,
        (w + t <= b) ? "fits" : "DOES NOT FIT (GPU_WHEELS_WITHOUT_BNB=1 leaves bitsandbytes out)"
    exit (w + t <= b) ? 0 : 1 }'
