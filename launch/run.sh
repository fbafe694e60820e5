#!/usr/bin/env bash
# Thin launcher: `fastafd train` on this node, under `accelerate launch` when more than one process
# trains. Arguments are passed to `fastafd train`. Environment knobs (defaults in brackets):
#
#   NNODES       [1]          nodes in the job
#   NODE_RANK    [0]          this node's rank, 0 on the head node (Slurm: $SLURM_NODEID)
#   MASTER_ADDR  [127.0.0.1]  head node address (rendezvous; torch.distributed's store)
#   MASTER_PORT  [29500]      rendezvous TCP port on the head node
#   NPROC        [GPUS_PER_NODE, else the GPUs nvidia-smi lists, else 1]  processes on this node
#   CPU          [auto]       1: CPU processes over gloo (--system.device cpu); 0: GPUs (NCCL); auto: CPU if no GPU
#   ACCELERATE_CONFIG []      an accelerate config file (launch/accelerate/*.yaml); the knobs above override it
#   DRY_RUN      [0]          1: build everything (process group, data, task, optimizers), print a summary, exit 0
#   PRINT_ONLY   [0]          1: print the command this node would run, run nothing
#   PYTHON       [python3]    the interpreter with fastafd installed
#
# Examples: launch/run.sh --recipe demo                       (1 process)
#           NPROC=8 launch/run.sh --recipe imagenet_resnet18_afd --data /data/imagenet
#           NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 launch/run.sh ...   (and NODE_RANK=1 on the other node)
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CPU=${CPU:-auto}
PYTHON=${PYTHON:-python3}

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [[ $CPU == auto ]]; then CPU=$(( gpus == 0 ? 1 : 0 )); fi
NPROC=${NPROC:-${GPUS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}}

die() { echo "run.sh: $*" >&2; exit 2; }
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES must be a positive integer"
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC must be a positive integer"
[[ $NODE_RANK =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1))"
[[ $CPU == 0 || $CPU == 1 ]] || die "CPU=$CPU must be auto, 0 or 1"
if [[ $CPU == 0 ]] && (( NPROC > gpus )); then die "NPROC=$NPROC but this node has $gpus GPUs: lower NPROC, or CPU=1 for CPU processes"; fi

args=()
(( CPU == 1 )) && args+=(--system.device cpu)
[[ ${DRY_RUN:-0} == 1 ]] && args+=(--loop.dry_run)
args+=("$@")

world=$(( NNODES * NPROC ))
if (( world == 1 )) && [[ -z ${ACCELERATE_CONFIG:-} ]]; then
    cmd=("$PYTHON" -m fastafd.cli train "${args[@]}")
else
    cmd=("$PYTHON" -m fastafd.launch)  # accelerate launch, with one error line per run (fastafd/launch.py)
    [[ -n ${ACCELERATE_CONFIG:-} ]] && cmd+=(--config_file "$ACCELERATE_CONFIG")
    (( world > 1 )) && cmd+=(--multi_gpu)
    cmd+=(--num_machines "$NNODES" --num_processes "$world" --machine_rank "$NODE_RANK"
          --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
          --mixed_precision no --dynamo_backend no --max_restarts 0
          -m fastafd.cli train "${args[@]}")
fi

if [[ ${PRINT_ONLY:-0} == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
echo "run.sh: node $NODE_RANK/$NNODES, $NPROC process(es) ($([[ $CPU == 1 ]] && echo CPU/gloo || echo GPU/NCCL)), rendezvous $MASTER_ADDR:$MASTER_PORT"
# The preemption signal (SIGUSR1, see slurm/train.sbatch) is for the training processes, which
# install their own handler; the launcher (torchrun's agent) must not die from it: ignore it here,
# the disposition is inherited through exec.
trap '' USR1
exec "${cmd[@]}"
