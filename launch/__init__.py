"""fmtrain's launch side: the CLI, config composition, and launchers that start training processes.

A launcher only starts processes with the right distributed environment (see ``launch.spec``); it
never changes what training does. Backends (torch elastic, submitit, ray) load on first use.
"""
