#!/usr/bin/env bash
# The text-guided MNIST study (issue 7): captions written from the labels (data/captions.py),
# encoded once with all-MiniLM-L6-v2, a text-conditional U-ViT (D=128, 7 blocks, 16 context
# tokens, cosine schedule, model.input_skip) trained STEPS steps at batch 64 (resumable), then
# sampled from the held-out wordings and swept (docs/text.md). MNIST_NPZ is an npz of 28x28 MNIST
# (image/label uint8): the captions are written from its labels and training reads its images.
#
#   bash benchmarks/mnist_text_study.sh           # 28x28, patch 4
#   RES=14 STEPS=2500 bash benchmarks/mnist_text_study.sh   # MNIST pooled to 14x14, patch 2
#
# RUNS (default /root/runs) holds the workdir; results are copied to benchmarks/results/mnist_text
# (mnist14_text with RES=14).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/root/runs}
MNIST_NPZ=${MNIST_NPZ:-../shared/data/mnist10k.npz}
STEPS=${STEPS:-3500}
CAPS="$RUNS/mnist_captions.npz"
[ -f "$CAPS" ] || python -m deediff_jax.data.encode_text --captions-for-npz "$MNIST_NPZ" --out "$CAPS"
# RES=14: MNIST pooled to 14x14 by the npz source (a 2x2 mean; the same images in the same order, so
# the same caption features) with patch 2, 4 pixels per token instead of 16.
NAME=mnist_text EXTRA=()
if [ "${RES:-28}" = 14 ]; then
  NAME=mnist14_text
  EXTRA=(--config.data.image_size=14 --config.model.image_size=14
         --config.model.patch_size=2 --config.train.lr=2e-3)
fi
ARGS=(--config configs/mnist_text.py --workdir "$RUNS/$NAME" --config.data.source="npz:$MNIST_NPZ"
      --config.data.context_file="$CAPS"
      --config.diffusion.schedule=cosine --config.model.input_skip=True --config.model.embed_dim=128 --config.model.depth=6 --config.model.num_heads=4
      --config.train.batch_size=64 --config.train.lr=1e-3 --config.train.warmup_steps=200
      --config.train.ema_rate=0.999 --config.train.checkpoint_every=500 --config.train.log_every=100
      --config.train.num_steps="$STEPS" "${EXTRA[@]}")
python -m deediff_jax.main "${ARGS[@]}"
python -m deediff_jax.main "${ARGS[@]}" --mode sweep --config.sample.steps=25 --config.sweep.num_images=200 \
    --config.sample.batch_size=100 --config.sweep.thresholds=0.03,0.06,0.1,0.15,0.2,0.3 \
    --config.sweep.depths=2,3,4,5 --config.sweep.cosine_thresholds=0.95,0.99 --config.exit.target_layer_ratio=0.6
mkdir -p "benchmarks/results/$NAME"
cp "$RUNS/$NAME"/sweep/*.{json,csv,md,png} "benchmarks/results/$NAME/"
cp "$RUNS/$NAME"/samples.png "$RUNS/$NAME"/sample_stats.json "benchmarks/results/$NAME/"
