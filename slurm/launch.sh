#!/bin/bash
# The body shared by slurm/*.sbatch: one srun task per GPU running launchers/pretrain.py,
# master = first host of the allocation, a per-job port, logs under the run directory, and
# preemption: Slurm's `--signal=B:USR1@N` reaches this shell, which forwards it to every task;
# the ranks save a checkpoint and exit 75, and the job requeues itself and resumes.
#   usage (via an sbatch script): [--dry-run] CONFIG.yaml DS_CONFIG.json [key=value ...]
set -uo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
if [ $# -lt 2 ]; then
    echo "usage: sbatch slurm/pretrain.sbatch [--dry-run] CONFIG.yaml DS_CONFIG.json [key=value ...]" >&2
    exit 2
fi
CONFIG=$1 DS=$2
shift 2
PYTHON=${PYTHON:-python}
EXIT_REQUEUE=75

# Environment: load modules / activate the venv or container here (see slurm/README.md).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

NODELIST=${SLURM_JOB_NODELIST:-$DSFM_PLAN_NODELIST}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$DSFM_PLAN_TASKS_PER_NODE}
MASTER_ADDR=$("$PYTHON" -c "import sys; from dsfm.distributed.env import expand_nodelist; print(expand_nodelist(sys.argv[1])[0])" "$NODELIST") || exit 2
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
RUN_DIR=$("$PYTHON" -m dsfm.cli config --config "$CONFIG" --get train.out_dir "$@") || exit 2
RESTART=${SLURM_RESTART_COUNT:-0}
CMD=("$PYTHON" -u launchers/pretrain.py --config "$CONFIG" --ds "$DS" "$@")
SRUN=(srun --kill-on-bad-exit=1 --output="$RUN_DIR/logs/job${SLURM_JOB_ID:-ID}-restart$RESTART-task%t.log")

if [ "$DRY_RUN" = 1 ]; then
    echo "run dir:  $RUN_DIR (task logs in $RUN_DIR/logs/)"
    echo "command:  ${SRUN[*]} ${CMD[*]}"
    exec "$PYTHON" -m dsfm.distributed.slurm --nodelist "$NODELIST" --tasks-per-node "$TASKS_PER_NODE" \
        --port "$MASTER_PORT" -- "${CMD[@]}"
fi

export MASTER_ADDR MASTER_PORT
mkdir -p "$RUN_DIR/logs"
echo "[$(date -Is)] job $SLURM_JOB_ID restart $RESTART: ${SLURM_NNODES} node(s) x $TASKS_PER_NODE task(s), master $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
"${SRUN[@]}" "${CMD[@]}" &
SRUN_PID=$!
PREEMPTED=0
trap 'echo "[$(date -Is)] USR1: asking every rank to checkpoint and stop"; PREEMPTED=1; kill -USR1 $SRUN_PID' USR1
# `wait` returns early whenever the trap runs; keep waiting until srun itself has ended.
while true; do
    wait "$SRUN_PID"
    rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
echo "[$(date -Is)] training exited with status $rc"
if [ "$PREEMPTED" = 1 ] && [ "$rc" = "$EXIT_REQUEUE" ]; then
    echo "[$(date -Is)] checkpoint saved; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
