#!/usr/bin/env bash
# Shared by slurm/<stage>.sh. Sourced inside an sbatch job; `launch <recipe> [overrides]`.
#
# - one srun task per GPU (ranks from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID),
#   MASTER_ADDR = first host of the allocation, MASTER_PORT from the job id. The launchers
#   ask for the GPUs in their header (--gpus-per-node = --ntasks-per-node); every task
#   sees all GPUs of its node and the trainer takes GPU SLURM_LOCALID. The GPU count is
#   read from the allocation (SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE), logged, and
#   checked against the tasks per node;
# - run dir runs/<SLURM_JOB_ID> (or $RUN_ROOT/<SLURM_JOB_ID>): the same across requeues,
#   so a requeued job resumes from its latest checkpoint;
# - USR1/TERM to the batch shell (--signal=B:USR1@300, preemption) is forwarded to the
#   trainer, which finishes its step, saves and exits with status 75; the job then requeues
#   itself unless training completed. `scontrol requeue` works too (Slurm sends SIGTERM to
#   the steps). A trainer that fails (bad input: status 2, with one `error:` line) is not
#   requeued: a requeue would fail the same way.
# - optional container through pyxis: CONTAINER_IMAGE (and CONTAINER_MOUNTS).
# - `bash slurm/<stage>.sh --dry-run [overrides]` submits nothing: tools/dry_run.py checks the
#   job on this host (every rank's model built on the meta device, memory, checkpoint layout,
#   elastic spec, data) on the nodes x GPUs of the calling script's own #SBATCH header.
set -euo pipefail

REPO="${ELASTIC_MEGATRON_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
fi

# Sourced without arguments, this file sees the launcher's own ("$@").
_dry_run=0
for _arg in "$@"; do [[ "$_arg" == "--dry-run" ]] && _dry_run=1; done
if (( _dry_run )); then
  _script="${BASH_SOURCE[1]:-$0}"
  _header() { sed -n "s/^#SBATCH --$1=\([0-9][0-9]*\).*/\1/p" "$_script" | tail -n 1; }
  launch() {
    local recipe="$1"; shift
    local args=() nodes gpus
    for _arg in "$@"; do [[ "$_arg" == "--dry-run" ]] || args+=("$_arg"); done
    nodes="$(_header nodes)"
    gpus="$(_header gpus-per-node)"
    if [[ -z "$nodes" || -z "$gpus" ]]; then
      echo "error: $_script has no '#SBATCH --nodes=N' and '#SBATCH --gpus-per-node=G' header to take the layout from;" \
           "run python tools/dry_run.py $recipe --nodes N --gpus-per-node G instead" >&2
      return 2
    fi
    echo "dry run of $recipe on ${nodes} nodes x ${gpus} GPUs (the #SBATCH header of $_script); nothing is submitted"
    "$PYTHON" "$REPO/tools/dry_run.py" "$recipe" --nodes "$nodes" --gpus-per-node "$gpus" cluster=slurm ${args[@]+"${args[@]}"}
  }
  return 0
fi
RUN_DIR="${RUN_ROOT:-$REPO/runs}/${SLURM_JOB_ID:?not inside a Slurm job}"
RESTART="${SLURM_RESTART_COUNT:-0}"
mkdir -p "$REPO/logs" "$RUN_DIR"
LOG="$REPO/logs/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID}.restart${RESTART}.log"

# Rendezvous on the first node of the allocation, at the address Slurm itself uses to
# reach it (NodeAddr; the node name when the cluster sets none).
_first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
_node_addr="$(scontrol show node "$_first_node" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)"
export MASTER_ADDR="${_node_addr:-$_first_node}"
export MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
export PYTHONUNBUFFERED=1

