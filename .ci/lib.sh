# Helpers shared by the CI scripts (sourced, not run).

# fresh_venv PYTHON DIR: a new virtual environment at DIR, activated.
fresh_venv() {
  "$1" -m venv "$2"
  # shellcheck disable=SC1091
  . "$2/bin/activate"
}

# copy_tree DEST: the working tree's files (tracked, and untracked but not ignored) copied to DEST,
# so that a build there leaves the extension built in place for the main torch alone.
copy_tree() {
  mkdir -p "$1"
  git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -cf - -T - | tar -xf - -C "$1"
}
