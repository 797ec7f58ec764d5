#!/bin/bash
# Multi-node SANA-SR training: one Slurm task per node, each running `accelerate launch` with its own machine rank.
#
#   sbatch slurm/train_sana_sr.sh CONFIG [key.sub=value ...]
#   sbatch --nodes=4 --time=48:00:00 slurm/train_sana_sr.sh sana_sr/configs/sana_0.6b.yaml optim.lr=1e-4
#
# Every #SBATCH default below can be overridden on the sbatch command line. Environment variables (exported to
# the job by sbatch's default --export=ALL):
#   SANA_SR_PYTHON          python to run (default: python)
#   SANA_SR_PROCS_PER_NODE  processes per node (default: the node's GPUs, SLURM_GPUS_ON_NODE, else 1)
#   MASTER_ADDR             rendezvous address (default: the first node's NodeAddr; addresses, never node names)
#   MASTER_PORT             rendezvous port (default: 20000 + job id mod 20000)
#   SANA_SR_LAUNCH_ARGS     extra `accelerate launch` arguments
# CPU test cluster (what tests/test_slurm.py does): add dist.cpu=true to the overrides, SANA_SR_PROCS_PER_NODE=1
# and, on a single host, GLOO_SOCKET_IFNAME=lo.
#
# Preemption and the time limit: Slurm sends USR1 to this script 300 s before the end (--signal); the script
# sends SIGTERM to the training step, every rank saves a checkpoint at the same step, rank 0 leaves a requeue
# marker, and the script requeues the job, which resumes from the latest checkpoint (checkpoint.resume=latest).

#SBATCH --job-name=sana-sr
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out

set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch slurm/train_sana_sr.sh CONFIG [key.sub=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift

PYTHON=${SANA_SR_PYTHON:-python}
NNODES=${SLURM_JOB_NUM_NODES:?not inside a Slurm job}
PROCS_PER_NODE=${SANA_SR_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$HEAD_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export SANA_SR_REQUEUE_FILE=${SANA_SR_REQUEUE_FILE:-$PWD/.sana-sr-requeue-$SLURM_JOB_ID}
rm -f "$SANA_SR_REQUEUE_FILE"

# Before N nodes spend minutes loading models: the config resolves, and every reader (rank x loader worker) gets a
# shard of its own (else readers idle, batch counts differ and DDP hangs). One line with the numbers and the fix.
"$PYTHON" -m sana_sr.train.preflight --world $((NNODES * PROCS_PER_NODE)) "$CONFIG" "$@" || exit 2

# The overrides travel through `bash -c`: quote them once here.
TRAIN_ARGS=$(printf '%q ' "$CONFIG" checkpoint.resume=latest "$@")
LAUNCH="$PYTHON -m accelerate.commands.launch --multi_gpu --num_machines $NNODES \
--num_processes $((NNODES * PROCS_PER_NODE)) --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
--rdzv_backend static --max_restarts 0 --mixed_precision no --dynamo_backend no ${SANA_SR_LAUNCH_ARGS:-}"

echo "sana-sr: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES nodes x $PROCS_PER_NODE processes," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT"

# srun does not inherit --cpus-per-task from sbatch since Slurm 22.05: without it, where the cluster confines CPUs,
# a node's trainers and loader workers would share one CPU. \$SLURM_NODEID is escaped: each node expands its own.
CPUS=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    CPUS=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
srun --ntasks-per-node=1 "${CPUS[@]}" --kill-on-bad-exit=1 \
    bash -c "exec $LAUNCH --machine_rank \$SLURM_NODEID -m sana_sr.train $TRAIN_ARGS" &
STEP_PID=$!

trap 'echo "sana-sr: USR1 (preemption or time limit): asking the trainer to checkpoint"; \
      scancel --signal=TERM "${SLURM_JOB_ID}.0" || kill -TERM "$STEP_PID"' USR1

status=0
while kill -0 "$STEP_PID" 2>/dev/null; do
    wait "$STEP_PID" && status=0 || status=$?
done

if [ -f "$SANA_SR_REQUEUE_FILE" ]; then
    rm -f "$SANA_SR_REQUEUE_FILE"
    echo "sana-sr: checkpoint saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
