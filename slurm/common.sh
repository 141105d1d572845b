#!/usr/bin/env bash
# Shared by slurm/<stage>.sh. Sourced inside an sbatch job; `launch <recipe> [overrides]`.
#
# - one srun task per GPU (ranks from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID),
#   MASTER_ADDR = first host of the allocation, MASTER_PORT from the job id;
# - run dir runs/<SLURM_JOB_ID> (or $RUN_ROOT/<SLURM_JOB_ID>): the same across requeues,
#   so a requeued job resumes from its latest checkpoint;
# - USR1/TERM to the batch shell (--signal=B:USR1@300, preemption) is forwarded to the
#   trainer, which finishes its step, saves and exits; the job then requeues itself unless
#   training completed. `scontrol requeue` works too (Slurm sends SIGTERM to the steps).
# - optional container through pyxis: CONTAINER_IMAGE (and CONTAINER_MOUNTS).
set -euo pipefail

REPO="${ELASTIC_MEGATRON_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
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
    echo "command: ${cmd[*]}"
  } | tee -a "$LOG"

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
  return "$rc"
}
