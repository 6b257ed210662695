#!/usr/bin/env bash
# The MNIST early-exit studies, sized for a 2-core CPU (docs/results.md has what each stage
# measures). 7-block stages: U-ViT D=128, depth 6, cosine schedule, model.input_skip, batch 64;
# 28x28 uses patch 4 (49 tokens, STEPS steps, default 4,000); the *14 stages pool MNIST to 14x14
# (a 2x2 mean in the npz source) with patch 2 (49 tokens, STEPS14 steps, default 3,000).
#
#   bash benchmarks/mnist_study.sh scratch    # joint DeeDiff training from scratch, then sweep
#   bash benchmarks/mnist_study.sh backbone   # the backbone alone (no exit losses)
#   bash benchmarks/mnist_study.sh frozen     # exits + UEMs trained on the frozen backbone, then sweep
#   bash benchmarks/mnist_study.sh scratch14  # joint training on MNIST pooled to 14x14 (patch 2), then sweep
#   bash benchmarks/mnist_study.sh backbone14 && bash benchmarks/mnist_study.sh frozen14   # the same, frozen mode
#
# MNIST_NPZ is an npz of 28x28 MNIST (image/label, test_image/test_label uint8; the configs' default
# source, TFDS mnist, needs internet). RUNS (default /root/runs) holds the workdirs; results are
# copied to benchmarks/results/mnist*.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/root/runs}
MNIST_NPZ=${MNIST_NPZ:-../shared/data/mnist10k.npz}
STEPS=${STEPS:-4000}   # joint / backbone training steps (the frozen stage trains 800)
SIZE=(--config.data.source="npz:$MNIST_NPZ" --config.diffusion.schedule=cosine --config.model.input_skip=True --config.model.embed_dim=128 --config.model.depth=6 --config.model.num_heads=4
      --config.train.batch_size=64 --config.train.lr=1e-3 --config.train.warmup_steps=200
      --config.train.ema_rate=0.999 --config.train.checkpoint_every=500 --config.train.log_every=100)
# Sweep: 200 images per setting from the same noise, DDIM 25 steps, guidance 1; the UEM threshold
# calibrated to 60% of the blocks, once as one number and once per timestep bucket (5 buckets).
SWEEP=(--config.sample.steps=25 --config.sweep.num_images=200 --config.sample.batch_size=100
       --config.sweep.thresholds=0.03,0.06,0.1,0.15,0.2,0.3 --config.sweep.depths=2,3,4,5
       --config.sweep.cosine_thresholds=0.95,0.99 --config.exit.target_layer_ratio=0.6
       --config.exit.calibration_buckets=5)
