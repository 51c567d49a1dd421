"""Running recipes as cluster jobs: Slurm environment, per-node launch, job supervision, sbatch rendering."""
