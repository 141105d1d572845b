#!/usr/bin/env bash
# Tokenise a corpus too large for one node as a Slurm array job: task I of N runs
# tools/preprocess_data.py --shard I/N over the input files (a contiguous run of them each),
# with one worker per CPU of the task, and writes its own prefix <output-prefix>.shardIIIII-of-NNNNN
# atomically (the tokenizer record is renamed into place last). A re-submitted array skips the
# shards that finished, so only failed or preempted tasks redo their work.
#   sbatch --array=0-63 slurm/preprocess.sh --input /data/web/*.jsonl --output-prefix /data/tok/web \
#       --tokenizer hf --tokenizer-path /models/nemotron-nano
# then, once every task has finished, the blend for the recipe (each shard with its weight):
#   python tools/preprocess_data.py --write-blend recipes/data/web.yaml --corpora /data/tok/web
#   python tools/preprocess_data.py --write-blend recipes/data/mix.yaml --corpora 0.7 /data/tok/web 0.3 /data/tok/sft
# Any tools/preprocess_data.py option passes through (--input-format chat, --json-key, ...).
# `bash slurm/preprocess.sh --dry-run --array=0-63 [options]` submits nothing and prints each
# task's command with the input files its shard gets.
#SBATCH --job-name=em-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --requeue
# stdout+stderr of each task; create logs/ before submitting (mkdir -p logs).
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

# Relative paths in the options are read from the directory sbatch was called in (where a
# Slurm job starts); the repository is that directory too, unless ELASTIC_MEGATRON_ROOT says
# otherwise. Outside Slurm (--dry-run) it is the one this script lies in.
if [[ -n "${ELASTIC_MEGATRON_ROOT:-}" ]]; then
  REPO="$ELASTIC_MEGATRON_ROOT"
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  REPO="${SLURM_SUBMIT_DIR:-$PWD}"
else
  REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
fi
export PYTHONUNBUFFERED=1

args=()
dry_run=0
array=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --array=*) array="${arg#--array=}" ;;
    *) args+=("$arg") ;;
  esac
done

if (( dry_run )); then
  # The array as sbatch would get it: --array=0-N-1 here, else the script's own header.
  [[ -n "$array" ]] || array="$(sed -n 's/^#SBATCH --array=\(.*\)/\1/p' "$0" | tail -n 1)"
  if [[ ! "$array" =~ ^0-([0-9]+)$ ]]; then
    echo "error: --dry-run needs the array as --array=0-<N-1> (one task per shard), got '${array}'" >&2
    exit 2
  fi
  count=$(( BASH_REMATCH[1] + 1 ))
  echo "dry run of a ${count}-task array; nothing is submitted"
  for (( i = 0; i < count; i++ )); do
    "$PYTHON" "$REPO/tools/preprocess_data.py" ${args[@]+"${args[@]}"} --shard "$i/$count" --plan
  done
  exit 0
fi

: "${SLURM_ARRAY_TASK_ID:?submit as an array job: sbatch --array=0-<N-1> slurm/preprocess.sh ...}"
# The shard count is the array's size; an array must start at 0 and have no gaps.
count="${SLURM_ARRAY_TASK_COUNT:?}"
if [[ -n "${SLURM_ARRAY_TASK_MIN:-}" && ( "$SLURM_ARRAY_TASK_MIN" != 0 || "$SLURM_ARRAY_TASK_MAX" != $(( count - 1 )) ) ]]; then
  echo "error: the array must be 0-$(( count - 1 )) (one task per shard), got ${SLURM_ARRAY_TASK_MIN}-${SLURM_ARRAY_TASK_MAX}" >&2
  exit 2
fi
# One worker per CPU of the task, unless the options name --workers.
workers=(--workers "${SLURM_CPUS_PER_TASK:-1}")
for arg in ${args[@]+"${args[@]}"}; do [[ "$arg" == --workers* ]] && workers=(); done
echo "[$(date -Is)] shard ${SLURM_ARRAY_TASK_ID}/${count} of array job ${SLURM_ARRAY_JOB_ID:-?} on $(hostname) ${workers[*]}"
exec "$PYTHON" "$REPO/tools/preprocess_data.py" ${args[@]+"${args[@]}"} --shard "${SLURM_ARRAY_TASK_ID}/${count}" ${workers[@]+"${workers[@]}"}
