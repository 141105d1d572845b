#!/usr/bin/env bash
# Pretrain a parent from scratch (recipe recipes/pretrain.yaml).
#   sbatch slurm/pretrain.sh [hydra overrides]          e.g. sbatch slurm/pretrain.sh trainer.max_steps=10
#   sbatch --nodes=4 slurm/pretrain.sh model=nemotron_nano_v3_30b
# One task per GPU: the header asks for 8 GPUs and 8 tasks per node; to change that, override
# both, e.g. sbatch --gpus-per-node=4 --ntasks-per-node=4 ...
#SBATCH --job-name=em-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
# stdout+stderr of the job; create logs/ before submitting (mkdir -p logs).
#SBATCH --output=logs/%x-%j.out
source "${ELASTIC_MEGATRON_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
launch pretrain "$@"
