#!/usr/bin/env bash
# Serve a checkpoint behind the OpenAI-compatible API on one GPU (tools/serve.py).
#   sbatch slurm/serve.sh --checkpoint runs/<stage2 job id> --api-key "$KEY" [--max-batch 16 --max-queue 128 ...]
# Where to reach it is printed at the top of logs/em-serve-<job id>.out and written to
# runs/<job id>/endpoint:
#   serving on node <node>, port <port>: http://<node>:<port>/v1
# The port is SERVE_PORT, else 20000 + job id % 20000 (or a --port you pass). The server binds
# every address of the node so other nodes can reach it: pass --api-key (without one it warns).
# Weights in bf16 (pass --dtype fp32 to override). Five minutes before the time limit, or on
# `scancel --signal=TERM --batch <job id>`, the batch shell forwards SIGTERM: the server stops
# accepting, lets the requests in flight finish (--grace-period, default 30 s) and exits 0.
#SBATCH --job-name=em-serve
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=08:00:00
#SBATCH --signal=B:TERM@300
# stdout+stderr of the job; create logs/ before submitting (mkdir -p logs).
#SBATCH --output=logs/%x-%j.out
source "${ELASTIC_MEGATRON_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
if (( _dry_run )); then
  echo "error: slurm/serve.sh has no dry run; run python tools/serve.py --checkpoint ... on a GPU node to check" >&2
  exit 2
fi

PORT="${SERVE_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
_prev=""
for _arg in "$@"; do
  [[ "$_prev" == "--port" ]] && PORT="$_arg"
  [[ "$_arg" == --port=* ]] && PORT="${_arg#--port=}"
  _prev="$_arg"
done
NODE="$(hostname)"
container=()
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
  container=(--container-image="$CONTAINER_IMAGE")
  [[ -n "${CONTAINER_MOUNTS:-}" ]] && container+=(--container-mounts="$CONTAINER_MOUNTS")
fi
cmd=("$PYTHON" "$REPO/tools/serve.py" --host 0.0.0.0 --port "$PORT" --dtype bf16 "$@")
{
  echo "[$(date -Is)] job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}"
  echo "git commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "gpus: ${GPUS_PER_NODE} (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
  echo "command: ${cmd[*]}"
  echo "serving on node ${NODE}, port ${PORT}: http://${NODE}:${PORT}/v1"
} | tee -a "$LOG"
echo "http://${NODE}:${PORT}/v1" > "$RUN_DIR/endpoint"

_server_pid=""
_stop() {
  # To the server itself, through Slurm (the job's steps, not this shell): a TERM to srun
  # would make srun kill the step instead of letting the server drain.
  echo "[$(date -Is)] batch shell got $1: the server drains and exits" | tee -a "$LOG"
  scancel --signal=TERM "$SLURM_JOB_ID" 2>&1 | tee -a "$LOG" || true
}
trap '_stop TERM' TERM
trap '_stop USR1' USR1
# In the background so the shell can take signals while the server runs.
srun --kill-on-bad-exit=1 "${container[@]}" "${cmd[@]}" > >(tee -a "$LOG") 2>&1 &
_server_pid=$!
rc=0
while true; do
  wait "$_server_pid" && rc=0 || rc=$?
  kill -0 "$_server_pid" 2>/dev/null || break
done
echo "[$(date -Is)] server exited with $rc" | tee -a "$LOG"
rm -f "$RUN_DIR/endpoint"
exit "$rc"
