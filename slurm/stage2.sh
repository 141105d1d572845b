#!/usr/bin/env bash
# Star Elastic stage 2: 0.5/0.3/0.2 budget sampling, 49K context, from stage 1 (recipe recipes/stage2.yaml).
#   sbatch slurm/stage2.sh elastic.teacher_checkpoint=<importance run dir> elastic.init_checkpoint=<stage 1 run dir> [hydra overrides]
#   (stage1.sh / stage2.sh default to model=nemotron_nano_v3_30b, elastic=star_elastic_nano_v3)
# One task per GPU: the header asks for 8 GPUs and 8 tasks per node; to change that, override
# both, e.g. sbatch --gpus-per-node=4 --ntasks-per-node=4 ...
#SBATCH --job-name=em-stage2
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
# stdout+stderr of the job; create logs/ before submitting (mkdir -p logs).
#SBATCH --output=logs/%x-%j.out
source "${ELASTIC_MEGATRON_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
launch stage2 "$@"
