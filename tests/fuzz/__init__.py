"""Property-based and fuzz tests over every input surface: each input must get a defined decision.

Run counts are set by `examples(n)` (the CI budget, ~60 s for the whole package on 2 cores); set
NEXUS_FUZZ_LONG to a multiplier (e.g. NEXUS_FUZZ_LONG=50) for a longer local run, and NEXUS_FUZZ_ATHERIS
to the coverage-guided (atheris) runs per target (default 3000).
"""
