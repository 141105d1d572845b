#!/usr/bin/env bash
# Star Elastic nested QAD (NVFP4): quantization-aware distillation of the stage-2 checkpoint (recipe recipes/qad.yaml).
#   sbatch slurm/qad.sh elastic.teacher_checkpoint=<stage 2 run dir> [quant=fp8] [hydra overrides]
#   (the student starts from the teacher: the BF16 stage-2 model; its budgets and scales go into every checkpoint)
# One task per GPU: the header asks for 8 GPUs and 8 tasks per node; to change that, override
# both, e.g. sbatch --gpus-per-node=4 --ntasks-per-node=4 ...
#SBATCH --job-name=em-qad
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
# stdout+stderr of the job; create logs/ before submitting (mkdir -p logs).
#SBATCH --output=logs/%x-%j.out
source "${ELASTIC_MEGATRON_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
launch qad "$@"
