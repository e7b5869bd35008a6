"""The benchmarks of DeStein: one registry (`benchmarks.registry`) of measurements, each writing one results file
under `docs/results/`, run by `python -m benchmarks NAME` and assembled into `docs/BENCHMARKS.md` by
`python -m benchmarks page`."""