run() { python -m deediff_jax.main --config configs/mnist.py "$@"; }
publish() {  # workdir -> benchmarks/results/NAME (tables, plots, small JSON; never checkpoints)
  mkdir -p "benchmarks/results/$2"
  cp "$1"/sweep/*.{json,csv,md,png} "benchmarks/results/$2/"
  cp "$1"/samples.png "$1"/sample_stats.json "benchmarks/results/$2/" 2>/dev/null || true
}
# MNIST pooled to 14x14 (the npz source's 2x2 mean), patch 2: 49 tokens like 28x28/patch 4, but 4
# pixels per token.
SMALL=(--config.data.source="npz:$MNIST_NPZ" --config.data.image_size=14 --config.model.image_size=14
       --config.model.patch_size=2 --config.train.lr=2e-3)
# The 13-block study (issue "Exits that pay"): depth 12 = 13 blocks, the U-ViT-S depth the paper
# uses, D=128, patch 2 on MNIST pooled to 14x14. Every stage resumes from its workdir.
#   bash benchmarks/mnist_study.sh joint13          # joint DeeDiff training (2,000-step schedule) + the full sweep
#   bash benchmarks/mnist_study.sh uem13 x0         # only the UEMs, retrained on joint13 with loss.uem_target=x0
#   bash benchmarks/mnist_study.sh uem13 fidelity   # ... fidelity (eps also works: the same target, trained anew)
#   bash benchmarks/mnist_study.sh adadiff13        # the official AdaDiff formulation, finetuned from joint13
#   bash benchmarks/mnist_study.sh last13 fidelity       # the full sweep of uem13 TARGET's UEM with exit.aggregate=last
#   bash benchmarks/mnist_study.sh jointfid13       # joint training from scratch with loss.uem_target=fidelity + full sweep
#   bash benchmarks/mnist_study.sh frozenfid13      # frozen-backbone mode (joint13's backbone) with the fidelity target
#   bash benchmarks/mnist_study.sh guided13 fidelity 0.55   # --mode eval of uem13 TARGET's UEM with exit.calibrate=guided
SIZE13=(--config.diffusion.schedule=cosine --config.model.input_skip=True --config.model.embed_dim=128
        --config.model.depth=12 --config.model.num_heads=4 --config.train.batch_size=64 --config.train.lr=2e-3
        --config.train.warmup_steps=200 --config.train.ema_rate=0.999 --config.train.checkpoint_every=250
        --config.train.log_every=50 --config.train.sample_at_end=False
        --config.data.source="npz:$MNIST_NPZ" --config.data.image_size=14 --config.model.image_size=14
        --config.model.patch_size=2)
# The 13-block sweep: 200 images from the same noise, DDIM 25 steps, guidance 1; learned policies
# calibrated to 55% of the blocks (one threshold, and one per 5 timestep buckets), the oracle
# ceiling, fewer steps (30/45/60/75% of 25) and static 11 on top of the two largest.
SWEEP13=(--config.sample.steps=25 --config.sweep.num_images=200 --config.sample.batch_size=100
         --config.sweep.thresholds=0.03,0.06,0.1,0.15,0.2,0.3 --config.sweep.depths=3,5,7,9,11
         --config.sweep.cosine_thresholds=0.95,0.99 --config.sweep.oracle_tolerances=0.02,0.05,0.1,0.2
         --config.sweep.confidence_thresholds=0.8,0.85,0.9,0.92,0.95,0.97
         --config.sweep.step_fractions=0.3,0.45,0.6,0.75 --config.sweep.combo_depths=11
         --config.exit.target_layer_ratio=0.55 --config.exit.calibration_buckets=5)
# The committed joint13 results stopped at the 1,250-step checkpoint of the 2,000-step schedule
# (session time); STOP13=0 trains the whole schedule (resuming from the workdir).
JOINT13=(--config.train.num_steps="${STEPS13:-2000}" --config.train.stop_at="${STOP13:-1250}")
case "${1:?usage: mnist_study.sh scratch|backbone|frozen|scratch14|backbone14|frozen14|joint13|uem13 TARGET|last13 TARGET|jointfid13|frozenfid13|guided13 TARGET RATIO|adadiff13}" in
  joint13)
    run --workdir "$RUNS/m14d12_joint" "${SIZE13[@]}" "${JOINT13[@]}"
    run --workdir "$RUNS/m14d12_joint" --mode sweep "${SIZE13[@]}" "${JOINT13[@]}" "${SWEEP13[@]}"
    publish "$RUNS/m14d12_joint" mnist13_joint ;;
  uem13)       # UEMs alone (backbone and heads of joint13 frozen), one target, then the UEM rows
    target=${2:?usage: mnist_study.sh uem13 eps|x0|fidelity}
    U=(--config.train.mode=uem_only --config.train.init_from="$RUNS/m14d12_joint" --config.loss.uem_target="$target"
       --config.train.num_steps="${UEM_STEPS:-250}" --config.train.warmup_steps=50 --config.train.lr=1e-3)
    run --workdir "$RUNS/m14d12_uem_$target" "${SIZE13[@]}" "${U[@]}"
    run --workdir "$RUNS/m14d12_uem_$target" --mode sweep "${SIZE13[@]}" "${U[@]}" "${SWEEP13[@]}" \
        --config.sweep.policies=uem --config.sweep.step_fractions=
    publish "$RUNS/m14d12_uem_$target" "mnist13_uem_$target" ;;
  last13)      # THE 13-block sweep: uem13 TARGET's UEM with exit.aggregate=last, next to every fixed alternative
    # (static, time_schedule with the DuoDiff switches, state_cosine, fewer steps, exit + fewer steps),
    # the calibrated rows (UEM scalar and per bucket, oracle-calibrated time_schedule) and the oracle.
    target=${2:?usage: mnist_study.sh last13 eps|x0|fidelity}
    U=(--config.train.mode=uem_only --config.train.init_from="$RUNS/m14d12_joint" --config.loss.uem_target="$target"
       --config.train.num_steps="${UEM_STEPS:-250}" --config.train.warmup_steps=50 --config.train.lr=1e-3)
    mkdir -p "$RUNS/m14d12_uem_${target}_last"
    cp -r "$RUNS/m14d12_uem_$target/checkpoints" "$RUNS/m14d12_uem_$target/classifier" \
          "$RUNS/m14d12_uem_$target/fid_stats" "$RUNS/m14d12_uem_${target}_last/" 2>/dev/null || true
    run --workdir "$RUNS/m14d12_uem_${target}_last" --mode sweep "${SIZE13[@]}" "${U[@]}" "${SWEEP13[@]}" \
        --config.sweep.thresholds=0.02,0.03,0.045,0.06,0.1 --config.exit.aggregate=last
    publish "$RUNS/m14d12_uem_${target}_last" "mnist13_uem_${target}_last" ;;
  jointfid13)  # joint DeeDiff training from scratch with loss.uem_target=fidelity (1,250 of 2,000 steps
    # like joint13), then the same full sweep as last13
    F=(--config.loss.uem_target=fidelity --config.train.num_steps="${STEPS13:-2000}" --config.train.stop_at="${STOP13:-1250}")
    run --workdir "$RUNS/m14d12_jointfid" "${SIZE13[@]}" "${F[@]}"
    run --workdir "$RUNS/m14d12_jointfid" --mode sweep "${SIZE13[@]}" "${F[@]}" "${SWEEP13[@]}" \
        --config.sweep.thresholds=0.02,0.03,0.045,0.06,0.1 --config.exit.aggregate=last
    publish "$RUNS/m14d12_jointfid" mnist13_jointfid ;;
  frozenfid13) # frozen-backbone mode with the fidelity target: exit heads + UEMs retrained on joint13's
    # frozen backbone, then the learned rows (aggregate=last) and full depth
    Z=(--config.train.mode=frozen_backbone --config.train.init_from="$RUNS/m14d12_joint" --config.loss.uem_target=fidelity
       --config.train.num_steps="${FROZEN_STEPS:-400}" --config.train.warmup_steps=50 --config.train.lr=1e-3)
    run --workdir "$RUNS/m14d12_frozenfid" "${SIZE13[@]}" "${Z[@]}"
    run --workdir "$RUNS/m14d12_frozenfid" --mode sweep "${SIZE13[@]}" "${Z[@]}" "${SWEEP13[@]}" \
        --config.sweep.policies=uem,none --config.sweep.thresholds=0.02,0.03,0.045,0.06,0.1 \
        --config.sweep.step_fractions= --config.exit.aggregate=last
    publish "$RUNS/m14d12_frozenfid" mnist13_frozenfid ;;
  guided13)    # one eval row: the UEM's per-bucket thresholds held to the oracle-calibrated schedule's shares
    target=${2:?usage: mnist_study.sh guided13 eps|x0|fidelity RATIO}; ratio=${3:?usage: mnist_study.sh guided13 TARGET RATIO}
    U=(--config.train.mode=uem_only --config.train.init_from="$RUNS/m14d12_joint" --config.loss.uem_target="$target"
       --config.train.num_steps="${UEM_STEPS:-250}" --config.train.warmup_steps=50 --config.train.lr=1e-3)
    run --workdir "$RUNS/m14d12_uem_$target" --mode eval "${SIZE13[@]}" "${U[@]}" "${SWEEP13[@]}" \
        --config.exit.policy=uem --config.exit.calibrate=guided --config.exit.target_layer_ratio="$ratio"
    mkdir -p "benchmarks/results/mnist13_uem_$target"
    cp "$RUNS/m14d12_uem_$target/eval.json" "benchmarks/results/mnist13_uem_$target/eval_guided_$ratio.json" ;;
  adadiff13)   # the official formulation: shared head + per-pixel confidence, finetuned from joint13
    A=(--config.model.exit_style=adadiff --config.exit.policy=adadiff --config.exit.threshold=0.9
       --config.train.mode=finetune --config.train.init_from="$RUNS/m14d12_joint"
       --config.train.num_steps="${ADA_STEPS:-200}" --config.train.warmup_steps=20 --config.train.lr=1e-3)
    run --workdir "$RUNS/m14d12_adadiff" "${SIZE13[@]}" "${A[@]}"
    run --workdir "$RUNS/m14d12_adadiff" --mode sweep "${SIZE13[@]}" "${A[@]}" "${SWEEP13[@]}" \
        --config.sweep.policies=adadiff,static,none --config.sweep.depths=5,7,9 --config.sweep.step_fractions=
    publish "$RUNS/m14d12_adadiff" mnist13_adadiff ;;
  scratch)
    run --workdir "$RUNS/mnist_scratch" "${SIZE[@]}" --config.train.num_steps="$STEPS"
    run --workdir "$RUNS/mnist_scratch" --mode sweep "${SIZE[@]}" --config.train.num_steps="$STEPS" "${SWEEP[@]}"
    publish "$RUNS/mnist_scratch" mnist_scratch ;;
  scratch14)
    run --workdir "$RUNS/mnist14_scratch" "${SIZE[@]}" "${SMALL[@]}" --config.train.num_steps="${STEPS14:-3000}"
    run --workdir "$RUNS/mnist14_scratch" --mode sweep "${SIZE[@]}" "${SMALL[@]}" \
        --config.train.num_steps="${STEPS14:-3000}" "${SWEEP[@]}"
    publish "$RUNS/mnist14_scratch" mnist14_scratch ;;
  backbone14)  # the 14x14 backbone alone (no exit losses), for frozen14
    run --workdir "$RUNS/mnist14_backbone" "${SIZE[@]}" "${SMALL[@]}" --config.train.num_steps="${STEPS14:-3000}" \
        --config.loss.lambda_u=0 --config.loss.beta_ual=0 --config.train.sample_at_end=False ;;
  frozen14)    # exits + UEMs trained on the frozen 14x14 backbone, then the same sweep as scratch14
    run --workdir "$RUNS/mnist14_frozen" "${SIZE[@]}" "${SMALL[@]}" --config.train.num_steps=800 \
        --config.train.mode=frozen_backbone --config.train.init_from="$RUNS/mnist14_backbone"
    run --workdir "$RUNS/mnist14_frozen" --mode sweep "${SIZE[@]}" "${SMALL[@]}" --config.train.num_steps=800 \
        --config.train.mode=frozen_backbone --config.train.init_from="$RUNS/mnist14_backbone" "${SWEEP[@]}"
    publish "$RUNS/mnist14_frozen" mnist14_frozen ;;
  backbone)
    run --workdir "$RUNS/mnist_backbone" "${SIZE[@]}" --config.train.num_steps="$STEPS" \
        --config.loss.lambda_u=0 --config.loss.beta_ual=0 --config.train.sample_at_end=False ;;
  frozen)
    run --workdir "$RUNS/mnist_frozen" "${SIZE[@]}" --config.train.num_steps=800 \
        --config.train.mode=frozen_backbone --config.train.init_from="$RUNS/mnist_backbone"
    run --workdir "$RUNS/mnist_frozen" --mode sweep "${SIZE[@]}" --config.train.num_steps=800 \
        --config.train.mode=frozen_backbone --config.train.init_from="$RUNS/mnist_backbone" "${SWEEP[@]}"
    publish "$RUNS/mnist_frozen" mnist_frozen ;;
esac
