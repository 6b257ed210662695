#!/usr/bin/env bash
# The headline study: configs/mnist13.py (13 blocks, D=128, MNIST pooled to 14x14), every choice on
# calibration noise, every reported number on held-out noise. Stages, in order (each resumes or
# overwrites only its own workdir under RUNS; results go to benchmarks/results/mnist13/, the model to
# benchmarks/models/mnist13/):
#
#   bash benchmarks/mnist13_study.sh joint      # backbone + heads + paper (eps) UEMs, jointly (~1.1 s/step idle)
#   bash benchmarks/mnist13_study.sh continue   # 3,000 more joint steps with loss.time_weighting=min_snr, from the first export
#   BACKBONE=$RUNS/mnist13_continue bash benchmarks/mnist13_study.sh uem   # UEMs alone retrained on the fidelity target
#   bash benchmarks/mnist13_study.sh adadiff    # the official AdaDiff formulation, fine-tuned from the joint backbone
#   bash benchmarks/mnist13_study.sh export     # benchmarks/models/mnist13/params.npz (float16) from the uem run
#   bash benchmarks/mnist13_study.sh adadiff_sweep  # the AdaDiff fine-tune on held-out noise -> results/mnist13/adadiff/
#   bash benchmarks/mnist13_study.sh router     # a Learning-to-Cache router for the study's sampler and steps
#   bash benchmarks/mnist13_study.sh sweep      # the held-out sweep (>= 1,000 images) from params.npz + router
#   bash benchmarks/mnist13_study.sh tune       # --mode tune at 40/55/70% of the GFLOPs -> tuned_{0.4,0.55,0.7}.json
#   bash benchmarks/mnist13_study.sh pareto     # pareto_budgets.py --json over the held-out sweep
#   bash benchmarks/mnist13_study.sh wallclock  # chosen points vs full depth at batch 1, 8, 100
#
# The committed model is joint -> uem -> export (the params.npz of commit f892112, whose strokes
# break apart: 2.71 ink components per image) -> continue -> uem -> export, with
# BACKBONE=$RUNS/mnist13_continue for the second uem/adadiff/export. CONTINUE_FROM defaults to
# $RUNS/mnist13_base_params.npz, that first export:
#   git show f892112:benchmarks/models/mnist13/params.npz > $RUNS/mnist13_base_params.npz
#
# Everything after `export` reads only the committed files (params.npz, router.npz): the study
# reproduces without training. MNIST_NPZ: a 28x28 MNIST npz (image/label, test_image/test_label);
# users with internet drop the override and get tfds:mnist through the same 2x2 mean.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/root/runs}
MNIST_NPZ=${MNIST_NPZ:-../shared/data/mnist10k.npz}
OUT=benchmarks/results/mnist13
MODEL=benchmarks/models/mnist13
mkdir -p "$OUT" "$MODEL"
# A sweep workdir's tables, plots and per-image PSNRs into a results folder.
copy_sweep() { mkdir -p "$2"; cp "$1"/sweep/*.{json,csv,md,png,npz} "$2/" 2>/dev/null || true; }
main() { python -m deediff_jax.main --config configs/mnist13.py --config.data.source="npz:$MNIST_NPZ" "$@"; }
FROM_FILE=(--config.sample.params_file="$MODEL/params.npz")
# The study's sampler: DDIM, 25 steps, guidance GUIDANCE, batch 100 (GFLOPs and layer ratios are
# measured at this batch size: the layers a batch runs depend on its size).
GUIDANCE=${GUIDANCE:-2.0}
SAMPLE=(--config.sample.sampler=ddim --config.sample.steps=25 --config.sample.batch_size=100
        --config.sample.guidance_scale="$GUIDANCE")
HELDOUT=${HELDOUT:-1000}
# The backbone the uem/adadiff stages start from: the joint run, or the continued one
# (BACKBONE=$RUNS/mnist13_continue).
BACKBONE=${BACKBONE:-$RUNS/mnist13_joint}
case "${1:?usage: mnist13_study.sh joint|continue|uem|adadiff|export|adadiff_sweep|router|sweep|tune|pareto|wallclock}" in
  joint)
    # The committed model: the config's 3,000 steps in one run (about an hour idle; it resumes
    # from its last checkpoint when rerun). JOINT_STEPS overrides the step count.
    main --workdir "$RUNS/mnist13_joint" ${JOINT_STEPS:+--config.train.num_steps=$JOINT_STEPS} ;;
  continue)
    # The joint loss again (backbone, heads and eps UEMs), CONTINUE_STEPS more steps on a fresh
    # cosine schedule from the first export (EMA weights; a new optimiser state), so it needs no
    # checkpoint of the joint run. More steps mend most of the broken strokes, Min-SNR-5 weighting
    # the rest (CONTINUE_WEIGHTING=uniform: the paper's loss; the A/B is in docs/design.md).
    main --workdir "$RUNS/mnist13_continue" --config.train.mode=finetune --config.train.init_from="${CONTINUE_FROM:-$RUNS/mnist13_base_params.npz}" \
         --config.train.num_steps="${CONTINUE_STEPS:-3000}" --config.train.lr="${CONTINUE_LR:-1e-3}" \
         --config.train.warmup_steps=100 --config.loss.time_weighting="${CONTINUE_WEIGHTING:-min_snr}" ;;
  uem)
    main --workdir "$RUNS/mnist13_uemfid" --config.train.mode=uem_only --config.train.init_from="$BACKBONE" \
         --config.loss.uem_target=fidelity --config.train.num_steps="${UEM_STEPS:-250}" \
         --config.train.warmup_steps=50 --config.train.lr=1e-3 ;;
  adadiff)
    main --workdir "$RUNS/mnist13_adadiff" --config.model.exit_style=adadiff --config.exit.policy=adadiff --config.train.mode=finetune \
         --config.train.init_from="$BACKBONE" --config.train.num_steps="${ADADIFF_STEPS:-250}" \
         --config.train.warmup_steps=50 --config.train.lr=5e-4 ;;
  export)
    python -m deediff_jax.export --workdir "$RUNS/mnist13_uemfid" --out "$MODEL/params.npz" --float16
    python -m deediff_jax.export --workdir "$BACKBONE" --out "$RUNS/mnist13_eps_params.npz" --float16
    if [ -d "$RUNS/mnist13_adadiff" ]; then   # the optional AdaDiff fine-tune
      python -m deediff_jax.export --workdir "$RUNS/mnist13_adadiff" --out "$RUNS/mnist13_adadiff_params.npz" --float16
    fi ;;
  adadiff_sweep)
    # The official AdaDiff formulation (the adadiff stage, exported by export) on the study's
    # protocol: its confidence threshold calibrated to 55% of the blocks on calibration noise, a
    # few fixed thresholds, PSNR against its own full depth on HELDOUT held-out images.
    main --workdir "$RUNS/mnist13_adadiff_sweep" --mode sweep --config.model.exit_style=adadiff --config.exit.policy=adadiff \
         --config.sample.params_file="$RUNS/mnist13_adadiff_params.npz" "${SAMPLE[@]}" \
         --config.sweep.num_images="$HELDOUT" --config.sweep.calibration_images=200 \
         --config.sweep.policies=adadiff,none --config.sweep.confidence_thresholds="${CONFIDENCES:-0.9,0.95}" \
         --config.sweep.step_fractions= --config.sweep.combo_depths= \
         --config.exit.aggregate=last --config.exit.target_layer_ratio=0.55 --config.exit.calibrate=policy
    copy_sweep "$RUNS/mnist13_adadiff_sweep" "$OUT/adadiff" ;;
  router)
    # The frozen backbone is the committed params file, so this stage needs no checkpoint.
    main --workdir "$RUNS/mnist13_router" "${SAMPLE[@]}" "${FROM_FILE[@]}" --config.train.mode=router \
         --config.train.num_steps="${ROUTER_STEPS:-400}" \
         --config.train.lr="${ROUTER_LR:-2e-2}" --config.train.warmup_steps=20 --config.train.log_every=50 \
         --config.train.checkpoint_every=100
    cp "$RUNS/mnist13_router/router.npz" "$MODEL/router.npz" ;;
  sweep)
    # Every row on HELDOUT held-out images (sample.seed 0) and on 200 calibration images
    # (sweep.calibration_seed 1): pareto_budgets picks on the calibration columns. The defaults are
    # the committed sweep's (14 settings, about 45 minutes on the 2-core CPU); tune searches wider.
    main --workdir "$RUNS/mnist13_sweep" --mode sweep "${FROM_FILE[@]}" "${SAMPLE[@]}" \
         --config.cache.router="$MODEL/router.npz" \
         --config.sweep.num_images="$HELDOUT" --config.sweep.calibration_images=200 \
         --config.sweep.policies="${POLICIES:-uem,static,time_schedule,none,l2c,l2c+exit}" \
         --config.sweep.thresholds="${THRESHOLDS:-0.1,0.2}" --config.sweep.depths="${DEPTHS:-7,9}" \
         --config.sweep.cosine_thresholds=0.97 --config.sweep.time_schedules="${SCHEDULES:-5,9,13}" --config.sweep.step_fractions="${FRACTIONS:-0.4,0.48,0.64}" \
         --config.sweep.combo_depths= --config.sweep.cache_thresholds="${CACHE_THRESHOLDS:-0.7}" \
         --config.exit.aggregate=last --config.exit.target_layer_ratio=0.55 --config.exit.calibrate=policy \
         --config.exit.calibration_buckets=5
    copy_sweep "$RUNS/mnist13_sweep" "$OUT" ;;
  tune)
    # Every budget in one run (tune.budgets): the full-depth references and every candidate two
    # budgets share are measured once; each budget's file is what a run of it alone writes. The
    # router's thresholds are finer where its cost crosses the budgets (0.7: 0.705 of the GFLOPs).
    main --workdir "$RUNS/mnist13_tune" --mode tune "${FROM_FILE[@]}" "${SAMPLE[@]}" \
         --config.cache.router="$MODEL/router.npz" --config.tune.budgets="$(echo ${BUDGETS:-0.4 0.55 0.7} | tr ' ' ',')" \
         --config.tune.heldout_images="$HELDOUT" --config.tune.calibration_images=200 \
         --config.sweep.cache_thresholds="${TUNE_CACHE_THRESHOLDS:-0.7,0.72,0.75,0.8,0.85,0.9,0.95,0.99}" \
         --config.tune.out="$OUT/tuned_{budget}.json" ;;  # the router path is stored relative to each file
  pareto)
    python benchmarks/pareto_budgets.py "$OUT/sweep.json" --json - > "$OUT/pareto_budgets.json"
    python benchmarks/pareto_budgets.py "$OUT/sweep.json" --markdown > "$OUT/pareto_budgets.md" ;;
  wallclock)
    python benchmarks/bench_wallclock.py --config configs/mnist13.py --settings "$OUT/pareto_budgets.json" \
        --json "$OUT/wallclock.json" --batches 1,8,100 --repeats "${REPEATS:-5}" \
        --config.data.source="npz:$MNIST_NPZ" "${FROM_FILE[@]}" "${SAMPLE[@]}" \
        --config.cache.router="$MODEL/router.npz" ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
