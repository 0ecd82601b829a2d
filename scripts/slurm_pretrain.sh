#!/bin/bash
# Pretraining on a SLURM cluster: one node or several, torchrun with c10d rendezvous, requeued on pre-emption
# and at the time limit, resuming on the same trajectory.
#
#   sbatch scripts/slurm_pretrain.sh --config cfgs/pretrain/default.yaml data_path=/shared/data_1M_v001_64 \
#       output_dir=/shared/output/pretrain_vitb
#   sbatch --nodes=4 scripts/slurm_pretrain.sh ...            # several nodes: output_dir on a shared file system
#
# How it stops and comes back: SLURM sends SIGUSR1 to this batch shell 180 s before the time limit (--signal) and
# SIGTERM to the job's processes on pre-emption. The shell forwards SIGTERM to srun, srun to torchrun, torchrun to
# every training rank; the ranks finish their step, write checkpoint-last.pth and exit with status 75. The job then
# requeues itself (scontrol requeue), and the same command resumes from the checkpoint (resume=auto).
# Any other exit status ends the job: 0 when the run is complete, 2 for a bad config or input (fix it first).
#SBATCH --job-name=multimae-eo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one torchrun per node; torchrun starts the ranks
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -u
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
STOPPED=0

stop() {
    echo "$(date): $1: asking the ranks to checkpoint and stop"
    STOPPED=1
    kill -TERM "$SRUN_PID" 2>/dev/null
}
trap 'stop SIGUSR1' USR1
trap 'stop SIGTERM' TERM

srun --kill-on-bad-exit=0 torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
    run_pretraining.py "$@" &
SRUN_PID=$!
wait "$SRUN_PID"; STATUS=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; STATUS=$?; done  # wait again after a trapped signal

# Stopped by a signal: the ranks wrote checkpoint-last.pth and exited 75 (torchrun reports that as a failed
# worker, 1; the log says "stopped by SIGTERM at step ..."). Requeue unless the run finished meanwhile (0).
if [ "$STOPPED" -eq 1 ] && [ "$STATUS" -ne 0 ]; then
    echo "$(date): requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$STATUS"
