#!/bin/bash
# One DeepSpeed launcher per node: train.sbatch starts this with
# `srun --ntasks-per-node=1`, so node N runs `deepspeed --no_ssh --node_rank N` and spawns its
# own STM_PROCS_PER_NODE ranks. (DeepSpeed's `--launcher slurm` is not used: it maps nothing
# from slurm's environment and turns --num_gpus into a GRES request; see PLATFORM.md.)
#
# Preemption: USR1 or TERM reaching this script is passed on as USR1 to the training ranks,
# which checkpoint at the next step boundary and exit with status 75. The launchers themselves
# ignore USR1, so only the ranks (which install a handler) react to it.
#
# Environment (set by train.sbatch): MASTER_ADDR, MASTER_PORT, STM_PROCS_PER_NODE;
# optional STM_DEEPSPEED_ARGS (extra launcher flags, word-split). Arguments: stm-train's.
set -uo pipefail
: "${MASTER_ADDR:?set by train.sbatch}" "${MASTER_PORT:?set by train.sbatch}"
: "${STM_PROCS_PER_NODE:?set by train.sbatch}" "${SLURM_NODEID:?run under srun}"

train_bin=$(command -v stm-train) || {
    echo "node_launch.sh: stm-train is not on PATH on $(hostname) (activate the venv before sbatch)" >&2
    exit 2
}
hostfile=$(mktemp "${TMPDIR:-/tmp}/stm-hostfile.XXXXXX")
trap 'rm -f "$hostfile"' EXIT
# Host names are only keys for --no_ssh; the order must be the same on every node.
scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v s="$STM_PROCS_PER_NODE" '{print $1 " slots=" s}' >"$hostfile"

set -m  # the launcher tree gets its own process group, so one kill reaches every rank
# shellcheck disable=SC2086
(trap '' USR1; exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ${STM_DEEPSPEED_ARGS:-} \
    "$train_bin" "$@") &
launcher=$!

forward() {
    echo "node_launch.sh[node $SLURM_NODEID]: $1 received, asking the ranks to checkpoint" >&2
    kill -USR1 -- "-$launcher" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early when a trapped signal arrives; keep waiting until the launcher is gone.
while kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher"
done
wait "$launcher"
rc=$?
# A TERM to every process ends DeepSpeed's runner at once, while the ranks it started are still
# saving their checkpoint: wait for the launcher's whole process group before this node's task
# ends (and with it, for slurm, the job).
while kill -0 -- "-$launcher" 2>/dev/null; do
    sleep 0.5
done
exit $rc
