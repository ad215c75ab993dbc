#!/bin/bash
# Run benchmarks on a machine without internet and without TensorFlow (e.g. a lent GPU box
# with JAX preinstalled), from wheels built beforehand on a machine with the package index
# (benchmarks/offline/prepare_wheels.sh DIR). On the target, from the repository root:
#
#   WHEELS=DIR OUT_DIR=DIR LIMIT=SECONDS [ARCHIVE=FILE.tgz] bash benchmarks/offline/run_jax.sh \
#       "overhead --quick -o timing_steps=120" "alq --quick -o train=false"
#
# Each quoted argument is one `python -m benchmarks` run under its own timeout; logs go to
# OUT_DIR. ARCHIVE: OUT_DIR packed into one file after every run (a machine that returns
# only a few files, or a command stopped at its limit, still hands back what finished).
set -u
wheels=${WHEELS:?set WHEELS to the folder of wheels}
out=${OUT_DIR:?set OUT_DIR to the results folder}
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl || exit 1
export PYTHONPATH=$site KERAS_BACKEND=jax PYTHONUNBUFFERED=1
python3 -c "import jax, keras, kquant; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" || exit 1
mkdir -p "$out"
for args in "$@"; do
  log="$out/log_$(echo "$args" | tr -c 'A-Za-z0-9' _).txt"
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${LIMIT:-600}" python3 -m benchmarks $args --out-dir "$out" >"$log" 2>&1
  echo "$args: rc=$? $(( $(date +%s) - start )) s (log: $log)"
  if [ -n "${ARCHIVE:-}" ]; then
    tar czf "$ARCHIVE" -C "$(dirname "$out")" "$(basename "$out")"
  fi
done
