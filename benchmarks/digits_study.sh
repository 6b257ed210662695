#!/usr/bin/env bash
# The Quickstart model's study: configs/digits.py (5 blocks, D=96, scikit-learn's 8x8 digits),
# every choice on calibration noise (seed 1), every reported number on held-out noise (seed 0).
# Stages (workdirs under RUNS; results go to benchmarks/results/digits/):
#
#   bash benchmarks/digits_study.sh train     # the Quickstart's first command (train, then sample)
#   bash benchmarks/digits_study.sh sweep     # held-out sweep of every family (HELDOUT images, batch 100)
#   bash benchmarks/digits_study.sh recipes   # UEM target x exit.aggregate on held-out noise (the defaults' evidence)
#   bash benchmarks/digits_study.sh tune      # --mode tune at 55% of the GFLOPs -> tuned_0.55.json
#   bash benchmarks/digits_study.sh pareto    # pareto_budgets.py over the held-out sweep
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/root/runs}
OUT=benchmarks/results/digits
mkdir -p "$OUT"
HELDOUT=${HELDOUT:-1000}
main() { python -m deediff_jax.main --config configs/digits.py "$@"; }
# GFLOPs and layer ratios are measured at sample.batch_size=100 (the config's): the layers a batch
# runs depend on its size.
case "${1:?usage: digits_study.sh train|sweep|recipes|tune|pareto}" in
  train)
    main --workdir "$RUNS/digits"
    cp "$RUNS/digits/sample_stats.json" "$RUNS/digits/samples.png" "$OUT/" ;;
  sweep)
    main --workdir "$RUNS/digits" --mode sweep \
         --config.sweep.num_images="$HELDOUT" --config.sweep.calibration_images=200 \
         --config.sweep.policies=uem,static,time_schedule,state_cosine,none \
         --config.sweep.thresholds=0.05,0.1,0.2 --config.sweep.depths=2,3,4 \
         --config.sweep.time_schedules=2,3,4,5 --config.sweep.cosine_thresholds=0.97,0.99 \
         --config.sweep.step_fractions=0.4,0.56,0.72 --config.sweep.combo_depths= \
         --config.exit.target_layer_ratio=0.55 --config.exit.calibrate=policy
    cp "$RUNS/digits"/sweep/*.{json,csv,md,png,npz} "$OUT/" 2>/dev/null || true ;;
  recipes)
    # The paper's eps UEM (trained jointly) against a UEM retrained alone on the fidelity target,
    # each sampled with exit.aggregate=all (the paper) and last, at the same thresholds.
    main --workdir "$RUNS/digits_uemfid" --config.train.mode=uem_only --config.train.init_from="$RUNS/digits" \
         --config.loss.uem_target=fidelity --config.train.num_steps="${UEM_STEPS:-500}" \
         --config.train.warmup_steps=50 --config.train.lr=1e-3
    for w in digits digits_uemfid; do
      for agg in all last; do
        main --workdir "$RUNS/$w" --mode sweep \
             --config.sweep.num_images="$HELDOUT" --config.sweep.calibration_images=200 \
             --config.sweep.policies=uem --config.sweep.thresholds=0.02,0.05,0.1,0.2 \
             --config.exit.aggregate="$agg" --config.exit.target_layer_ratio=0.55 --config.exit.calibrate=policy
        name="recipes_$([ "$w" = digits ] && echo eps || echo fidelity)_$agg"
        cp "$RUNS/$w/sweep/sweep.json" "$OUT/$name.json"
        cp "$RUNS/$w/sweep/per_image_psnr.npz" "$OUT/$name.npz"
      done
    done
    python benchmarks/compare_recipes.py "$OUT"/recipes_eps_all.json "$OUT"/recipes_eps_last.json \
        "$OUT"/recipes_fidelity_all.json "$OUT"/recipes_fidelity_last.json > "$OUT/recipes.md" ;;
  tune)
    main --workdir "$RUNS/digits" --mode tune --config.tune.budget="${BUDGET:-0.55}" \
         --config.tune.heldout_images="$HELDOUT" --config.tune.calibration_images=200 \
         --config.tune.out="$OUT/tuned_${BUDGET:-0.55}.json" ;;
  pareto)
    python benchmarks/pareto_budgets.py "$OUT/sweep.json" --json - > "$OUT/pareto_budgets.json"
    python benchmarks/pareto_budgets.py "$OUT/sweep.json" --markdown > "$OUT/pareto_budgets.md" ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
