"""Block jobs: the job base (state machine, events) and backup, commit, mirror."""
