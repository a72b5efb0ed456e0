#!/bin/bash

# Parameters
#SBATCH --account=ml-research
#SBATCH --constraint=h100
#SBATCH --cpus-per-task=12
#SBATCH --error='/scratch/my runs/it'"'"'s "quoted"/slurm/%j/%j_0_log.err'
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=fmtrain
#SBATCH --mem=1600GB
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output='/scratch/my runs/it'"'"'s "quoted"/slurm/%j/%j_0_log.out'
#SBATCH --partition=gpu
#SBATCH --qos=normal
#SBATCH --requeue
#SBATCH --signal=USR2@300
#SBATCH --time=1440
#SBATCH --wckey=submitit

# setup
module load cuda/12.4
export NCCL_SOCKET_IFNAME=ib0
export PYTHONPATH='/scratch/my runs/it'"'"'s "quoted"/code'${PYTHONPATH:+:$PYTHONPATH}

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output '/scratch/my runs/it'"'"'s "quoted"/slurm/%j/%j_%t_log.out' --error '/scratch/my runs/it'"'"'s "quoted"/slurm/%j/%j_%t_log.err' --kill-on-bad-exit=1 PYTHON -P -u -m submitit.core._submit '/scratch/my runs/it'"'"'s "quoted"/slurm/%j'
