# Sourced by the sbatch scripts in this folder (submit them from the repository root):
#   srun_main ARGS...   runs `srun python -u main.py ARGS hydra.run.dir=RUN_DIR` on every task.
# DRY_RUN=1 prints the command instead (works without slurm: `DRY_RUN=1 bash scripts/slurm/X.sbatch`).
# RUN_DIR defaults to outputs/<job name>/<job id>: a requeued job keeps its id, finds
# checkpoints/last.ckpt (or hpc_ckpt_*.ckpt) there and resumes.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
RUN_DIR="${RUN_DIR:-outputs/${SLURM_JOB_NAME:-mdlm}/${SLURM_JOB_ID:-manual}}"
# Lightning's SLURM integration reads the rank layout from srun; these keep the config in step.
DIST=("trainer.num_nodes=${SLURM_NNODES:-1}" "trainer.devices=${SLURM_NTASKS_PER_NODE:-1}")
export HYDRA_FULL_ERROR=1

srun_main() {
  local cmd=(srun python -u main.py "$@" "hydra.run.dir=$RUN_DIR")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
  else
    "${cmd[@]}"
  fi
}

need_checkpoint() {  # $1: the checkpoint argument of an eval / sample script
  if [ -z "${1:-}" ]; then
    echo "usage: sbatch $0 /path/to/checkpoints/last.ckpt (or a Hugging Face repo / directory)" >&2
    exit 2
  fi
}
