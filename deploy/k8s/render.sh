#!/usr/bin/env bash
# Render every overlay, alone and with every allowed set of components, into
# deploy/k8s/rendered/<overlay>[+<component>...].yaml, and validate each rendering:
# standard objects with kubernetes-validate (strict, against Kubernetes $K8S_VERSION), KEDA
# and Strimzi resources with check_rendered.py. Works from any directory; `make k8s-render`.
#
# A component whose kustomization.yaml has a line "# requires: <other>" is only combined
# with sets that contain <other>, and is applied after it.
#
# Environment: VENV (virtualenv, default .venv, relative to the repository root),
# KUBECTL (default kubectl), K8S_VERSION (default 1.30.0).
set -euo pipefail

K8S_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$K8S_DIR/../.." && pwd)"
VENV="${VENV:-.venv}"
[[ "$VENV" = /* ]] || VENV="$REPO_DIR/$VENV"
PYTHON="$VENV/bin/python"
VALIDATE="$VENV/bin/kubernetes-validate"
KUBECTL="${KUBECTL:-kubectl}"
K8S_VERSION="${K8S_VERSION:-1.30.0}"
OUT_DIR="$K8S_DIR/rendered"
WORK_DIR="$OUT_DIR/.work"

for tool in "$PYTHON" "$VALIDATE"; do
  [[ -x "$tool" ]] || { echo "render.sh: $tool not found (make venv)" >&2; exit 2; }
done
command -v "$KUBECTL" >/dev/null || { echo "render.sh: $KUBECTL not found" >&2; exit 2; }

rm -rf "$OUT_DIR"
mkdir -p "$WORK_DIR"
trap 'rm -rf "$WORK_DIR"' EXIT

"$PYTHON" "$K8S_DIR/gen_strimzi_topics.py" --check

subdirs() { for d in "$1"/*/; do basename "$d"; done | LC_ALL=C sort; }
mapfile -t overlays < <(subdirs "$K8S_DIR/overlays")
mapfile -t components < <(subdirs "$K8S_DIR/components")

# requires <component>: the components it needs, one a line.
requires() {
  sed -n 's/^# requires: *//p' "$K8S_DIR/components/$1/kustomization.yaml" | tr -cs '[:alnum:]-' '\n' | sed '/^$/d'
}

# allowed <component>...: whether every requirement of the set is in the set.
allowed() {
  local c r
  for c in "$@"; do
    while read -r r; do
      [[ " $* " == *" $r "* ]] || return 1
    done < <(requires "$c")
  done
}

# ordered <component>...: the set with every component after those it requires.
ordered() {
  (($#)) || return 0
  local -a todo=("$@") done_=() rest
  local c r ready
  while ((${#todo[@]})); do
    rest=()
    for c in "${todo[@]}"; do
      ready=1
      while read -r r; do
        [[ " ${done_[*]} " == *" $r "* ]] || ready=0
      done < <(requires "$c")
      if ((ready)); then done_+=("$c"); else rest+=("$c"); fi
    done
    ((${#rest[@]} < ${#todo[@]})) || { echo "render.sh: requirement cycle: ${todo[*]}" >&2; exit 2; }
    todo=("${rest[@]}")
  done
  printf '%s\n' "${done_[@]}"
}

failed=0
renderings=0
for overlay in "${overlays[@]}"; do
  for ((mask = 0; mask < (1 << ${#components[@]}); mask++)); do
    set_=()
    for i in "${!components[@]}"; do
      if ((mask & (1 << i))); then set_+=("${components[$i]}"); fi
    done
    allowed "${set_[@]}" || continue
    mapfile -t set_ < <(ordered "${set_[@]}")

    name="$overlay"
    for c in "${set_[@]}"; do name+="+$c"; done
    dir="$WORK_DIR/$name"
    mkdir -p "$dir"
    {
      echo "apiVersion: kustomize.config.k8s.io/v1beta1"
      echo "kind: Kustomization"
      echo "resources: [../../../overlays/$overlay]"
      if ((${#set_[@]})); then
        printf 'components:\n'
        printf '  - ../../../components/%s\n' "${set_[@]}"
      fi
    } >"$dir/kustomization.yaml"

    out="$OUT_DIR/$name.yaml"
    "$KUBECTL" kustomize "$dir" >"$out"
    renderings=$((renderings + 1))

    if ! counts="$("$PYTHON" "$K8S_DIR/check_rendered.py" "$out" --standard-out "$dir/standard.yaml")"; then
      failed=1
    fi
    read -r total standard custom <<<"$counts"

    # kubernetes-validate prints one INFO line per object that passed; any other line (a WARN
    # for an unknown kind or version, an ERROR) is a failure.
    report="$("$VALIDATE" -k "$K8S_VERSION" --strict "$dir/standard.yaml" || true)"
    passed="$(grep -c '^INFO .* passed ' <<<"$report" || true)"
    if grep -v '^INFO .* passed ' <<<"$report" | grep -q .; then
      grep -v '^INFO .* passed ' <<<"$report" >&2
      failed=1
    fi
    if ((passed != standard)); then
      echo "ERROR $name: kubernetes-validate passed $passed of $standard standard objects" >&2
      failed=1
    fi
    printf '%-52s %3d objects: %3d validated (k8s %s), %2d custom checked\n' \
      "$name" "$total" "$passed" "$K8S_VERSION" "$custom"
  done
done

if ((failed)); then
  echo "render.sh: validation failed" >&2
  exit 1
fi
echo "render.sh: $renderings renderings in ${OUT_DIR#"$REPO_DIR"/}/, all valid"
