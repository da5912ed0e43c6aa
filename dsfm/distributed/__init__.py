"""Where a process sits in a job (`env`), the dry run of a Slurm launch (`slurm`), and the
collectives dsfm calls (`collectives`)."""
