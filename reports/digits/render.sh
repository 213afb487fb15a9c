#!/bin/bash
# Render the CPU-scale digits studies into reports/digits/: one table per paper table, DiT and SiT together.
# Studies that have not run yet are left out. Run from the repository root after `mgbench study run ...`.
set -euo pipefail
cd "$(dirname "$0")/../.."
MGBENCH=${MGBENCH:-mgbench}
OUT=reports/digits
studies() {  # --study flags for the given studies/digits/<name>.yaml files whose runs exist
  for s in "$@"; do
    name=$(sed -n 's/^name: //p' "studies/digits/$s.yaml")
    out=$(sed -n 's/^out_dir: //p' "studies/digits/$s.yaml")
    [ -f "${out:-runs/$name}/mlflow.db" ] && printf -- '--study studies/digits/%s.yaml ' "$s"
  done
  return 0
}
render() {  # render ITEM STUDY...
  local item=$1; shift
  local flags
  flags=$(studies "$@")
  if [ -n "$flags" ]; then
    # shellcheck disable=SC2086
    "$MGBENCH" report "$item" $flags --out "$OUT"
  else
    echo "skip $item: none of $* has run" >&2
  fi
}
render table3 dit_table3_w dit_table3_auto sit_table3_w sit_table3_auto
render fig4 dit_table3_w sit_table3_w
render fig5 dit_table3_w sit_table3_w
render table4 dit_table4_lambda sit_table4_lambda
render table5 dit_table5_w_input sit_table5_w_input
render table6 dit_table6_empty_class sit_table6_empty_class
