"""Plan before you spend: memory per GPU term by term, step time, the verdict, and `parallelism=auto`.

    gpus.py         GPU specs by name (memory, peak, bandwidths)
    layout.py       a candidate layout, and the parameters of each pipeline stage
    memory.py       every memory term of the most loaded stage
    step_time.py    compute, tp/pp/dp communication, bubble, optimizer
    calibration.py  the only fitted constants, each with its measurement
    setup.py        what a plan is for (model, GPU, cluster) and the estimate of one layout
    search.py       parallelism=auto, and the smallest change when nothing fits
    report.py       the one-screen output
It reads no run config: neox/launch/planning.py builds its Setup from one and holds the launcher's calls
(plan=true, parallelism=auto, the refusal of a layout that does not fit); neox/config/memory.py gives
make_plan this package's memory model.
"""
