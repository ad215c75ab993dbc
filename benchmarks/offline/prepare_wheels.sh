#!/bin/bash
# The wheels run_jax.sh installs on a machine without internet: kquant and its plugins
# built here, and the packages they need that such a machine lacks (keras at the version
# installed here, namex, optree, stevedore; the lent GPU machines have JAX, numpy, rich,
# click, h5py, absl-py, ml-dtypes, scikit-learn and matplotlib already). From the
# repository root, with the package index reachable:
#
#   bash benchmarks/offline/prepare_wheels.sh [DIR]     # default DIR: .whl
#
# PYTHON_VERSION (default 3.12, the lent machines' python3) picks optree's binary wheel.
set -euo pipefail
dir=${1:-.whl}
py=${PYTHON_VERSION:-3.12}
python=${PYTHON:-python3}
keras_version=$("$python" -c "import keras; print(keras.__version__)")
mkdir -p "$dir"
"$python" -m pip wheel -q --no-deps -w "$dir" . ./plugins/kquant-metaquant ./plugins/kquant-ewgs \
    ./plugins/kquant-maniquant ./plugins/kquant-compat
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
    "keras==$keras_version" namex optree stevedore
ls "$dir"
