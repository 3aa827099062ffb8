"""Plan before you spend: memory per GPU term by term, step time, the verdict, and `parallelism=auto`.

    gpus.py         GPU specs by name (memory, peak, bandwidths)
    layout.py       a candidate layout, and the parameters of each pipeline stage
    memory.py       every memory term of the most loaded stage
    step_time.py    compute, tp/pp/dp communication, bubble, optimizer
    calibration.py  the only fitted constants, each with its measurement
    setup.py        what a plan is for (model, GPU, cluster) and the estimate of one layout
    search.py       parallelism=auto, and the smallest change when nothing fits
    report.py       the one-screen output
    hook.py         the launcher's two calls (neox/launch/job.py)
"""
