#!/usr/bin/env bash
# Serve every budget at scale: one inference engine per budget slice, each on its own GPUs
# with its own tensor-parallel size, then the front end (tools/serve.py --upstreams) that
# serves them all behind one OpenAI endpoint, budget control included.
#   sbatch --nodes=2 slurm/serve_fleet.sh --budget small=slices/small:1 --budget full=slices/full:4 \
#       [--engine vllm|sglang|llama-server|serve] [--engine-command 'TEMPLATE'] [--model-name NAME (default elastic)] \
#       [-- front-end options, e.g. --api-key "$KEY" --max-batch 256 --max-queue 1024]
#   bash slurm/serve_fleet.sh --dry-run --budget ...    # prints every command; starts nothing
#
# --budget NAME=PATH:TP: budget NAME is served from PATH (a slice: an HF directory for vLLM
# and SGLang, a GGUF file for llama-server, any checkpoint for `serve`) with TP GPUs of one
# node; budgets are packed onto the allocation's nodes in the order given (first fit). The
# engine command is a setting: --engine picks a preset, --engine-command (or ENGINE_COMMAND)
# gives a template with {model} {port} {tp} {name} (ENGINE_ARGS is appended to every engine).
# Engine i listens on PORT + 1 + i, the front end on PORT: SERVE_PORT, else
# 20000 + job id % 20000. With ENGINE_API_KEY set, the engines want it and the front end sends
# it. The job waits for every engine's /health (ENGINE_START_TIMEOUT s, default 1800; an
# engine that exits fails the job, naming it), then starts the front end on this node, with
# the tokenizer of the first budget's slice (--tokenizer to give another). Where to reach it
# is printed at the top of the log and written to runs/<job id>/endpoint. SIGTERM (five
# minutes before the time limit, or `scancel --signal=TERM --batch <job id>`) drains the
# front end (its --grace-period), then stops the engines.
#SBATCH --job-name=em-serve-fleet
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=08:00:00
#SBATCH --signal=B:TERM@300
# stdout+stderr of the job; create logs/ before submitting (mkdir -p logs).
#SBATCH --output=logs/%x-%j.out
source "${ELASTIC_MEGATRON_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"

fail() { echo "error: $*" >&2; exit 2; }

budgets=() engine="${ENGINE:-vllm}" template="${ENGINE_COMMAND:-}" model_name="" tokenizer="" front=()
while (( $# )); do
  case "$1" in
    --dry-run) shift ;;
    --budget) [[ $# -ge 2 ]] || fail "--budget needs NAME=PATH:TP"; budgets+=("$2"); shift 2 ;;
    --budget=*) budgets+=("${1#--budget=}"); shift ;;
    --engine) [[ $# -ge 2 ]] || fail "--engine needs one of vllm, sglang, llama-server, serve"; engine="$2"; shift 2 ;;
    --engine-command) [[ $# -ge 2 ]] || fail "--engine-command needs a template"; template="$2"; shift 2 ;;
    --model-name) [[ $# -ge 2 ]] || fail "--model-name needs a name"; model_name="$2"; shift 2 ;;
    --tokenizer) [[ $# -ge 2 ]] || fail "--tokenizer needs a path"; tokenizer="$2"; shift 2 ;;
    --) shift; front=("$@"); break ;;
    *) fail "unknown option $1 (allowed: --budget NAME=PATH:TP, --engine, --engine-command, --model-name, --tokenizer," \
            "--dry-run, then -- and the front end's own options)" ;;
  esac
done

if [[ -z "$template" ]]; then
  case "$engine" in
    vllm) template="vllm serve {model} --host 0.0.0.0 --port {port} --tensor-parallel-size {tp} --served-model-name {name}" ;;
    sglang) template="python -m sglang.launch_server --model-path {model} --host 0.0.0.0 --port {port} --tp {tp} --served-model-name {name}" ;;
    llama-server) template="llama-server -m {model} --host 0.0.0.0 --port {port} --alias {name}" ;;
    serve) template="$PYTHON $REPO/tools/serve.py --checkpoint {model} --host 0.0.0.0 --port {port} --model-name {name} --dtype bf16" ;;
    *) fail "--engine $engine: allowed: vllm, sglang, llama-server, serve (or --engine-command 'TEMPLATE')" ;;
  esac
