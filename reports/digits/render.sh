#!/bin/bash
# Render the CPU-scale digits studies into reports/digits/: one table per paper table, DiT and SiT together, and
# the generated claims table (reports/claims.md). All digits studies share one MLflow store (runs/digits/mlflow.db);
# studies that have not run yet are left out. Run from the repository root after `mgbench study run ...`.
set -euo pipefail
cd "$(dirname "$0")/../.."
MGBENCH=${MGBENCH:-mgbench}
OUT=reports/digits
STORE=runs/digits/mlflow.db
if [ ! -f "$STORE" ]; then
  echo "no $STORE: run the studies first, e.g. mgbench study run studies/digits/dit_table3_w.yaml" >&2
  exit 2
fi
studies() {  # --study flags for the given studies/digits/<name>.yaml files that have runs in the store
  for s in "$@"; do
    name=$(sed -n 's/^name: //p' "studies/digits/$s.yaml")
    if python3 -c "import sqlite3,sys; c=sqlite3.connect('$STORE'); sys.exit(0 if c.execute('select 1 from experiments where name=?', ('$name',)).fetchone() else 1)"; then
      printf -- '--study studies/digits/%s.yaml ' "$s"
    fi
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
rm -f "$OUT"/table[0-9]* "$OUT"/fig[0-9]* "$OUT"/system_* "$OUT"/frontier_*/*   # nothing stale from an earlier harness stays
render table3 dit_table3_w dit_table3_auto sit_table3_w sit_table3_auto
render fig4 dit_table3_w sit_table3_w
render fig5 dit_table3_w sit_table3_w
render table4 dit_table4_lambda sit_table4_lambda
render table5 dit_table5_w_input sit_table5_w_input
render table6 dit_table6_empty_class sit_table6_empty_class
render table7 sit_table7_size
render fig6 sit_table7_size
for f in ${SYSTEM-dit sit}; do   # the system-level row: best MG vs best CFG at CFG's steps and at equal NFE; it evaluates
  # what runs/digits/system/ has not cached (SYSTEM=sit: only that one; SYSTEM= : none)
  if [ -n "$(studies ${f}_table3_w)" ]; then
    "$MGBENCH" report system --study "studies/digits/${f}_table3_w.yaml" --runs-dir "runs/digits/system/$f" --out "$OUT"
  fi
done
for f in dit sit; do   # each MG row's effective CFG scale s* at matched recall, with bootstrap CIs over seeds
  if [ -n "$(studies ${f}_table3_w)" ]; then
    "$MGBENCH" frontier --study "studies/digits/${f}_table3_w.yaml" --out "$OUT/frontier_$f"
  fi
done
"$MGBENCH" report claims --claims reports/claims.yaml --out reports --into reports/README.md
