# shellcheck shell=bash
# Helpers shared by the CI scripts (sourced, not run).

# fresh_venv PYTHON DIR: a new virtual environment at DIR, activated.
fresh_venv() {
  "$1" -m venv "$2"
  # shellcheck disable=SC1091
  . "$2/bin/activate"
}

# sdist_tree DEST: the source distribution a user would download, made from the working tree by
# the active python (which needs setuptools, not torch), unpacked at DEST.
# Builds from it therefore check that the sdist carries everything they need, and a build there
# leaves the extension built in place for the main torch alone. Fails when a file tracked by git
# (but the CI scripts) is missing from the sdist, so MANIFEST.in cannot fall behind the tree.
# Where FASTAP_SDIST names an sdist already made from this tree (make_sdist), that one is unpacked:
# two sdist runs at a time in one tree would share its temporary release folder (fastap-VERSION/).
sdist_tree() {
  local dist="" tarball=${FASTAP_SDIST:-} missing
  if [[ -z $tarball ]]; then
    dist=$(mktemp -d)
    make_sdist "$dist" || { rm -rf "$dist"; return 1; }
    tarball=$(echo "$dist"/fastap-*.tar.gz)
  fi
  mkdir -p "$1"
  tar -xzf "$tarball" -C "$1" --strip-components=1
  [[ -z $dist ]] || rm -rf "$dist"
  missing=$(git ls-files -- . ':!.ci' ':!.gitignore' | while read -r f; do
    if [[ -e $f && ! -e $1/$f ]]; then echo "  $f"; fi
  done)
  if [[ -n $missing ]]; then
    printf 'error: files missing from the sdist (MANIFEST.in):\n%s\n' "$missing" >&2
    return 1
  fi
}

# make_sdist DIR: the sdist of the working tree, made by the active python, into DIR (its build
# log is DIR/log, printed on failure). (FASTAP_CUDA=0: with a CUDA build of torch installed and no
# GPU, setup.py would otherwise ask which architectures to build for; MANIFEST.in, not the
# extension's sources, says what the sdist holds.)
make_sdist() {
  # (egg_info in a fresh folder: setuptools would otherwise add the files of an old SOURCES.txt)
  if ! FASTAP_CUDA=0 python setup.py -q egg_info --egg-base "$1" sdist -d "$1" >"$1/log" 2>&1; then
    cat "$1/log" >&2
    return 1
  fi
}

# install_from_sdist PYTHON WORK TORCH_VERSION FASTAP_CUDA [PACKAGE ...]: a fresh environment at
# WORK/venv with that torch, the build and test tools (pytest-xdist among them) and the extra
# packages; fastap built there (FASTAP_CUDA 0 or 1) from the sdist unpacked at WORK/src, which
# becomes the current folder. The build's output (the compiler commands and warnings) goes to
# WORK/build.log, printed on failure.
install_from_sdist() {
  local python=$1 work=$2 torch_version=$3 cuda=$4
  shift 4
  fresh_venv "$python" "$work/venv"
  pip install -q "torch==$torch_version" numpy ninja setuptools wheel pytest pytest-xdist \
    hypothesis "$@"
  sdist_tree "$work/src"
  cd "$work/src" || return
  if ! FASTAP_CUDA=$cuda pip install -v --no-build-isolation --no-deps -e . \
      >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    return 1
  fi
}