fi
(( ${#budgets[@]} )) || fail "no budget: give --budget NAME=PATH:TP for each budget (e.g. --budget small=slices/small:1)"

# The allocation: its nodes and GPUs per node (in a dry run: the #SBATCH header, nodes n1..nN).
if (( _dry_run )); then
  _nodes_n="${SLURM_NNODES:-$(sed -n 's/^#SBATCH --nodes=\([0-9]*\).*/\1/p' "${BASH_SOURCE[0]}" | tail -n 1)}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-$(sed -n 's/^#SBATCH --gpus-per-node=\([0-9]*\).*/\1/p' "${BASH_SOURCE[0]}" | tail -n 1)}"
  nodes=()
  for ((i = 1; i <= _nodes_n; i++)); do nodes+=("n$i"); done
  PORT="${SERVE_PORT:-20000}"
else
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  PORT="${SERVE_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
fi
(( GPUS_PER_NODE > 0 )) || fail "the allocation has no GPUs per node (submit with --gpus-per-node=G)"

# Every budget checked and placed before anything starts.
names=() paths=() tps=() hosts=() ports=() cmds=()
declare -A free=() seen=()
for n in "${nodes[@]}"; do free[$n]=$GPUS_PER_NODE; done
for i in "${!budgets[@]}"; do
  spec="${budgets[$i]}"
  name="${spec%%=*}" rest="${spec#*=}"
  [[ "$spec" == *=*:* && "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || fail "--budget $spec: must be NAME=PATH:TP (e.g. small=slices/small:1)"
  path="${rest%:*}" tp="${rest##*:}"
  [[ "$tp" =~ ^[1-9][0-9]*$ ]] || fail "--budget $spec: TP must be a positive integer, got '$tp'"
  [[ -z "${seen[$name]:-}" ]] || fail "--budget $spec: budget $name is given twice"
  seen[$name]=1
  [[ -e "$path" ]] || fail "--budget $spec: $path does not exist (a slice: tools/zero_shot_slicing.py --format hf)"
  (( tp <= GPUS_PER_NODE )) || fail "--budget $spec: TP $tp exceeds the $GPUS_PER_NODE GPUs of a node"
  host=""
  for n in "${nodes[@]}"; do if (( free[$n] >= tp )); then host="$n"; break; fi; done
  [[ -n "$host" ]] || fail "--budget $spec: no node has $tp GPUs left (${#nodes[@]} nodes x $GPUS_PER_NODE GPUs; ask for more nodes)"
  free[$host]=$((free[$host] - tp))
  port=$((PORT + 1 + i))
  cmd="${template//\{model\}/$path}"; cmd="${cmd//\{port\}/$port}"; cmd="${cmd//\{tp\}/$tp}"; cmd="${cmd//\{name\}/$name}"
  [[ -n "${ENGINE_API_KEY:-}" ]] && cmd+=' --api-key "$ENGINE_API_KEY"'
  [[ -n "${ENGINE_ARGS:-}" ]] && cmd+=" $ENGINE_ARGS"
  names+=("$name") paths+=("$path") tps+=("$tp") hosts+=("$host") ports+=("$port") cmds+=("$cmd")
done
[[ -n "$model_name" ]] || model_name="elastic"
[[ -n "$tokenizer" ]] || tokenizer="${paths[0]}"

fleet_yaml() {  # the front end's --upstreams file
  echo "model_name: $model_name"
  echo "tokenizer: $tokenizer"
  echo "timeout: ${ENGINE_TIMEOUT:-600}"
  echo "upstreams:"
  for i in "${!names[@]}"; do
    echo "  ${names[$i]}:"
    echo "    url: http://${hosts[$i]}:${ports[$i]}/v1"
    echo "    model: ${names[$i]}"
    [[ -n "${ENGINE_API_KEY:-}" ]] && echo "    api_key_env: ENGINE_API_KEY"
  done
  return 0
}
engine_step() {  # the srun line of engine $1
  echo "srun --nodes=1 --ntasks=1 --nodelist=${hosts[$1]} --gres=gpu:${tps[$1]} --exact bash -c '${cmds[$1]}'"
}
front_cmd=("$PYTHON" "$REPO/tools/serve.py" --upstreams "${RUN_DIR:-runs/<job id>}/fleet.yaml" --host 0.0.0.0 --port "$PORT"
           ${front[@]+"${front[@]}"})

if (( _dry_run )); then
  echo "dry run: ${#names[@]} engines on ${#nodes[@]} nodes x $GPUS_PER_NODE GPUs (nodes ${nodes[*]}), front end on ${nodes[0]}; nothing is started"
  for i in "${!names[@]}"; do
    echo "engine ${names[$i]} (tp ${tps[$i]}) on ${hosts[$i]}: $(engine_step "$i")"
    echo "  health: curl -sf http://${hosts[$i]}:${ports[$i]}/health"
  done
  echo "fleet.yaml:"
  fleet_yaml | sed 's/^/  /'
  echo "front end on ${nodes[0]}: ${front_cmd[*]}"
  echo "endpoint: http://${nodes[0]}:${PORT}/v1"
  exit 0
fi

fleet_yaml > "$RUN_DIR/fleet.yaml"
container=()
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
  container=(--container-image="$CONTAINER_IMAGE")
  [[ -n "${CONTAINER_MOUNTS:-}" ]] && container+=(--container-mounts="$CONTAINER_MOUNTS")
fi
{
  echo "[$(date -Is)] job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}"
  echo "git commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  for i in "${!names[@]}"; do echo "engine ${names[$i]} (tp ${tps[$i]}) on ${hosts[$i]}:${ports[$i]}: ${cmds[$i]}"; done
  echo "front end: ${front_cmd[*]}"
} | tee -a "$LOG"

engine_pids=()
_stopping=0
_stop_engines() {
  for pid in "${engine_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait "${engine_pids[@]}" 2>/dev/null || true
}
trap '_stopping=1; [[ -n "${_front_pid:-}" ]] && kill -TERM "$_front_pid" 2>/dev/null; echo "[$(date -Is)] got TERM: draining" | tee -a "$LOG"' TERM
trap '_stop_engines' EXIT
for i in "${!names[@]}"; do
  srun --nodes=1 --ntasks=1 --nodelist="${hosts[$i]}" --gres="gpu:${tps[$i]}" --exact "${container[@]}" \
       bash -c "${cmds[$i]}" > >(sed -u "s/^/[${names[$i]}] /" | tee -a "$LOG") 2>&1 &
  engine_pids+=($!)
done

deadline=$((SECONDS + ${ENGINE_START_TIMEOUT:-1800}))
for i in "${!names[@]}"; do
  until curl -sf -o /dev/null "http://${hosts[$i]}:${ports[$i]}/health"; do
    kill -0 "${engine_pids[$i]}" 2>/dev/null || { echo "error: engine ${names[$i]} exited before it was healthy" | tee -a "$LOG"; exit 1; }
    (( SECONDS < deadline )) || { echo "error: engine ${names[$i]} not healthy after ${ENGINE_START_TIMEOUT:-1800} s" | tee -a "$LOG"; exit 1; }
    (( _stopping )) && exit 0
    sleep 5
  done
  echo "[$(date -Is)] engine ${names[$i]} is healthy" | tee -a "$LOG"
done

echo "serving on node $(hostname), port ${PORT}: http://$(hostname):${PORT}/v1" | tee -a "$LOG"
echo "http://$(hostname):${PORT}/v1" > "$RUN_DIR/endpoint"
"${front_cmd[@]}" > >(tee -a "$LOG") 2>&1 &
_front_pid=$!
rc=0
while true; do  # `wait` returns early when a trapped signal arrives
  wait "$_front_pid" && rc=0 || rc=$?
  kill -0 "$_front_pid" 2>/dev/null || break
done
echo "[$(date -Is)] front end exited with $rc" | tee -a "$LOG"
rm -f "$RUN_DIR/endpoint"
exit "$rc"