# GPUs Slurm allocated on this node (0 without a GPU request or on a CPU-only cluster) and
# the most tasks any node runs (SLURM_TASKS_PER_NODE is e.g. "8(x2)" or "2,1").
_gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}"
_gpus="${_gpus##*:}"  # SLURM_GPUS_PER_NODE may carry a type (h100:8)
[[ "$_gpus" =~ ^[0-9]+$ ]] || _gpus=0
GPUS_PER_NODE="$_gpus"
_tasks_per_node=0
IFS=, read -ra _tpn <<< "${SLURM_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
for _n in "${_tpn[@]}"; do
  _n="${_n%%(*}"
  if [[ "$_n" =~ ^[0-9]+$ ]] && (( _n > _tasks_per_node )); then _tasks_per_node="$_n"; fi
done

_stop_requested=0
_srun_pid=""
_forward() {
  _stop_requested=1
  echo "[$(date -Is)] batch shell got $1: forwarding SIGUSR1 to the trainer" | tee -a "$LOG"
  [[ -n "$_srun_pid" ]] && kill -USR1 "$_srun_pid" 2>/dev/null || true
}

launch() {
  local recipe="$1"; shift
  local container=()
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    container=(--container-image="$CONTAINER_IMAGE")
    [[ -n "${CONTAINER_MOUNTS:-}" ]] && container+=(--container-mounts="$CONTAINER_MOUNTS")
  fi
  local cmd=("$PYTHON" -m elastic_megatron.train --config-name="$recipe" cluster=slurm "run.dir=$RUN_DIR" "$@")
  {
    echo "[$(date -Is)] job ${SLURM_JOB_ID} restart ${RESTART} on ${SLURM_JOB_NODELIST} (${SLURM_NTASKS:-1} tasks)"
    echo "git commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "master: ${MASTER_ADDR}:${MASTER_PORT}  run dir: ${RUN_DIR}"
    echo "gpus per node: ${GPUS_PER_NODE} (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}), tasks per node: ${_tasks_per_node}"
    echo "command: ${cmd[*]}"
  } | tee -a "$LOG"
  if (( GPUS_PER_NODE > 0 && _tasks_per_node > GPUS_PER_NODE )); then
    echo "error: ${_tasks_per_node} tasks per node but ${GPUS_PER_NODE} GPUs per node; one task per GPU:" \
         "submit with --ntasks-per-node equal to --gpus-per-node" | tee -a "$LOG"
    return 1
  elif (( GPUS_PER_NODE > 0 && _tasks_per_node < GPUS_PER_NODE )); then
    echo "warning: ${_tasks_per_node} tasks per node for ${GPUS_PER_NODE} GPUs per node; GPUs" \
         "${_tasks_per_node}..$((GPUS_PER_NODE - 1)) stay idle (one task per GPU)" | tee -a "$LOG"
  fi

  trap '_forward USR1' USR1
  trap '_forward TERM' TERM
  # In the background so the shell can take signals while the step runs.
  srun --kill-on-bad-exit=1 "${container[@]}" "${cmd[@]}" > >(tee -a "$LOG") 2>&1 &
  _srun_pid=$!
  local rc=0
  # `wait` returns early when a trapped signal arrives; wait again for the step itself.
  while true; do
    wait "$_srun_pid" && rc=0 || rc=$?
    kill -0 "$_srun_pid" 2>/dev/null || break
  done
  echo "[$(date -Is)] trainer exited with $rc" | tee -a "$LOG"
  if [[ ! -f "$RUN_DIR/COMPLETED" && "$_stop_requested" == 1 ]]; then
    echo "[$(date -Is)] not finished: requeueing job ${SLURM_JOB_ID}" | tee -a "$LOG"
    scontrol requeue "$SLURM_JOB_ID" || echo "requeue refused (already being requeued?)" | tee -a "$LOG"
  fi
  # 75: the trainer saved and stopped on the signal (resumable), which is what this job asked
  # for; any other non-zero status (bad input 2, a crash) fails the job and is not requeued.
  if (( rc == 75 )); then rc=0; fi
  return "$rc"
}
