# Sourced by the bench scripts that run on the device machine (from the repo root): installs the
# wheels carried in .whl into /tmp/site (SKIP_WHEELS=1 skips it: a CPU dry run, or a warm machine
# that has them) and puts them and this repo's code on the path; Python output unbuffered, so a
# run cut at its time limit still shows how far it got.
[ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/code PYTHONUNBUFFERED=1
