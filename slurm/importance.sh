#!/usr/bin/env bash
# Importance + sorting of the parent (recipe recipes/importance.yaml): writes the sorted
# parent, the teacher and initial student of stage 1, into the run dir.
#   sbatch slurm/importance.sh elastic.parent_checkpoint=<parent run or checkpoint dir>
#   (data-parallel over the tasks; tp=1, ep=1)
# One task per GPU: the header asks for 8 GPUs and 8 tasks per node; to change that, override
# both, e.g. sbatch --gpus-per-node=4 --ntasks-per-node=4 ...
#SBATCH --job-name=em-importance
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
# stdout+stderr of the job; create logs/ before submitting (mkdir -p logs).
#SBATCH --output=logs/%x-%j.out
source "${ELASTIC_MEGATRON_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
launch importance "$@"
