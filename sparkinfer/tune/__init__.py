"""Auto-tuning of the kernel schedules per arch (`sparkinfer tune`).

    task.py       TuneTask: a kernel's concrete PrimFunc, timing inputs, design space, knobs
    tasks.py      the tasks of a model, from its decode step and the schedule rules
    inputs.py     valid, non-zero timing inputs per kernel factory
    mutator.py    MutateCategorical: re-draws one sample_categorical decision
    search.py     one round of MetaSchedule's EvolutionarySearch + XGBoost, from the database
    bundle.py     builds a round's candidates into a bundle (--emit)
    runner.py     times a bundle with runtime-only TVM (--run; python -m sparkinfer.tune.runner)
    database.py   records a timed bundle in tuning_logs/<arch>/ (--ingest)
    schedules.py  writes the schedules file (sparkinfer/data/schedules/<arch>.json) from the database
    tuning.py     one-phase tuning: emit -> run -> ingest rounds on this machine
    transfer.py   schedules files of untuned arches: the arch table's defaults, marked transferred
    cli.py        the `sparkinfer tune` command

Importing this package imports nothing: runner.py must load under runtime-only TVM.
"""
