"""What both wings need from Ray.

- `session`: which Ray a job runs on (its own local Ray, or the cluster in `RAY_ADDRESS`).
- `ray_compat`: every private or undocumented Ray name the project uses, behind one seam.
- `ray_errors`: the original exception, in one line, under Ray's wrappers.
- `gpu`: GPU requests, and the check that a process Ray gave a GPU can use one.
- `placement`: whether something can ever hold a request, `auto` GPUs, the line a minute of a wait.
- `shared_storage`: local paths accepted on a cluster only when every node sees the same files.
- `job_log`: the job's console: its own lines, not Ray's tracebacks.
- `idle_backoff`: Ray Data's scheduling loop kept from spinning while training waits.
"""
