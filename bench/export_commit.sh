#!/usr/bin/env bash
# Export an earlier commit's code and bench scripts into a folder of the working tree, so that a
# GPU call can run the same benchmark on the code before a change and after it, on one machine:
#   bash bench/export_commit.sh 816fa78 before_816fa78        (here, before the device call)
#   cd before_816fa78 && SKIP_WHEELS=1 OUT=$OUT/before STEPS=300 TOKENIZER=trained bash bench/speed.sh ...
# The export shares this checkout's data/, pretrained_checkpoint/ and .whl/ through symbolic
# links (made on the GPU machine, where the paths exist); the folder is not tracked: delete it
# once measured. Wheels an old commit needs and this one does not (e.g. torchao for train.fp8
# before 548d31b) go in the export's own .whl_extra/, installed by hand for that run.
set -euo pipefail
commit=${1:?usage: bash bench/export_commit.sh COMMIT DIR}
dir=${2:?usage: bash bench/export_commit.sh COMMIT DIR}
[ ! -e "$dir" ] || { echo "$dir exists: remove it or name another folder" >&2; exit 1; }
mkdir -p "$dir"
# Only what the training benchmarks read: the package, the launch scripts and bench/'s scripts and
# configs (bench/results stays out: it is large and the old run does not read it).
git archive "$commit" code scripts pyproject.toml \
  $(git ls-tree --name-only "$commit" bench/ | grep -E '\.(sh|py|yaml|json)$') | tar -x -C "$dir"
cat > "$dir/link_shared.sh" <<'SH'
# Run from the export on the GPU machine: the checkout's data, tiny default and wheels.
for path in data pretrained_checkpoint .whl; do [ -e "$path" ] || ln -s "../$path" "$path"; done
SH
echo "exported $(git rev-parse --short "$commit") to $dir ($(du -sh "$dir" | cut -f1)); on the GPU machine: cd $dir && source link_shared.sh"
