#!/usr/bin/env bash
# Separate distillation of ONE fixed-size student (recipe recipes/distill.yaml): the baseline
# the nested models are compared with; stage 1's loss, optimizer, data and layout.
#   sbatch slurm/distill.sh elastic.teacher_checkpoint=<importance run dir> elastic.student_budget=23B data.prefixes=[...]
#   (defaults: model=nemotron_nano_v3_30b, elastic=star_elastic_nano_v3, student 12B; see recipes/distill.yaml)
# One task per GPU: the header asks for 8 GPUs and 8 tasks per node; to change that, override
# both, e.g. sbatch --gpus-per-node=4 --ntasks-per-node=4 ...
#SBATCH --job-name=em-distill
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
launch distill "$@"
