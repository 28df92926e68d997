#!/usr/bin/env bash
# Recipe of the small fixer bundled in difix3d/assets/difix-tiny: synthetic driving segments -> curated pairs
# (sparse, under-fitted and cross-camera 3DGS renders vs exact ground truth) -> fine-tune the `tiny` preset with
# L2 (no pretrained VGG is needed) and its VAE trained too (--train-vae: the tiny preset has no pretrained
# autoencoder to freeze) -> export. On 2 CPU cores: synthesis ~1 min, curation ~8 min, 1 000 steps ~20 min;
# then held-out pairs from 2 segments of other seeds (900, 901), whose before/after PSNR is benchmarks/finetune.py --heldout
#   bash scripts/train_bundled_fixer.sh WORKDIR [STEPS] [SEGMENTS]
set -euo pipefail
WORK=${1:?usage: train_bundled_fixer.sh WORKDIR [STEPS] [SEGMENTS]}
STEPS=${2:-1000}
SEGMENTS=${3:-8}
H=${H:-48}; W=${W:-64}; FRAMES=${FRAMES:-12}; ITERS=${ITERS:-300}; BATCH=${BATCH:-16}
GPU_FLAG=$(python3 -c "import torch; print('--use-gpu' if torch.cuda.is_available() else '--no-use-gpu')")
python3 -m difix3d.cli synth "$WORK/segments" --segments "$SEGMENTS" --frames "$FRAMES" --height "$H" --width "$W" \
    --points 2000 --seed 100
python3 jobs/curate.py --scenes "$WORK/segments" --output "$WORK/pairs" --tiny --iterations "$ITERS" \
    --strategies sparse,underfit,cross_camera --min-psnr 8 --max-psnr 40
python3 jobs/finetune.py --train-shards "$WORK/pairs/shards" --init tiny --steps "$STEPS" --batch-size "$BATCH" \
    --height "$H" --width "$W" --num-workers 1 $GPU_FLAG --loss.lpips 0 --loss.gram 0 --lr 1e-3 --train-vae \
    --name bundled-tiny --storage-path "$WORK/runs" --export-uri "$WORK/difix-tiny" --val-every "$STEPS" --ckpt-every "$STEPS"
echo "exported: $WORK/difix-tiny (copy it over difix3d/assets/difix-tiny to bundle it)"
# held-out pairs: 2 segments of seeds no training segment uses, curated the same way
python3 -m difix3d.cli synth "$WORK/heldout_segments" --segments 2 --frames "$FRAMES" --height "$H" --width "$W" \
    --points 2000 --seed 900
python3 jobs/curate.py --scenes "$WORK/heldout_segments" --output "$WORK/heldout_pairs" --tiny --iterations "$ITERS" \
    --strategies sparse,underfit,cross_camera --min-psnr 8 --max-psnr 40
echo "held-out effect: python benchmarks/finetune.py --heldout $WORK/heldout_pairs/shards --checkpoint $WORK/difix-tiny"
